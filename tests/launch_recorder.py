"""Test helper: record the Triton launches a launcher makes, as the JIT would key them, to check
that a module's ``aot_specs()`` lists every (kernel, signature, constexprs, num_warps,
num_stages, enable_fp_fusion) it can launch (and nothing it never launches). A launch or spec
without num_stages has Triton's default (aot.DEFAULT_NUM_STAGES). Specs that name their
``archs`` are per-arch: compare a launch on arch a with ``spec_keys(specs, a)``."""

from __future__ import annotations

import torch

from lmkernels.triton_kernels.aot import DEFAULT_NUM_STAGES

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int16: "i16",
       torch.int32: "i32", torch.int64: "i64", torch.float64: "fp64"}  # fmt: skip


def kernel_name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


class Recorder:
    """Stands in for a kernel (``monkeypatch.setattr(module, name, Recorder(kernel, seen))``):
    adds each launch's key to ``seen``, then launches the real kernel (``run=False``: launches
    nothing, for launches whose configs another run has already executed)."""

    def __init__(self, kernel, seen: set, run: bool = True):
        self.kernel, self.seen, self.run = kernel, seen, run

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages=DEFAULT_NUM_STAGES, enable_fp_fusion=True,
                   **const):  # fmt: skip
            names = [a for a in self.kernel.arg_names if a not in const]
            sig = {}
            for name, a in zip(names, args, strict=True):
                if isinstance(a, torch.Tensor):
                    sig[name] = "*" + _TY[a.dtype]
                elif isinstance(a, float):
                    sig[name] = "fp32"  # as the JIT types a Python float
                else:
                    sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
            key = (kernel_name(self.kernel), tuple(sorted(sig.items())),
                   tuple(sorted(const.items())))  # fmt: skip
            self.seen.add((*key, num_warps, num_stages, enable_fp_fusion))
            if not self.run:
                return None
            return self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages,
                                     enable_fp_fusion=enable_fp_fusion, **const)  # fmt: skip

        return launch


def spec_key(s: dict) -> tuple:
    """The key of one aot_specs() entry, comparable with Recorder's."""
    sig = {n: t for n, t in s["signature"].items() if t != "constexpr"}
    const = tuple(sorted(s["constexprs"].items()))
    return (kernel_name(s["kernel"]), tuple(sorted(sig.items())), const, s["num_warps"],
            s.get("num_stages", DEFAULT_NUM_STAGES), s.get("enable_fp_fusion", True))  # fmt: skip


def spec_keys(specs: list[dict], arch: int) -> set:
    """The keys of the specs compiled for ``arch`` (a spec without ``archs``: every arch)."""
    return {spec_key(s) for s in specs if arch in s.get("archs", (arch,))}
