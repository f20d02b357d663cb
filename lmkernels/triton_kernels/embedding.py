# Triton embedding lookup (a row gather), its deterministic weight gradient, and the fused token
# + positional embedding forward.
#
# Semantics: csrc/include/lmk/embedding.h (the contract shared by every backend).
#   forward   out[t, :] = weight[idx[t], :], a plain copy; the indices are checked (torch ops,
#             before any launch), so a bad index writes nothing.
#   backward  dw[v, :] = scale_v * (the dy rows of the tokens t with idx[t] == v, added in
#             increasing t in fp32), rounded once to dw's dtype; scale_v = 1 / count(v) (the
#             fp64 reciprocal rounded to fp32, as the CPU backend) with scale_grad_by_freq,
#             else grad_scale (rounded to fp32); rows never looked up and the row padding_idx
#             are zeros.
#   token_pos out[t, j] = round_T(scale * tok[ids[t], j] + pe(t, j)) in fp32: pe is the learned
#             table's row pos[t] or the sinusoid (embedding.h, sinusoid_pair); ids, then the
#             positions, are checked (torch ops, before any launch), so a bad one writes nothing.
# T (weight, out, dy, dw, both tables) is fp32/fp16/bf16; indices are int32 or int64.
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
#   _token_pos_fwd_kernel   one program per (TOKENS tokens, BLOCK columns), like the forward:
#                           gathers the tokens' rows of the token table (rows tok_stride apart),
#                           converts them to fp32, times scale, plus pe, rounds once and stores.
#                           SINUSOID (constexpr) picks pe: False, a gathered tile of the
#                           positional table (rows pos_stride apart); True, sinusoid_pair of
#                           embedding.h per element: angle = f64(pos) * inv_freq[j / 2] (f64),
#                           k = rint(angle * 2/pi) (f64), r = f32((angle - k * pi/2 hi) -
#                           k * pi/2 lo), the Cephes f32 polynomials sp, cp of r, and with
#                           q = (k + (j & 1)) & 3 (the odd column's cosine is the sine a quadrant
#                           on) pe = (q & 1 ? cp : sp), negated when q & 2. Both quantities are
#                           computed for every element (the f64 work is about 8 f64 ops per
#                           element, under the memory time on sm_80 / sm_90). Each variant gets
#                           a placeholder for the input it does not read (the sinusoid: the token
#                           table as the positional table; learned: a 1-element f64 tensor as
#                           inv_freq), so both have one signature. The launcher casts an int32
#                           index tensor to int64 when ids and pos differ (one index type per
#                           launch). Traffic: n * dim * itemsize read (+ once more for a learned
#                           table) and written, + the indices.
#
# Numerics: the sum starts from -0.0, the identity of fp32 addition (-0.0 + x == x for every x,
# signed zeros included), and the unrolled loop's steps past the segment's end keep the sum as it
# is, so the result is bitwise the CPU backend's, which starts from the first row. The rounding
# to 16-bit types is round-to-nearest-even (_common.cast_out: the interpreter's own bf16 cast
# truncates). The fused forward follows embedding.h step by step without contraction: it launches
# with enable_fp_fusion=False, so scale * tok + pe is two fp32 roundings (bitwise the reference's
# for a learned table) and the sinusoid's f64 reduction and f32 polynomials round each product
# and sum (mul.rn / add.rn), as the CPU and CUDA backends. rint is the f64 magic-number round,
# (x + 1.5 * 2^52) - 1.5 * 2^52, exact round-to-nearest-even for |x| < 2^51 (here x < 1.4e9):
# libdevice's rint does not run in the interpreter. The sinusoid is not tl.sin / tl.cos (their
# fast paths differ per backend); it is within a few fp32 ulp of the exact value (the reduction
# rounds k * pi/2 hi, up to 2^-22 absolute for positions near 2^31).
#
# Limits and trade-offs:
#   * a segment is summed by one program per column tile, serially (the order is part of the
#     contract): a row hit by very many tokens is a long tail on a GPU (10^6 tokens on one row
#     take 10^6 dependent fp32 adds per column), while the other programs finish early;
#   * dims up to BLOCK of the largest config are one column tile; longer rows are split into
#     several tiles (grid axis 1), so the register use never grows with dim;
#   * n < 2^31 tokens and dim < 2^31; n * dim and rows * weight_stride may exceed 2^31 (every
#     row offset is int64); sinusoid positions lie in [0, 2^31) (checked), so the f64 angle is
#     below 2^31 and k fits int32;
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
    grad_scale,  # fp32: the scale of every row without scale_grad_by_freq
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
    elif grad_scale != 1.0:
        acc = acc * grad_scale
    tl.store(dw_ptr + row * cols + offs, _round_to(acc, dw_ptr.dtype.element_ty), mask=valid & keep)


@triton.jit
def _sinusoid(angle, odd):
    # embedding.h's sinusoid_pair for f64 angles (>= 0, < 2^31), the sine for odd == 0 and the
    # cosine for odd == 1, in f32; every product and sum rounded (launched without contraction).
    # The constants: 2/pi; pi/2 rounded to f64 (hi) and pi/2 - hi (lo), both times k in f64 (a
    # Python float meeting an f64 tensor is an f64 constant); 1.5 * 2^52, (x + M) - M == rint(x)
    # for |x| < 2^51; then the Cephes coefficients (f32 constants: they meet f32 tensors).
    k = (angle * 0.63661977236758134308 + 6755399441055744.0) - 6755399441055744.0
    r = ((angle - k * 1.57079632679489655800e00) - k * 6.12323399573676603587e-17).to(tl.float32)
    r2 = r * r
    sp = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = 4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5)
    cp = 1.0 - 0.5 * r2 + r2 * r2 * c
    q = k.to(tl.int32) + odd  # the cosine is the sine one quadrant on
    v = tl.where((q & 1) != 0, cp, sp)
    return tl.where((q & 2) != 0, -v, v)


@triton.jit
def _token_pos_fwd_kernel(
    tok_ptr,  # (rows, cols) T, rows tok_stride elements apart
    ids_ptr,  # (n,) int32 / int64, all in [0, rows) (checked by the launcher)
    pw_ptr,  # (positions, cols) T, rows pos_stride apart; SINUSOID: a placeholder, not read
    pos_ptr,  # (n,) ids' type, all in [0, positions) / [0, 2^31) (checked by the launcher)
    freq_ptr,  # (ceil(cols / 2),) fp64 inv_freq; learned: a placeholder, not read
    out_ptr,  # (n, cols) T, contiguous
    n,
    cols,
    tok_stride,
    pos_stride,
    scale,  # fp32
    TOKENS: tl.constexpr,  # tokens per program, power of two
    BLOCK: tl.constexpr,  # columns per program, power of two
    SINUSOID: tl.constexpr,  # pe: the sinusoid (True) or the table pw (False)
):
    t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    t_ok = t < n
    c_ok = offs < cols
    mask = t_ok[:, None] & c_ok[None, :]
    row = tl.load(ids_ptr + t, mask=t_ok, other=0).to(tl.int64)
    p = tl.load(pos_ptr + t, mask=t_ok, other=0)
    e = tl.load(tok_ptr + (row * tok_stride)[:, None] + offs[None, :], mask=mask, other=0.0)
    acc = e.to(tl.float32) * scale
    if SINUSOID:
        freq = tl.load(freq_ptr + offs // 2, mask=c_ok, other=0.0)
        angle = p.to(tl.float64)[:, None] * freq[None, :]
        pe = _sinusoid(angle, (offs & 1)[None, :])
    else:
        prow = p.to(tl.int64) * pos_stride
        pe = tl.load(pw_ptr + prow[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = acc + pe
    dst = out_ptr + (t * cols)[:, None] + offs[None, :]
    tl.store(dst, _round_to(acc, out_ptr.dtype.element_ty), mask=mask)


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

# Fused token + positional forward: the forward's tiles (at most 8 elements per thread; the
# sinusoid's f64 temporaries fit without spills, checked by the AOT report).
TOKEN_POS_CONFIGS = (
    (32, EmbeddingConfig(32, 32, 4)),
    (128, EmbeddingConfig(8, 128, 4)),
    (512, EmbeddingConfig(2, 512, 4)),
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


def token_pos_fwd_config(dim: int) -> EmbeddingConfig:
    """Fused token + positional forward launch config for rows of `dim` elements (any T, index
    type and positional encoding)."""
    return _pick(TOKEN_POS_CONFIGS, dim)


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
    grad_scale: float = 1.0,
) -> None:
    """dw = the gradient of embedding_fwd for its table, as embedding.h (deterministic).

    dy: (n, dim) contiguous of T in {fp32, fp16, bf16}; idx: contiguous 1-D int32 / int64, all
    in [0, rows) (those the forward checked; not checked again); dw: (rows, dim) contiguous of
    T, overwritten; padding_idx: a row that gets no gradient, or -1; grad_scale: the scale of
    every row without scale_grad_by_freq (rounded to fp32).
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
        float(grad_scale), BLOCK=cfg.block, UNROLL=UNROLL, num_warps=cfg.num_warps,
    )  # fmt: skip


_F64_PLACEHOLDER: dict[torch.device, torch.Tensor] = {}


def _f64_placeholder(device: torch.device) -> torch.Tensor:
    # the learned variant's inv_freq argument (never read): one f64 element per device
    if device not in _F64_PLACEHOLDER:
        _F64_PLACEHOLDER[device] = torch.zeros(1, dtype=torch.float64, device=device)
    return _F64_PLACEHOLDER[device]


def _check_table(fn: str, what: str, w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"{fn}: {what} must be 2-D, got {w.dim()}-D")
    if w.shape[1] > 1 and w.stride(1) != 1:
        raise ValueError(f"{fn}: the rows of {what} must be contiguous (stride(1) == 1)")


def token_pos_fwd(
    tok_weight: torch.Tensor,
    ids: torch.Tensor,
    pos_weight: torch.Tensor | None,
    pos: torch.Tensor,
    inv_freq: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
) -> None:
    """out = round_T(scale * tok_weight[ids] + P[pos]) in fp32, as embedding.h's fused token +
    positional embedding; P is pos_weight, or the sinusoid when pos_weight is None.

    tok_weight: (rows, dim) of T in {fp32, fp16, bf16}, rows contiguous (stride(1) == 1 when
    dim > 1; any stride(0)); ids, pos: contiguous 1-D int32 / int64 of equal length n (their
    types may differ); pos_weight: None or (positions, dim) of T, rows contiguous; inv_freq:
    the sinusoid's ceil(dim / 2) fp64 frequencies when pos_weight is None, else None; scale:
    rounded to fp32; out: (n, dim) contiguous of T. Raises IndexError naming the first id
    outside [0, rows), then the first position outside [0, positions) (the sinusoid:
    [0, 2^31)), writing nothing.
    """
    fn = "token_pos_fwd"
    _check_dtype(fn, tok_weight.dtype)
    _check_index(fn, ids)
    _check_index(fn, pos)
    _check_table(fn, "tok_weight", tok_weight)
    rows, dim = tok_weight.shape
    n = ids.shape[0]
    if pos.shape[0] != n:
        raise ValueError(f"{fn}: {pos.shape[0]} positions for {n} ids")
    if pos_weight is None:
        half = (dim + 1) // 2
        if inv_freq is None or inv_freq.dtype != torch.float64 or inv_freq.dim() != 1:
            raise ValueError(f"{fn}: the sinusoid needs inv_freq, a 1-D float64 tensor")
        if inv_freq.shape[0] != half or (half > 1 and inv_freq.stride(0) != 1):
            raise ValueError(f"{fn}: inv_freq must hold {half} contiguous values, got "
                             f"{tuple(inv_freq.shape)}")  # fmt: skip
    else:
        if inv_freq is not None:
            raise ValueError(f"{fn}: inv_freq is for the sinusoid; pass None with pos_weight")
        _check_table(fn, "pos_weight", pos_weight)
        if pos_weight.dtype != tok_weight.dtype or pos_weight.shape[1] != dim:
            raise ValueError(f"{fn}: pos_weight must be (positions, {dim}) of "
                             f"{tok_weight.dtype}, got {tuple(pos_weight.shape)} of "
                             f"{pos_weight.dtype}")  # fmt: skip
    if out.dtype != tok_weight.dtype or tuple(out.shape) != (n, dim):
        raise ValueError(f"{fn}: out must be ({n}, {dim}) of {tok_weight.dtype}, got "
                         f"{tuple(out.shape)} of {out.dtype}")  # fmt: skip
    if not out.is_contiguous():
        raise ValueError(f"{fn}: out must be contiguous")
    reference.check_indices(ids, rows)
    reference.check_positions(pos, pos_weight)
    if n == 0 or dim == 0:
        return
    if ids.dtype != pos.dtype:  # one index type per launch: the wider (no value changes)
        ids, pos = ids.long(), pos.long()
    sinusoid = pos_weight is None
    if sinusoid:
        pw, pos_stride, freq = tok_weight, 0, inv_freq
    else:
        pw, pos_stride, freq = pos_weight, pos_weight.stride(0), _f64_placeholder(out.device)
    cfg = token_pos_fwd_config(dim)
    grid = (triton.cdiv(n, cfg.tokens), triton.cdiv(dim, cfg.block))
    _token_pos_fwd_kernel[grid](
        tok_weight, ids, pw, pos, freq, out, n, dim, tok_weight.stride(0), pos_stride,
        float(torch.tensor(scale, dtype=torch.float32)), TOKENS=cfg.tokens, BLOCK=cfg.block,
        SINUSOID=sinusoid, num_warps=cfg.num_warps, enable_fp_fusion=False,
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
        "grad_scale": "fp32",
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


def _token_pos_spec(t: str, idx_ty: str, sinusoid: bool, cfg: EmbeddingConfig) -> dict:
    sig = {
        "tok_ptr": f"*{t}",
        "ids_ptr": f"*{idx_ty}",
        "pw_ptr": f"*{t}",
        "pos_ptr": f"*{idx_ty}",
        "freq_ptr": "*fp64",
        "out_ptr": f"*{t}",
        "n": "i32",
        "cols": "i32",
        "tok_stride": "i32",
        "pos_stride": "i32",
        "scale": "fp32",
        "TOKENS": "constexpr",
        "BLOCK": "constexpr",
        "SINUSOID": "constexpr",
    }
    return dict(
        kernel=_token_pos_fwd_kernel,
        signature=sig,
        constexprs=dict(TOKENS=cfg.tokens, BLOCK=cfg.block, SINUSOID=sinusoid),
        num_warps=cfg.num_warps,
        # launched so (no contraction of products into FMAs); a compile option, not a constexpr
        enable_fp_fusion=False,
        config=f"{t} idx:{idx_ty} {'sinusoid' if sinusoid else 'learned'} {cfg}",
    )


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) embedding_fwd / embedding_bwd /
    token_pos_fwd can launch.

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
    for dtype in _DTYPES:
        for idx_ty in ("i32", "i64"):
            for sinusoid in (False, True):
                specs += [
                    _token_pos_spec(_TY[dtype], idx_ty, sinusoid, cfg)
                    for _, cfg in TOKEN_POS_CONFIGS
                ]
    if not aligned:
        return specs
    specs = aot.aligned_variants(specs)
    for spec in specs:
        # row strides the JIT would mark 16-divisible too (the sinusoid's pos_stride is 0)
        spec["divisible_by_16"] += tuple(
            s for s in ("w_stride", "tok_stride", "pos_stride") if s in spec["signature"]
        )
    return specs
