"""Pieces shared by the Triton kernel modules: the rounding output cast, a product that is never
contracted, and the row-kernel launch configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def cast_out(y, OUT: tl.constexpr):
    # Convert fp32/fp64 results to the output dtype, rounding to nearest even. For bf16 the
    # rounding is done in integer arithmetic (4 ops, free in a memory-bound kernel): the
    # interpreter's fp32 -> bf16 cast truncates, and this makes the code it runs round exactly
    # as the GPU's cvt.rn does (NaN stays NaN, overflow gives inf).
    if OUT == tl.bfloat16:
        bits = y.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    return y.to(OUT)


@triton.jit
def mul_rn(a, b):
    # a * b rounded to fp32 and never contracted into a later add or subtract (libdevice's
    # mul_rn; the interpreter has no libdevice, and its numpy product is rounded anyway). Where
    # one value is formed in two places (a pass that recomputes it, or a target's logit read
    # apart from its row), a contraction in one place and not the other makes them differ.
    if INTERPRET:
        y = a * b
    else:
        y = libdevice.mul_rn(a, b)
    return y


@dataclass(frozen=True)
class RowConfig:
    """Launch configuration of a row kernel: one register tile of ``block`` columns, or
    ``looped`` over chunks of ``block`` columns, on ``num_warps`` warps."""

    block: int  # single tile: next power of two >= cols; looped: chunk length
    num_warps: int
    looped: bool

    def __str__(self) -> str:
        return f"{'loop' if self.looped else 'tile'}{self.block}w{self.num_warps}"
