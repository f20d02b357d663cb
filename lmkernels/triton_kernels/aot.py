# Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU.
#
# For each spec (see e.g. softmax.aot_specs()) and each arch, triton.compile lowers the kernel
# to PTX for GPUTarget("cuda", arch, 32); Triton's bundled ptxas then assembles that PTX with
# -v, whose log gives registers and spill bytes; shared memory comes from Triton's metadata.
# Must run in a process where TRITON_INTERPRET is unset at the time triton is imported: under
# the interpreter triton.jit returns InterpretedFunction objects, which cannot be compiled.
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Triton's default software-pipelining depth on NVIDIA targets: the num_stages of a spec (and of
# a launch) that does not name one
DEFAULT_NUM_STAGES = 3

# usable shared memory per block (opt-in maximum), bytes
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _gpu_name(arch: int) -> str:
    # Triton emits sm_90a PTX for arch 90 (wgmma/TMA-capable); ptxas must match
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [
                ptxas_path(),
                "-v",
                "--gpu-name",
                _gpu_name(arch),
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch}:\n{res.stderr}")
    log = res.stdout + res.stderr
    regs, spills = _REGS.search(log), _SPILL.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _attrs(fn, divisible: tuple[str, ...]) -> dict:
    # the JIT's specialisation attribute for 16-divisible arguments, keyed by argument position
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}


_FORK_SPECS: list[dict] = []  # the specs a forked worker of compile_report reads


def _compile_chunk(args: tuple[int, int, tuple[int, ...]]) -> list[dict]:
    lo, hi, archs = args
    return compile_report(_FORK_SPECS[lo:hi], archs, jobs=1)


def compile_report(
    specs: list[dict], archs: tuple[int, ...] = (80, 86, 90), jobs: int | None = None
) -> list[dict]:
    """Compile every spec for every arch it targets; one row per (spec, arch).

    spec: dict with kernel (a triton.jit function), signature, constexprs, num_warps,
    config (a short label) and optionally num_stages (default DEFAULT_NUM_STAGES, Triton's),
    archs (the archs whose launchers pick this spec: it compiles for those of ``archs`` only;
    default every one of ``archs``), divisible_by_16 (argument names the JIT would mark
    16-divisible: 16-byte-aligned pointers, ints that are multiples of 16) and
    enable_fp_fusion (False for a kernel its launcher runs without FMA contraction; default
    True, as triton's launch option). Row keys: kernel, config, arch, num_stages, registers,
    spill_stores, spill_loads, smem (bytes), smem_limit (bytes).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "compile_report needs a process without TRITON_INTERPRET (it was set when triton was "
            "imported, so triton.jit returned interpreter functions); run it in a subprocess "
            "with TRITON_INTERPRET unset"
        )
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1 and len(specs) > 1:
        # fork: the workers inherit the specs (JITFunctions do not pickle); rows keep spec order
        import multiprocessing

        _FORK_SPECS[:] = specs
        step = max(1, len(specs) // (jobs * 4))
        chunks = [(i, min(i + step, len(specs)), archs) for i in range(0, len(specs), step)]
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return [row for part in pool.map(_compile_chunk, chunks) for row in part]
    rows = []
    for spec in specs:
        fn = spec["kernel"]
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(
                f"{getattr(fn, '__name__', fn)!r} is not a JITFunction (was triton imported with "
                "TRITON_INTERPRET=1?)"
            )
        for arch in archs:
            if arch not in spec.get("archs", archs):
                continue
            src = ASTSource(
                fn=fn,
                signature=spec["signature"],
                constexprs=spec["constexprs"],
                attrs=_attrs(fn, spec.get("divisible_by_16", ())),
            )
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={
                    "num_warps": spec["num_warps"],
                    "num_stages": spec.get("num_stages", DEFAULT_NUM_STAGES),
                    "enable_fp_fusion": spec.get("enable_fp_fusion", True),
                },
            )
            regs, st, ld = _ptxas_stats(compiled.asm["ptx"], arch)
            rows.append(
                dict(
                    kernel=fn.__name__,
                    config=spec["config"],
                    arch=arch,
                    num_stages=spec.get("num_stages", DEFAULT_NUM_STAGES),
                    registers=regs,
                    spill_stores=st,
                    spill_loads=ld,
                    smem=int(compiled.metadata.shared),
                    smem_limit=SMEM_LIMIT.get(arch, 48 * 1024),
                )
            )
    return rows


def format_report(rows: list[dict]) -> str:
    """A fixed-width table of compile_report rows."""
    head = f"{'kernel':<28} {'config':<48} {'arch':>4} {'regs':>4} {'spill st/ld':>11} {'smem':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['kernel']:<28} {r['config']:<48} {r['arch']:>4} {r['registers']:>4} "
            f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11} {r['smem']:>7}"
        )
    return "\n".join(lines)


def aligned_variants(specs: list[dict]) -> list[dict]:
    """``specs`` marked as the variants the JIT builds for the common case: 16-byte-aligned
    pointers and ``cols`` a multiple of 16 (vectorised loads). Modifies and returns them."""
    for spec in specs:
        sig = spec["signature"]
        spec["divisible_by_16"] = tuple(
            k for k, v in sig.items() if v.startswith("*") or k == "cols"
        )
        spec["config"] += " aligned"
    return specs
