"""Static GPU resource report: every Triton kernel config and every CUDA kernel, per arch.

    python -m lmkernels gpu-report [--json] [--archs 80,86,90]

Triton: each config a launcher can choose is compiled ahead of time for the arch (no GPU
needed) and assembled by ptxas -v (registers, spill bytes; shared memory from Triton's
metadata). CUDA: the built ``lmkernels/_cuda`` module's kernels, read with cuobjdump.
Must run without TRITON_INTERPRET (the test suite runs it in a subprocess).
"""

from __future__ import annotations

import importlib
import json

# one entry per op module in lmkernels/triton_kernels that has aot_specs()
TRITON_MODULES = ("softmax", "norm", "embedding", "rotary", "attention", "cross_entropy")
# the Triton targets: sm_80 (A100: 163 KB of shared memory per block), sm_86 (the 99 KB GPUs:
# 8.6, 8.9, 12.x) and sm_90 (H100: 227 KB)
ARCHS = (80, 86, 90)
# The modules with a config table of their own for sm_86 (its specs name their archs) compile
# for it. The others have one table, whose programs use at most a few hundred bytes of shared
# memory (the row reductions' scratch; the test checks it against the 99 KB limit), and compile
# for sm_80 and sm_90 only: sm_86 takes sm_80's instruction set, register file and configs,
# and 777 more compiles would add minutes to every test run.
SM86_MODULES = ("attention",)


def triton_report(archs: tuple[int, ...] = ARCHS) -> list[dict]:
    from lmkernels.triton_kernels import aot

    specs = []
    for name in TRITON_MODULES:
        own = importlib.import_module(f"lmkernels.triton_kernels.{name}").aot_specs()
        if name not in SM86_MODULES:
            for spec in own:
                spec.setdefault("archs", tuple(a for a in archs if a != 86))
        specs += own
    return aot.compile_report(specs, archs)


def cuda_report() -> tuple[list[dict], str | None]:
    """(rows, None), or ([], reason) when the CUDA module is not built here."""
    try:
        from lmkernels.cuda_resources import cuda_kernel_resources

        return cuda_kernel_resources(), None
    except Exception as e:  # noqa: BLE001 - reported, not raised: a CPU-only install is valid
        return [], f"{type(e).__name__}: {e}"


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lmkernels gpu-report")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)),
                   help="Triton target archs (default 80,86,90)")  # fmt: skip
    a = p.parse_args(argv)
    archs = tuple(int(x) for x in a.archs.split(","))
    triton_rows = triton_report(archs)
    cuda_rows, cuda_why = cuda_report()
    if a.json:
        print(json.dumps({"triton": triton_rows, "cuda": cuda_rows, "cuda_unavailable": cuda_why}))
        return 0
    from lmkernels.triton_kernels.aot import format_report

    print("Triton kernels (AOT compiled, ptxas -v):")
    print(format_report(triton_rows))
    print()
    if cuda_why:
        print(f"CUDA module: not available ({cuda_why})")
    else:
        print("CUDA kernels (cuobjdump -res-usage of lmkernels/_cuda):")
        keys = list(cuda_rows[0]) if cuda_rows else []
        print("  ".join(keys))
        for r in cuda_rows:
            print("  ".join(str(r[k]) for k in keys))
    spills = [r for r in triton_rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(triton_rows)} Triton kernel builds, {len(spills)} with spills; "
          f"{len(cuda_rows)} CUDA kernel builds")  # fmt: skip
    return 0
