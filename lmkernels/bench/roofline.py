"""Rooflines and machine facts.

A benchmark's bandwidth is ``bytes / time`` with ``bytes`` from the spec's explicit byte model
(what an ideal kernel must read and write, never what an implementation happens to move).

* CPU: the roofline is a same-size copy measured in the same run, interleaved with the
  providers: ``dst.copy_(src)`` where ``src`` holds half the op's bytes (the copy reads them
  and writes as many). The fraction of the roofline is then ``copy time / op time``.
* CUDA: the peak HBM bandwidth of the device from the table below (vendor figures); for a
  device not in it, the bandwidth of a 256 MiB device-to-device copy measured at the start of
  the run.

Compute-bound ops (a spec with a FLOP model) are shown against the matrix-product roofline
instead: on CPU an fp32 1024^3 ``mm`` (MKL) measured at the start of the run, for every dtype
(a CPU without AVX-512 BF16 / AMX computes 16-bit products in fp32); on CUDA the vendor's dense
peak per dtype below (tensor cores for fp16 / bf16, the FMA units for fp32, as torch runs fp32
products without TF32 by default), or a large ``mm`` in the dtype measured at the start for a
device not in the table.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

# Vendor peak memory bandwidth, GB/s (1e9 bytes/s).
GPU_PEAK_GBPS = {
    "A100-40GB": 1555.0,
    "A100-80GB-SXM": 2039.0,
    "A100-80GB-PCIe": 1935.0,
    "H100-SXM": 3350.0,
    "H100-PCIe": 2000.0,
    "H100-NVL": 3900.0,
    "H200": 4800.0,
    "L4": 300.0,
    "RTX-4090": 1008.0,
}


# Vendor dense (no structured sparsity) peak TFLOP/s per dtype.
_A100 = {"fp16": 312.0, "bf16": 312.0, "fp32": 19.5}
_H100_SXM = {"fp16": 989.4, "bf16": 989.4, "fp32": 66.9}
GPU_PEAK_TFLOPS = {
    "A100-40GB": _A100,
    "A100-80GB-SXM": _A100,
    "A100-80GB-PCIe": _A100,
    "H100-SXM": _H100_SXM,
    "H100-PCIe": {"fp16": 756.0, "bf16": 756.0, "fp32": 51.2},
    "H100-NVL": {"fp16": 835.0, "bf16": 835.0, "fp32": 60.0},
    "H200": _H100_SXM,
    "L4": {"fp16": 121.0, "bf16": 121.0, "fp32": 30.3},
    "RTX-4090": {"fp16": 165.2, "bf16": 165.2, "fp32": 82.6},
}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def gpu_key(name: str, total_bytes: int) -> str | None:
    """The :data:`GPU_PEAK_GBPS` key for a CUDA device name, or None if unknown."""
    n = name.upper().replace(" ", "")
    if "A100" in n:
        if total_bytes < 60 * 2**30:
            return "A100-40GB"
        return "A100-80GB-PCIe" if "PCIE" in n else "A100-80GB-SXM"
    if "H100" in n:
        if "NVL" in n:
            return "H100-NVL"
        return "H100-PCIe" if "PCIE" in n else "H100-SXM"
    if "H200" in n:
        return "H200"
    if "L4" in n and "L40" not in n:
        return "L4"
    if "4090" in n:
        return "RTX-4090"
    return None


def gpu_peak_gbps(device: torch.device) -> tuple[float | None, str]:
    """(peak GB/s, table key) of a CUDA device; (None, "unknown") when not in the table."""
    props = torch.cuda.get_device_properties(device)
    key = gpu_key(props.name, props.total_memory)
    return (GPU_PEAK_GBPS[key], key) if key else (None, "unknown")


def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                  reps: int = 7) -> float:  # fmt: skip
    """Measured TFLOP/s of an (n x n) @ (n x n) product: the median of ``reps`` timings."""
    from lmkernels.bench import timing

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda: torch.mm(a, b, out=out)  # noqa: E731
    t = timing.time_all({"mm": fn}, device, reps)["mm"]
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def measured_copy_gbps(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured GB/s (read + write) of a device copy moving ``nbytes`` each way."""
    from lmkernels.bench import timing

    fn, moved = copy_callable(2 * nbytes, device)
    t = timing.time_all({"copy": fn}, device, 7)["copy"]
    return gbps(moved, t.median_ms)


def rooflines(device: torch.device, dtypes: list[str], need_flops: bool) -> dict:
    """The run's rooflines. CPU: ``kind`` "copy" (the per-case copy gives the bandwidth) and,
    with ``need_flops``, the measured fp32 matmul TFLOP/s for every dtype. CUDA: ``kind``
    "peak", the peak GB/s and per-dtype TFLOP/s from the tables, or measured for a device not
    in them (``*_source`` says which)."""
    roof: dict = {}
    if device.type == "cpu":
        roof.update(kind="copy", what="dst.copy_(src) of the same bytes")
        if need_flops:
            tf = matmul_tflops(device)
            roof.update(peak_tflops=dict.fromkeys(dtypes, tf),
                        tflops_source="measured: fp32 1024^3 mm, for every dtype")  # fmt: skip
        return roof
    peak, key = gpu_peak_gbps(device)
    roof.update(kind="peak", device_key=key, peak_gbps=peak, gbps_source="vendor table")
    if peak is None:
        roof.update(peak_gbps=measured_copy_gbps(device),
                    gbps_source="measured: 256 MiB device copy")  # fmt: skip
    if need_flops:
        table = GPU_PEAK_TFLOPS.get(key or "")
        if table is not None:
            roof.update(peak_tflops={d: table[d] for d in dtypes if d in table},
                        tflops_source="vendor table (dense)")  # fmt: skip
        else:
            roof.update(peak_tflops={d: matmul_tflops(device, _DTYPES[d], 8192)
                                     for d in dtypes if d in _DTYPES},
                        tflops_source="measured: 8192^3 mm per dtype")  # fmt: skip
    return roof


def copy_callable(nbytes: int, device: torch.device) -> tuple[Callable[[], object], int]:
    """A same-size copy for the CPU roofline: (callable, bytes it moves, read + write)."""
    n = max(nbytes // 8, 1)  # fp32 elements read (and as many written): 8 bytes per element
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    return (lambda: dst.copy_(src)), 8 * n


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> dict:
    """The git revision of the source tree (at run time; empty when git is unavailable)."""
    root = Path(__file__).resolve().parents[2]
    out = {}
    try:
        for key, cmd in (("rev", ["rev-parse", "HEAD"]), ("status", ["status", "--porcelain"])):
            r = subprocess.run(
                ["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
            out[key] = r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_revision": out["rev"], "git_dirty": bool(out["status"])}


# the peer libraries' distributions (pip names), whose versions a run records
PEER_DISTRIBUTIONS = ("liger-kernel", "flash-attn", "apex", "xformers", "quack-kernels")


def peer_versions() -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed}."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PEER_DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    info["peers"] = peer_versions()
    info.update(git_revision())
    return info
