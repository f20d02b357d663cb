# Triton rotary position embedding, forward and backward (the transposed map), both layouts.
#
# Semantics: csrc/include/lmk/rotary.h (the contract shared by every backend). x is seen as
# (rows, d), d even, h = d / 2; row r reads the cos / sin rows that start at element offsets
# cos_off[r] / sin_off[r] (int64, unit column stride), so tables broadcast over heads / batch are
# never materialised (the launcher builds the offsets with lmkernels.ops.rotary._table).
# Each pair (lo, hi) = (j, j + h) (rotate_half) or (2i, 2i + 1) (interleaved), a = x[lo],
# b = x[hi], ca / cb = cos[lo] / cos[hi], sa / sb = sin[lo] / sin[hi]:
#   forward   out[lo] = a ca - b sa,  out[hi] = b cb + a sb
#   backward  dx[lo]  = a ca + b sb,  dx[hi]  = b cb - a sa        (a, b read from dy)
# in fp32, with the fused multiply-adds of the CPU backend (csrc/cpu/rotary.cpp), rounded once
# to T (round-to-nearest-even, _common.cast_out). T (x, out) is fp32 / fp16 / bf16; cos and sin
# are T or fp32 (no fp64: the op module sends fp64 elsewhere).
#
# Kernel:
#   _rotary_kernel   one program per (ROWS rows, BLOCK pairs of each row); grid axis 0 over the
#                    row blocks, axis 1 over the column blocks of the half width h. INTERLEAVED
#                    and BACKWARD are constexprs. Each program loads both elements of its pairs,
#                    then stores both, so out may be x (in place): every element is read and
#                    written by the same program, read first. Traffic: x read once, out written
#                    once, cos / sin read once per row of x (mostly L2 hits when broadcast).
#
# Limits and trade-offs:
#   * one tile config for every d: each extra config would add 20 AOT specs (5 (T, C) type
#     pairs x 2 layouts x 2 directions), and the specs are capped at 24. The (16, 32) tile keeps
#     4 pairs per thread on 4 warps; rows with h < 32 leave lanes idle (d = 64 and 128 fill it),
#     longer rows are split into column tiles (grid axis 1), so registers never grow with d;
#   * the interleaved layout loads lo and hi with a column stride of 2 (same cache lines, so the
#     same DRAM traffic, but no vector loads);
#   * rows < 2^31 and d < 2^31; rows * d may exceed 2^31 (row offsets are int64);
#   * register use is bounded by the config, checked by the AOT report (aot_specs() +
#     lmkernels.triton_kernels.aot): zero spills on sm_80 / sm_90 for every spec.
# The AOT report compiles the signatures without Triton's value specialisation (ints == 1,
# 16-byte divisibility); those specialised variants only remove instructions.
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmkernels.ops.rotary import _table
from lmkernels.triton_kernels import aot
from lmkernels.triton_kernels._common import cast_out as _round_to


@triton.jit
def _rotary_kernel(
    x_ptr,  # (rows, 2 * half) T, contiguous
    cos_ptr,  # C (T or fp32): row r at cos_off[r], unit column stride
    sin_ptr,  # C: row r at sin_off[r]
    cos_off_ptr,  # (rows,) int64 element offsets
    sin_off_ptr,  # (rows,) int64
    out_ptr,  # (rows, 2 * half) T, contiguous; may be x_ptr
    rows,
    half,  # h = d / 2: pairs per row
    ROWS: tl.constexpr,  # rows per program, power of two
    BLOCK: tl.constexpr,  # pairs per row per program, power of two
    INTERLEAVED: tl.constexpr,  # pairs (2i, 2i + 1), else (j, j + h)
    BACKWARD: tl.constexpr,  # the transposed map
):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    r_ok = r < rows
    mask = r_ok[:, None] & (j < half)[None, :]
    if INTERLEAVED:
        lo = 2 * j
        hi = lo + 1
    else:
        lo = j
        hi = j + half
    xrow = (r * (2 * half))[:, None]
    crow = tl.load(cos_off_ptr + r, mask=r_ok, other=0)[:, None]
    srow = tl.load(sin_off_ptr + r, mask=r_ok, other=0)[:, None]
    a = tl.load(x_ptr + xrow + lo[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + xrow + hi[None, :], mask=mask, other=0.0).to(tl.float32)
    ca = tl.load(cos_ptr + crow + lo[None, :], mask=mask, other=0.0).to(tl.float32)
    cb = tl.load(cos_ptr + crow + hi[None, :], mask=mask, other=0.0).to(tl.float32)
    sa = tl.load(sin_ptr + srow + lo[None, :], mask=mask, other=0.0).to(tl.float32)
    sb = tl.load(sin_ptr + srow + hi[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y_lo = tl.fma(b, sb, a * ca)
        y_hi = b * cb - a * sa
    else:
        y_lo = a * ca - b * sa
        y_hi = tl.fma(a, sb, b * cb)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + xrow + lo[None, :], _round_to(y_lo, ty), mask=mask)
    tl.store(out_ptr + xrow + hi[None, :], _round_to(y_hi, ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RotaryConfig:
    """A (rows, block) program tile of pairs on num_warps warps; rows longer than block pairs
    are split into column tiles."""

    rows: int  # rows per program
    block: int  # pairs per row per program
    num_warps: int

    def __str__(self) -> str:
        return f"r{self.rows}b{self.block}w{self.num_warps}"


# (largest d, config), first match; the last entry serves every longer row in column tiles.
# One entry: see the header (every config costs 20 AOT specs).
CONFIGS = ((None, RotaryConfig(16, 32, 4)),)


def rotary_config(d: int) -> RotaryConfig:
    """The launch config for rows of d elements (any types, layout, direction)."""
    for limit, cfg in CONFIGS:
        if limit is None or d <= limit:
            return cfg
    raise AssertionError("the last config has no limit")


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    interleaved: bool,
    backward: bool,
) -> None:
    """out = the rotary map of x (its transpose if ``backward``), as rotary.h.

    x: (..., d) of T in {fp32, fp16, bf16}, d even; out: x's shape and dtype, contiguous (may be
    x itself); cos, sin: broadcastable to x, both of T or both fp32 (never materialised: one
    int64 offset per row of x).
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"rotary: dtype {x.dtype} is not supported (float32, float16, bfloat16)")
    if cos.dtype != sin.dtype or cos.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"rotary: cos and sin must both be {x.dtype} or float32, got "
                         f"{cos.dtype} and {sin.dtype}")  # fmt: skip
    if out.dtype != x.dtype or out.shape != x.shape or not out.is_contiguous():
        raise ValueError("rotary: out must be contiguous, of x's shape and dtype")
    d = x.shape[-1] if x.dim() else 0
    if d % 2:
        raise ValueError(f"rotary: the last dim must be even, got {d}")
    if x.numel() == 0:
        return
    (cos_t, cos_off), (sin_t, sin_off) = _table(cos, x), _table(sin, x)
    x2 = x.reshape(-1, d)  # a view when x is contiguous (out may be x: then x2 aliases out)
    rows = x2.shape[0]
    cfg = rotary_config(d)
    grid = (triton.cdiv(rows, cfg.rows), triton.cdiv(d // 2, cfg.block))
    _rotary_kernel[grid](
        x2, cos_t, sin_t, cos_off, sin_off, out.view(-1, d), rows, d // 2,
        ROWS=cfg.rows, BLOCK=cfg.block, INTERLEAVED=bool(interleaved),
        BACKWARD=bool(backward), num_warps=cfg.num_warps,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# AOT spec list: every (kernel, signature, constexprs, num_warps) the launcher can pick
# ---------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _types() -> list[tuple[str, str]]:
    """(T, C) pairs: C is T, or fp32 for 16-bit T."""
    out = []
    for dtype in _DTYPES:
        t = _TY[dtype]
        out += [(t, t)] + ([(t, "fp32")] if t != "fp32" else [])
    return out


def _spec(t: str, c: str, cfg: RotaryConfig, interleaved: bool, backward: bool) -> dict:
    sig = {
        "x_ptr": f"*{t}",
        "cos_ptr": f"*{c}",
        "sin_ptr": f"*{c}",
        "cos_off_ptr": "*i64",
        "sin_off_ptr": "*i64",
        "out_ptr": f"*{t}",
        "rows": "i32",
        "half": "i32",
        "ROWS": "constexpr",
        "BLOCK": "constexpr",
        "INTERLEAVED": "constexpr",
        "BACKWARD": "constexpr",
    }
    const = dict(ROWS=cfg.rows, BLOCK=cfg.block, INTERLEAVED=interleaved, BACKWARD=backward)
    layout = "pairs" if interleaved else "halves"
    return dict(
        kernel=_rotary_kernel,
        signature=sig,
        constexprs=const,
        num_warps=cfg.num_warps,
        config=f"{t} cs:{c} {cfg} {layout} {'bwd' if backward else 'fwd'}",
    )


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) rotary() can launch.

    Each spec is a dict with kernel (the JITFunction), signature, constexprs, num_warps and
    config (a short label), for lmkernels.triton_kernels.aot.compile_report. aligned=True gives
    the variants the JIT builds for 16-byte-aligned tensors and h a multiple of 16 (vectorised
    loads); the default gives the generic variants.
    """
    specs = [
        _spec(t, c, cfg, interleaved, backward)
        for t, c in _types()
        for _, cfg in CONFIGS
        for interleaved in (False, True)
        for backward in (False, True)
    ]
    if not aligned:
        return specs
    specs = aot.aligned_variants(specs)
    for spec in specs:
        spec["divisible_by_16"] += ("half",)
    return specs
