# Triton embedding lookup (a row gather) and its deterministic weight gradient.
#
# Semantics: csrc/include/lmk/embedding.h (the contract shared by every backend).
#   forward   out[t, :] = weight[idx[t], :], a plain copy; the indices are checked (torch ops,
#             before any launch), so a bad index writes nothing.
#   backward  dw[v, :] = scale_v * (the dy rows of the tokens t with idx[t] == v, added in
#             increasing t in fp32), rounded once to dw's dtype; scale_v = 1 / count(v) (the
#             fp64 reciprocal rounded to fp32, as the CPU backend) with scale_grad_by_freq,
#             else 1; rows never looked up and the row padding_idx are zeros.
# T (weight, out, dy, dw) is fp32/fp16/bf16; indices are int32 or int64.
#
# Kernels:
#   _embedding_fwd_kernel   one program per (TOKENS tokens, BLOCK columns): loads the tokens'
#                           indices, gathers a (TOKENS, BLOCK) tile of rows (rows weight_stride
#                           elements apart) and stores it. A pure copy, so it moves the bits as
#                           16- or 32-bit integers (the launcher views the tensors so): the
#                           kernel depends on the element size only, never on the float type.
#                           Traffic: n * dim * itemsize read + written, + the indices.
#   _embedding_bwd_kernel   one program per (segment, BLOCK columns). The launcher sorts the
#                           tokens by index, stably (torch.sort(stable=True): within a row the
#                           tokens stay in increasing t), and splits the sorted list into
#                           segments, one per distinct row (torch.unique_consecutive + cumsum:
#                           segment s is order[ends[s - 1] .. ends[s]) for row rows[s]). The
#                           program adds the segment's dy rows in that order in fp32, UNROLL rows
#                           loaded before they are added (one after the other, in order), scales,
#                           rounds and stores its row of dw; dw is zeroed first (torch), which
#                           covers the rows never looked up and padding_idx (its segment stores
#                           nothing). No atomics: every dw element is written by one program, and
#                           the order of the additions depends only on idx. Traffic: dy read once,
#                           dw written once (+ once by the zeroing), + the sort's.
#
# Numerics: the sum starts from -0.0, the identity of fp32 addition (-0.0 + x == x for every x,
# signed zeros included), and the unrolled loop's steps past the segment's end keep the sum as it
# is, so the result is bitwise the CPU backend's, which starts from the first row. The rounding
# to 16-bit types is round-to-nearest-even (_common.cast_out: the interpreter's own bf16 cast
# truncates).
#
# Limits and trade-offs:
#   * a segment is summed by one program per column tile, serially (the order is part of the
#     contract): a row hit by very many tokens is a long tail on a GPU (10^6 tokens on one row
#     take 10^6 dependent fp32 adds per column), while the other programs finish early;
#   * dims up to BLOCK of the largest config are one column tile; longer rows are split into
#     several tiles (grid axis 1), so the register use never grows with dim;
#   * n < 2^31 tokens and dim < 2^31; n * dim and rows * weight_stride may exceed 2^31 (every
#     row offset is int64);
#   * the backward's sort, unique and cumsum are torch ops: unique_consecutive synchronises
#     with the host (the number of segments sizes the grid), and so does the forward's index
#     check;
#   * register use is bounded by the configs (8 elements per thread at most, 1 to 4 warps),
#     checked by the AOT report (aot_specs() + lmkernels.triton_kernels.aot): zero spills on
#     sm_80 / sm_90 for every config the launchers can pick.
# The AOT report compiles the signatures without Triton's value specialisation (ints == 1,
# 16-byte divisibility); those specialised variants only remove instructions.
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmkernels import reference
from lmkernels.triton_kernels import aot
from lmkernels.triton_kernels._common import cast_out as _round_to

# Backward: dy rows loaded before they are added (in order), per loop iteration.
UNROLL = 8


@triton.jit
def _embedding_fwd_kernel(
    w_ptr,  # (rows, cols) table, rows w_stride elements apart; T's bits as i16 / i32
    idx_ptr,  # (n,) int32 / int64, all in [0, rows) (checked by the launcher)
    out_ptr,  # (n, cols) contiguous, w_ptr's type
    n,
    cols,
    w_stride,
    TOKENS: tl.constexpr,  # tokens per program, power of two
    BLOCK: tl.constexpr,  # columns per program, power of two
):
    t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t_ok = t < n
    row = tl.load(idx_ptr + t, mask=t_ok, other=0).to(tl.int64)
    mask = t_ok[:, None] & (offs < cols)[None, :]
    v = tl.load(w_ptr + (row * w_stride)[:, None] + offs[None, :], mask=mask)
    tl.store(out_ptr + (t * cols)[:, None] + offs[None, :], v, mask=mask)


@triton.jit
def _embedding_bwd_kernel(
    dy_ptr,  # (n, cols) T, contiguous
    order_ptr,  # (n,) int64: the tokens sorted by index, stably
    rows_ptr,  # (segments,) int64: the row of each segment, increasing
    ends_ptr,  # (segments,) int64: segment s is order[ends[s - 1] .. ends[s]) (ends[-1] = 0)
    dw_ptr,  # (rows, cols) T, contiguous, zeroed; the segments' rows are written
    cols,
    padding_idx,  # a row that gets no gradient, or -1
    scale_grad_by_freq,  # 0 / 1: scale by 1 / count
    BLOCK: tl.constexpr,  # columns per program, power of two
    UNROLL: tl.constexpr,  # dy rows loaded before they are added
):
    seg = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < cols
    row = tl.load(rows_ptr + seg)
    end = tl.load(ends_ptr + seg)
    start = tl.load(ends_ptr + seg - 1, mask=seg > 0, other=0)
    keep = row != padding_idx
    stop = tl.where(keep, end, start)  # the padding row sums nothing and stores nothing
    # the sum starts from -0.0, the identity of fp32 addition. (Not a -0.0 literal: Triton turns
    # every constant equal to 0 into +0.0, so the bits are built.)
    acc = tl.full([BLOCK], -(2**31), tl.int32).to(tl.float32, bitcast=True)
    for s0 in range(start, stop, UNROLL):
        # strictly in token order; the tokens past the segment's end add nothing
        for i in tl.static_range(UNROLL):
            s = s0 + i
            tok = tl.load(order_ptr + s, mask=s < stop, other=0)
            x = tl.load(dy_ptr + tok * cols + offs, mask=valid & (s < stop), other=0.0)
            acc = tl.where(s < stop, acc + x.to(tl.float32), acc)
    if scale_grad_by_freq != 0:
        # 1 / count rounded once to fp32 (IEEE fp64 division, exact count), as the CPU backend
        acc = acc * (1.0 / (end - start).to(tl.float64)).to(tl.float32)
    tl.store(dw_ptr + row * cols + offs, _round_to(acc, dw_ptr.dtype.element_ty), mask=valid & keep)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingConfig:
    """A (tokens, block) program tile on num_warps warps; rows longer than block are split
    into column tiles."""

    tokens: int  # tokens per program (the backward: 1, a segment)
    block: int  # columns per program
    num_warps: int

    def __str__(self) -> str:
        return f"t{self.tokens}b{self.block}w{self.num_warps}"


# (largest dim, config), first match; the last entry serves every longer row in column tiles.
# Forward: 1024-element tiles on 4 warps (8 elements per thread); short rows take several tokens
# per program so that the lanes stay busy.
FWD_CONFIGS = (
    (32, EmbeddingConfig(32, 32, 4)),
    (128, EmbeddingConfig(8, 128, 4)),
    (512, EmbeddingConfig(2, 512, 4)),
    (None, EmbeddingConfig(1, 1024, 4)),
)
# Backward: one segment per program, at most 8 columns per thread.
BWD_CONFIGS = (
    (32, EmbeddingConfig(1, 32, 1)),
    (128, EmbeddingConfig(1, 128, 1)),
    (512, EmbeddingConfig(1, 512, 2)),
    (None, EmbeddingConfig(1, 1024, 4)),
)


def _pick(configs, dim: int) -> EmbeddingConfig:
    for limit, cfg in configs:
        if limit is None or dim <= limit:
            return cfg
    raise AssertionError("the last config has no limit")


def embedding_fwd_config(dim: int) -> EmbeddingConfig:
    """Forward launch config for rows of `dim` elements (any T, any index type)."""
    return _pick(FWD_CONFIGS, dim)


def embedding_bwd_config(dim: int) -> EmbeddingConfig:
    """Backward launch config for rows of `dim` elements (any T)."""
    return _pick(BWD_CONFIGS, dim)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# the forward copies bits: T viewed as the integer type of its size
_BITS = {2: torch.int16, 4: torch.int32}


def _check_dtype(fn: str, dtype: torch.dtype) -> None:
    # the types aot_specs() lists; anything else would compile a kernel the AOT report never saw
    if dtype not in _DTYPES:
        raise ValueError(f"{fn}: dtype {dtype} is not supported (float32, float16, bfloat16)")


def _check_index(fn: str, idx: torch.Tensor) -> None:
    if idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{fn}: indices must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 1 or (idx.numel() > 1 and idx.stride(0) != 1):
        raise ValueError(f"{fn}: indices must be a contiguous 1-D tensor")


def embedding_fwd(weight: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out = weight[idx], as embedding.h.

    weight: (rows, dim) of T in {fp32, fp16, bf16} whose rows are contiguous (stride(1) == 1
    when dim > 1; any stride(0)); idx: contiguous 1-D int32 / int64; out: (n, dim) contiguous
    of T. Raises IndexError naming the first index outside [0, rows), writing nothing.
    """
    _check_dtype("embedding_fwd", weight.dtype)
    _check_index("embedding_fwd", idx)
    rows, dim = weight.shape
    n = idx.shape[0]
    if out.dtype != weight.dtype or tuple(out.shape) != (n, dim):
        raise ValueError(f"embedding_fwd: out must be ({n}, {dim}) of {weight.dtype}, got "
                         f"{tuple(out.shape)} of {out.dtype}")  # fmt: skip
    if dim > 1 and weight.stride(1) != 1:
        raise ValueError("embedding_fwd: the weight's rows must be contiguous (stride(1) == 1)")
    if not out.is_contiguous():
        raise ValueError("embedding_fwd: out must be contiguous")
    if n == 0:
        return
    reference.check_indices(idx, rows)
    if dim == 0:
        return
    cfg = embedding_fwd_config(dim)
    bits = _BITS[weight.element_size()]
    grid = (triton.cdiv(n, cfg.tokens), triton.cdiv(dim, cfg.block))
    _embedding_fwd_kernel[grid](
        weight.view(bits), idx, out.view(bits), n, dim, weight.stride(0),
        TOKENS=cfg.tokens, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip


def embedding_bwd(
    dy: torch.Tensor,
    idx: torch.Tensor,
    dw: torch.Tensor,
    padding_idx: int,
    scale_grad_by_freq: bool,
) -> None:
    """dw = the gradient of embedding_fwd for its table, as embedding.h (deterministic).

    dy: (n, dim) contiguous of T in {fp32, fp16, bf16}; idx: contiguous 1-D int32 / int64, all
    in [0, rows) (those the forward checked; not checked again); dw: (rows, dim) contiguous of
    T, overwritten; padding_idx: a row that gets no gradient, or -1.
    """
    _check_dtype("embedding_bwd", dy.dtype)
    _check_index("embedding_bwd", idx)
    n, dim = dy.shape
    if idx.shape[0] != n:
        raise ValueError(f"embedding_bwd: {idx.shape[0]} indices for {n} rows of dy")
    if dw.dtype != dy.dtype or dw.dim() != 2 or dw.shape[1] != dim:
        raise ValueError(f"embedding_bwd: dw must be (rows, {dim}) of {dy.dtype}, got "
                         f"{tuple(dw.shape)} of {dw.dtype}")  # fmt: skip
    if not (dy.is_contiguous() and dw.is_contiguous()):
        raise ValueError("embedding_bwd: dy and dw must be contiguous")
    dw.zero_()
    if n == 0 or dim == 0:
        return
    sorted_idx, order = torch.sort(idx.long(), stable=True)
    seg_rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    ends = torch.cumsum(counts, 0)
    cfg = embedding_bwd_config(dim)
    grid = (seg_rows.shape[0], triton.cdiv(dim, cfg.block))
    _embedding_bwd_kernel[grid](
        dy, order, seg_rows, ends, dw, dim, int(padding_idx), int(bool(scale_grad_by_freq)),
        BLOCK=cfg.block, UNROLL=UNROLL, num_warps=cfg.num_warps,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# AOT spec list: every (kernel, signature, constexprs, num_warps) the launchers can pick
# ---------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _fwd_spec(bits: str, idx_ty: str, cfg: EmbeddingConfig) -> dict:
    sig = {
        "w_ptr": f"*{bits}",
        "idx_ptr": f"*{idx_ty}",
        "out_ptr": f"*{bits}",
        "n": "i32",
        "cols": "i32",
        "w_stride": "i32",
        "TOKENS": "constexpr",
        "BLOCK": "constexpr",
    }
    return dict(
        kernel=_embedding_fwd_kernel,
        signature=sig,
        constexprs=dict(TOKENS=cfg.tokens, BLOCK=cfg.block),
        num_warps=cfg.num_warps,
        config=f"{bits} idx:{idx_ty} {cfg}",
    )


def _bwd_spec(t: str, cfg: EmbeddingConfig) -> dict:
    sig = {
        "dy_ptr": f"*{t}",
        "order_ptr": "*i64",
        "rows_ptr": "*i64",
        "ends_ptr": "*i64",
        "dw_ptr": f"*{t}",
        "cols": "i32",
        "padding_idx": "i32",
        "scale_grad_by_freq": "i32",
        "BLOCK": "constexpr",
        "UNROLL": "constexpr",
    }
    return dict(
        kernel=_embedding_bwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK=cfg.block, UNROLL=UNROLL),
        num_warps=cfg.num_warps,
        config=f"{t} {cfg} x{UNROLL}",
    )


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) embedding_fwd / embedding_bwd can launch.

    Each spec is a dict with kernel (the JITFunction), signature, constexprs, num_warps and
    config (a short label), for lmkernels.triton_kernels.aot.compile_report. aligned=True gives
    the variants the JIT builds for the common case of 16-byte-aligned tensors and dim (and the
    weight's row stride) a multiple of 16 (vectorised loads); the default gives the generic
    variants.
    """
    specs = []
    for bits in ("i16", "i32"):
        for idx_ty in ("i32", "i64"):
            specs += [_fwd_spec(bits, idx_ty, cfg) for _, cfg in FWD_CONFIGS]
    for dtype in _DTYPES:
        specs += [_bwd_spec(_TY[dtype], cfg) for _, cfg in BWD_CONFIGS]
    if not aligned:
        return specs
    specs = aot.aligned_variants(specs)
    for spec in specs:
        if "w_stride" in spec["signature"]:
            spec["divisible_by_16"] += ("w_stride",)
    return specs
