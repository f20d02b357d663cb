"""Rooflines and machine facts.

A benchmark's bandwidth is ``bytes / time`` with ``bytes`` from the spec's explicit byte model
(what an ideal kernel must read and write, never what an implementation happens to move).

* CPU: the roofline is a same-size copy measured in the same run, interleaved with the
  providers: ``dst.copy_(src)`` where ``src`` holds half the op's bytes (the copy reads them
  and writes as many). The fraction of the roofline is then ``copy time / op time``.
* CUDA: the peak HBM bandwidth of the device from the table below (vendor figures), or
  unknown (no fraction) for devices not in it.
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
    info.update(git_revision())
    return info
