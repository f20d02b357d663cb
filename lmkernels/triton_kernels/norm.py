# Triton layer_norm / rms_norm, each with an optional fused residual add, over the rows of a
# row-major (rows, cols) matrix; forward and backward.
#
# Semantics: csrc/include/lmk/norm.h (the contract shared by every backend). Types: T (x, y, dy)
# is fp32/fp16/bf16; S (residual, h, dh_out, dh) is T, or fp32 when T is 16-bit; weight, bias,
# mean, rstd, dw, db are fp32 (A).
#   forward   h = x + residual rounded to S and stored (or h = x); from h as stored, in fp32:
#             mean = sum h / cols (rms: 0), var = sum (h - mean)^2 / cols (rms: sum h^2 / cols),
#             rstd = 1 / sqrt(var + eps), xhat = (h - mean) * rstd, y = xhat * w + b rounded
#             once to T. mean (not for rms) and rstd are stored per row.
#   backward  g = dy * w, c1 = sum g / cols (rms: 0), c2 = sum g * xhat / cols,
#             dh = rstd * (g - c1 - xhat * c2) + dh_out, written in S;
#             dw = sum over rows of dy * xhat, db = sum over rows of dy (fp32).
# Every load is converted to fp32 before any arithmetic (the interpreter's 16-bit arithmetic is
# wrong, and fp32 is the contract's accumulation type). The per-row scalars use IEEE division
# and square root (div_rn, sqrt_rn; one of each per row, so free), the rounding to T/S is
# round-to-nearest-even everywhere (see _round_to). The layer-norm forward sums h - h[row, 0]
# rather than h (see _row_shift): exact for the values near h[row, 0], so a mean far larger than
# the std costs no digits of the centred values. NaN/inf in a row reach only that row's y, h,
# mean, rstd and dh (and, through the column sums, the dw/db columns it touches, as in torch).
# eps is used as given (fp32): eps <= 0 on a constant row gives inf/NaN, as torch does.
# Absent weight / bias / dh_out are masked-off loads (runtime flags has_w / has_b / has_dh_out),
# whose fill values make them exact identities: w = 1, b = -0.0, dh_out = -0.0 (x + -0.0 == x
# for every x, signed zeros included).
#
# Kernels (all offsets into (rows, cols) tensors are int64; within a row, int32):
#   _norm_fwd_kernel          one program per row, the whole row is one register tile
#                             (cols <= FWD_SINGLE_TILE_MAX_COLS). Traffic per row: read x (T)
#                             [+ residual (S), write h (S)], write y (T), + 8 bytes of mean/rstd;
#                             weight/bias are re-read per row from L2.
#   _norm_fwd_looped_kernel   long rows, one program per row, two passes in LOOPED_BLOCK chunks:
#                             pass 1 reads x [+ residual, writes h] and keeps per-lane Welford
#                             (mean, M2) pairs (rms: per-lane sums of h^2), combined exactly once
#                             at the end (Chan's formula with the per-lane counts); pass 2
#                             re-reads h (S; x itself without a residual) and writes y. Traffic:
#                             the single-tile kernel's + one more read of h.
#   _norm_bwd_kernel          short rows (cols <= BWD_SINGLE_TILE_MAX_COLS): one program per
#                             block of ROWS_PER_BLOCK (= 64, fixed by the contract) rows; it
#                             loops over its rows with the row in registers: read dy (T), h (S)
#                             [, dh_out (S)], write dh (S), and accumulates dy * xhat and dy per
#                             column in registers (row order), written once per block as the fp32
#                             partials (2, blocks, cols). dy and h are read once.
#   _norm_bwd_stats_kernel    long rows, step 1: one program per row streams dy and h in chunks
#                             and writes the row's c1 (not for rms) and c2 to an fp32 scratch.
#   _norm_bwd_looped_kernel   long rows, step 2: one program per (block of 64 rows, LOOPED_BLOCK
#                             columns); loops over its rows: re-reads dy, h [, dh_out], writes dh
#                             and accumulates the partials of its columns (row order). So dy and h
#                             are read twice, and the grid has blocks * ceil(cols / LOOPED_BLOCK)
#                             programs, enough to fill a GPU even when rows are few.
#   _norm_param_grad_kernel   dw / db: one program per (PARAM_GRAD_BLOCK columns, output) adds the
#                             partials of its columns in block order (UNROLL loads in flight,
#                             added one after the other): reads 2 * blocks * cols * 4 bytes.
# dw and db are deterministic by construction: each partial is a sum over the block's rows in
# row order, the partials are added in block order, no atomics; the bits depend only on
# (rows, cols) and the inputs, never on the grid or the device (on one compiled kernel).
#
# Limits and trade-offs:
#   * one program per row (forward) or per 64-row block (short-row backward): rows of < 128
#     columns leave lanes idle, and a short-row backward with few rows (< 64 * SMs) runs few
#     programs; a multi-row tile for very short rows would help both, at the cost of more configs;
#   * the short-row backward reads dy and h once, the long-row backward twice (the price of its
#     parallelism over columns); the forward never reads an input twice below the single-tile
#     limit;
#   * the dw/db reduction reads rows * cols / 8 bytes and is parallel only over columns (its order
#     is part of the contract), so it is latency-bound when cols is small and rows huge;
#   * rows < 2^31, cols < 2^31; rows * cols may exceed 2^31 (row offsets are int64);
#   * register use is bounded by the config heuristic (8 elements per thread per live vector,
#     1 to 32 warps), checked by the AOT report (aot_specs() + lmkernels.triton_kernels.aot): zero
#     spills on sm_80 / sm_90 for every config the launchers can pick (the backward kernels keep
#     about 8 vectors live and reach 128 registers at 8 elements per thread, which is why their
#     single-tile limit is half the forward's).
#   * the row length is unbounded in practice: past the single-tile limits the register use does
#     not grow with cols, only the number of chunks does.
# The AOT report compiles the signatures without Triton's value specialisation (ints == 1,
# 16-byte divisibility); those specialised variants only remove instructions.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmkernels.ops.norm import ROWS_PER_BLOCK
from lmkernels.triton_kernels import aot
from lmkernels.triton_kernels._common import RowConfig
from lmkernels.triton_kernels._common import cast_out as _round_to

# Longest rows served by the single-tile kernels; longer rows go to the looped kernels, which
# stream LOOPED_BLOCK elements per iteration (and, in the backward, per program). The limits
# come from the AOT report (zero spills on sm_80/sm_90): the backward keeps more vectors live
# per element (dy, h, xhat, w and the two partial sums) than the forward. Tests lower them to
# reach the looped paths with small shapes in the interpreter.
FWD_SINGLE_TILE_MAX_COLS = 8192
BWD_SINGLE_TILE_MAX_COLS = 4096
LOOPED_BLOCK = 2048
MIN_BLOCK = 32
# dw/db reduction: columns per program (4 fp32 per thread of one warp) and partial rows loaded
# before they are added (in order).
PARAM_GRAD_BLOCK = 128
PARAM_GRAD_WARPS = 1
UNROLL = 8


@triton.jit
def _load_h(
    x_row,  # pointer to x[row, 0], T
    res_row,  # pointer to residual[row, 0], S (HAS_RES only)
    h_row,  # pointer to h[row, 0], S, written here (HAS_RES only)
    offs,  # int32 column indices
    valid,  # offs < cols
    HAS_RES: tl.constexpr,
):
    # h = x (+ residual, rounded to S and stored) as fp32; 0 past the row end
    h = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_row + offs, mask=valid, other=0.0).to(tl.float32)
        hs = _round_to(h + r, h_row.dtype.element_ty)
        tl.store(h_row + offs, hs, mask=valid)
        h = hs.to(tl.float32)
    return h


@triton.jit
def _row_shift(
    x_row,  # pointer to x[row, 0], T
    res_row,  # pointer to residual[row, 0], S (HAS_RES only)
    h_row,  # pointer to h[row, 0], S (HAS_RES only; gives S)
    HAS_RES: tl.constexpr,
):
    # h[row, 0] as stored, in fp32 (two scalar loads that hit the row's first cache line). The
    # layer-norm sums run over h - h0: when |mean| >> std, summing h itself rounds the partial
    # sums (~ cols * |mean|) and the mean to fp32 and loses the std's digits; h - h0 is exact
    # (Sterbenz) for values within a factor 2 of h0 and small, so the mean and the centred
    # values keep full precision.
    h0 = tl.load(x_row).to(tl.float32)
    if HAS_RES:
        h0 = _round_to(h0 + tl.load(res_row).to(tl.float32), h_row.dtype.element_ty)
        h0 = h0.to(tl.float32)
    return h0


@triton.jit
def _affine(xhat, w_ptr, b_ptr, offs, valid, has_w, has_b):
    # xhat * w + b; absent weight / bias are masked-off loads filled with exact identities
    w = tl.load(w_ptr + offs, mask=valid & (has_w != 0), other=1.0)
    b = tl.load(b_ptr + offs, mask=valid & (has_b != 0), other=-0.0)
    return xhat * w + b


@triton.jit
def _norm_fwd_kernel(
    x_ptr,  # (rows, cols) T
    res_ptr,  # (rows, cols) S; None without residual
    w_ptr,  # (cols,) fp32; read only when has_w (else any fp32 pointer)
    b_ptr,  # (cols,) fp32; read only when has_b (else any fp32 pointer)
    y_ptr,  # (rows, cols) T, output
    h_ptr,  # (rows, cols) S, output x + residual; None without residual
    mean_ptr,  # (rows,) fp32, output; None for rms
    rstd_ptr,  # (rows,) fp32, output
    cols,
    eps,
    has_w,
    has_b,
    BLOCK: tl.constexpr,  # power of two >= cols
    HAS_RES: tl.constexpr,
    RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    offs = tl.arange(0, BLOCK)
    valid = offs < cols
    res_row = res_ptr
    h_row = h_ptr
    if HAS_RES:
        res_row = res_ptr + base
        h_row = h_ptr + base
    h = _load_h(x_ptr + base, res_row, h_row, offs, valid, HAS_RES)
    n = tl.cast(cols, tl.float32)  # cols == 1 may arrive as a constexpr
    if RMS:
        xc = h  # 0 past the row end
    else:
        h0 = _row_shift(x_ptr + base, res_row, h_row, HAS_RES)
        d = tl.where(valid, h - h0, 0.0)
        dm = tl.math.div_rn(tl.sum(d, axis=0), n)  # mean - h0
        xc = tl.where(valid, d - dm, 0.0)
        tl.store(mean_ptr + row, h0 + dm)
    var = tl.math.div_rn(tl.sum(xc * xc, axis=0), n)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(rstd_ptr + row, rstd)
    y = _affine(xc * rstd, w_ptr, b_ptr, offs, valid, has_w, has_b)
    tl.store(y_ptr + base + offs, _round_to(y, y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _norm_fwd_looped_kernel(
    x_ptr,  # (rows, cols) T
    res_ptr,  # (rows, cols) S; None without residual
    w_ptr,  # (cols,) fp32; read only when has_w (else any fp32 pointer)
    b_ptr,  # (cols,) fp32; read only when has_b (else any fp32 pointer)
    y_ptr,  # (rows, cols) T, output
    h_ptr,  # (rows, cols) S, output x + residual; None without residual
    mean_ptr,  # (rows,) fp32, output; None for rms
    rstd_ptr,  # (rows,) fp32, output
    cols,
    eps,
    has_w,
    has_b,
    BLOCK: tl.constexpr,  # chunk length, power of two
    HAS_RES: tl.constexpr,
    RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    lanes = tl.arange(0, BLOCK)
    res_row = res_ptr
    h_row = h_ptr
    if HAS_RES:
        res_row = res_ptr + base
        h_row = h_ptr + base
    n = tl.cast(cols, tl.float32)  # cols == 1 may arrive as a constexpr

    # pass 1: h (stored when fused), per-lane statistics of h - h0 (see _row_shift). Lane l
    # sees the elements l, l + BLOCK, ...; in chunk k every live lane has seen k + 1 elements,
    # so Welford's 1/count is a scalar.
    h0 = 0.0
    if not RMS:
        h0 = _row_shift(x_ptr + base, res_row, h_row, HAS_RES)
    acc = tl.zeros([BLOCK], tl.float32)  # rms: sum h^2; layer norm: running mean of h - h0
    m2 = tl.zeros([BLOCK], tl.float32)  # layer norm: running sum of squared deviations
    count = 0.0
    for start in range(0, cols, BLOCK):
        offs = start + lanes
        valid = offs < cols
        h = _load_h(x_ptr + base, res_row, h_row, offs, valid, HAS_RES)
        if RMS:
            acc += h * h
        else:
            count += 1.0
            d = h - h0
            delta = d - acc
            acc = tl.where(valid, acc + delta * tl.math.div_rn(1.0, count), acc)
            m2 = tl.where(valid, m2 + delta * (d - acc), m2)
    dm = 0.0  # mean - h0
    if RMS:
        var = tl.math.div_rn(tl.sum(acc, axis=0), n)
    else:
        # Chan et al.: M2 = sum_l M2_l + sum_l n_l (mean_l - mean)^2, n_l = elements of lane l
        n_l = ((cols - lanes + BLOCK - 1) // BLOCK).to(tl.float32)
        dm = tl.math.div_rn(tl.sum(n_l * acc, axis=0), n)
        dev = acc - dm
        var = tl.math.div_rn(tl.sum(m2, axis=0) + tl.sum(n_l * dev * dev, axis=0), n)
        tl.store(mean_ptr + row, h0 + dm)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(rstd_ptr + row, rstd)

    # pass 2: re-read h (the values just stored: the barrier makes every thread's stores
    # visible to the whole program) and write y
    src_row = x_ptr + base
    if HAS_RES:
        tl.debug_barrier()
        src_row = h_row
    for start in range(0, cols, BLOCK):
        offs = start + lanes
        valid = offs < cols
        h = tl.load(src_row + offs, mask=valid, other=0.0).to(tl.float32)
        if RMS:
            xhat = h * rstd
        else:
            xhat = ((h - h0) - dm) * rstd
        y = _affine(xhat, w_ptr, b_ptr, offs, valid, has_w, has_b)
        tl.store(y_ptr + base + offs, _round_to(y, y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _xhat(h, mean, rstd, valid, RMS: tl.constexpr):
    # (h - mean) * rstd (rms: h * rstd), 0 past the row end (where h was loaded as 0)
    if RMS:
        return h * rstd
    return tl.where(valid, (h - mean) * rstd, 0.0)


@triton.jit
def _dh(g, xhat, rstd, c1, c2, dh_out_row, offs, valid, has_dh_out, RMS: tl.constexpr):
    # rstd * (g - c1 - xhat * c2) (rms: without c1) + dh_out, in fp32
    if RMS:
        dh = rstd * (g - xhat * c2)
    else:
        dh = rstd * (g - c1 - xhat * c2)
    extra = tl.load(dh_out_row + offs, mask=valid & (has_dh_out != 0), other=-0.0)
    return dh + extra.to(tl.float32)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr,  # (rows, cols) T
    dh_out_ptr,  # (rows, cols) S; read only when has_dh_out (else any S pointer)
    h_ptr,  # (rows, cols) S, the normalised input
    w_ptr,  # (cols,) fp32; read only when has_w (else any fp32 pointer)
    mean_ptr,  # (rows,) fp32; None for rms
    rstd_ptr,  # (rows,) fp32
    dh_ptr,  # (rows, cols) S, output
    dw_part_ptr,  # (blocks, cols) fp32 partial sums of dy * xhat, output when need_part
    db_part_ptr,  # (blocks, cols) fp32 partial sums of dy, output when need_part
    rows,
    cols,
    has_dh_out,
    has_w,
    need_part,
    BLOCK: tl.constexpr,  # power of two >= cols
    ROWS: tl.constexpr,  # rows per block: ROWS_PER_BLOCK
    RMS: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < cols
    n = tl.cast(cols, tl.float32)  # cols == 1 may arrive as a constexpr
    w = tl.load(w_ptr + offs, mask=valid & (has_w != 0), other=1.0)
    dw_acc = tl.zeros([BLOCK], tl.float32)
    db_acc = tl.zeros([BLOCK], tl.float32)
    r0 = blk * ROWS
    for row in range(r0, tl.minimum(r0 + ROWS, rows)):
        base = row * cols
        dy = tl.load(dy_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        mean = 0.0
        if not RMS:
            mean = tl.load(mean_ptr + row)
        xhat = _xhat(h, mean, rstd, valid, RMS)
        g = dy * w
        c1 = 0.0
        if not RMS:
            c1 = tl.math.div_rn(tl.sum(g, axis=0), n)
        c2 = tl.math.div_rn(tl.sum(g * xhat, axis=0), n)
        dh = _dh(g, xhat, rstd, c1, c2, dh_out_ptr + base, offs, valid, has_dh_out, RMS)
        tl.store(dh_ptr + base + offs, _round_to(dh, dh_ptr.dtype.element_ty), mask=valid)
        dw_acc += dy * xhat
        db_acc += dy
    if need_part != 0:
        tl.store(dw_part_ptr + blk * cols + offs, dw_acc, mask=valid)
        tl.store(db_part_ptr + blk * cols + offs, db_acc, mask=valid)


@triton.jit
def _norm_bwd_stats_kernel(
    dy_ptr,  # (rows, cols) T
    h_ptr,  # (rows, cols) S, the normalised input
    w_ptr,  # (cols,) fp32; read only when has_w (else any fp32 pointer)
    mean_ptr,  # (rows,) fp32; None for rms
    rstd_ptr,  # (rows,) fp32
    c1_ptr,  # (rows,) fp32 output: sum(g) / cols; None for rms
    c2_ptr,  # (rows,) fp32 output: sum(g * xhat) / cols
    cols,
    has_w,
    BLOCK: tl.constexpr,  # chunk length, power of two
    RMS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    lanes = tl.arange(0, BLOCK)
    rstd = tl.load(rstd_ptr + row)
    mean = 0.0
    if not RMS:
        mean = tl.load(mean_ptr + row)
    s1 = tl.zeros([BLOCK], tl.float32)  # per-lane sums of g
    s2 = tl.zeros([BLOCK], tl.float32)  # per-lane sums of g * xhat
    for start in range(0, cols, BLOCK):
        offs = start + lanes
        valid = offs < cols
        dy = tl.load(dy_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=valid & (has_w != 0), other=1.0)
        g = dy * w
        s2 += g * _xhat(h, mean, rstd, valid, RMS)
        if not RMS:
            s1 += g
    n = tl.cast(cols, tl.float32)  # cols == 1 may arrive as a constexpr
    tl.store(c2_ptr + row, tl.math.div_rn(tl.sum(s2, axis=0), n))
    if not RMS:
        tl.store(c1_ptr + row, tl.math.div_rn(tl.sum(s1, axis=0), n))


@triton.jit
def _norm_bwd_looped_kernel(
    dy_ptr,  # (rows, cols) T
    dh_out_ptr,  # (rows, cols) S; read only when has_dh_out (else any S pointer)
    h_ptr,  # (rows, cols) S, the normalised input
    w_ptr,  # (cols,) fp32; read only when has_w (else any fp32 pointer)
    mean_ptr,  # (rows,) fp32; None for rms
    rstd_ptr,  # (rows,) fp32
    c1_ptr,  # (rows,) fp32 from _norm_bwd_stats_kernel; None for rms
    c2_ptr,  # (rows,) fp32 from _norm_bwd_stats_kernel
    dh_ptr,  # (rows, cols) S, output
    dw_part_ptr,  # (blocks, cols) fp32 partial sums of dy * xhat, output when need_part
    db_part_ptr,  # (blocks, cols) fp32 partial sums of dy, output when need_part
    rows,
    cols,
    has_dh_out,
    has_w,
    need_part,
    BLOCK: tl.constexpr,  # columns per program, power of two
    ROWS: tl.constexpr,  # rows per block: ROWS_PER_BLOCK
    RMS: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < cols
    w = tl.load(w_ptr + offs, mask=valid & (has_w != 0), other=1.0)
    dw_acc = tl.zeros([BLOCK], tl.float32)
    db_acc = tl.zeros([BLOCK], tl.float32)
    r0 = blk * ROWS
    for row in range(r0, tl.minimum(r0 + ROWS, rows)):
        base = row * cols
        dy = tl.load(dy_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        mean = 0.0
        c1 = 0.0
        if not RMS:
            mean = tl.load(mean_ptr + row)
            c1 = tl.load(c1_ptr + row)
        c2 = tl.load(c2_ptr + row)
        xhat = _xhat(h, mean, rstd, valid, RMS)
        dh = _dh(dy * w, xhat, rstd, c1, c2, dh_out_ptr + base, offs, valid, has_dh_out, RMS)
        tl.store(dh_ptr + base + offs, _round_to(dh, dh_ptr.dtype.element_ty), mask=valid)
        dw_acc += dy * xhat
        db_acc += dy
    if need_part != 0:
        tl.store(dw_part_ptr + blk * cols + offs, dw_acc, mask=valid)
        tl.store(db_part_ptr + blk * cols + offs, db_acc, mask=valid)


@triton.jit
def _norm_param_grad_kernel(
    part_ptr,  # (2, blocks, cols) fp32 partials: [0] of dw, [1] of db
    dw_ptr,  # (cols,) fp32 output, written by the programs with which == 0
    db_ptr,  # (cols,) fp32 output, written by the programs with which == 1
    blocks,
    cols,
    first,  # which = program_id(1) + first: 0 = dw, 1 = db
    BLOCK: tl.constexpr,  # columns per program
    UNROLL: tl.constexpr,  # partial rows loaded before they are added
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < cols
    which = tl.program_id(1) + first
    src = part_ptr + which.to(tl.int64) * blocks * cols
    acc = tl.zeros([BLOCK], tl.float32)
    for b0 in range(0, blocks, UNROLL):
        # strictly in block order; -0.0 past the last block adds nothing, not even a sign
        for i in tl.static_range(UNROLL):
            b = b0 + i
            acc += tl.load(
                src + b.to(tl.int64) * cols + offs, mask=valid & (b < blocks), other=-0.0
            )
    tl.store(dw_ptr + offs, acc, mask=valid & (which == 0))
    tl.store(db_ptr + offs, acc, mask=valid & (which == 1))


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


NormConfig = RowConfig


def _warps_for(block: int) -> int:
    # 8 elements per thread (one warp per 256 elements), 1 to 32 warps. An 8192 tile on 16 warps
    # (16 elements per thread) spills a few bytes on sm_80/sm_90 with a residual: ptxas holds
    # 512-thread kernels to 64 registers; 32 warps need about 50.
    return max(1, min(32, block // 256))


def _config(cols: int, single_tile_max: int) -> NormConfig:
    if cols <= single_tile_max:
        block = max(MIN_BLOCK, triton.next_power_of_2(max(cols, 1)))
        return NormConfig(block, _warps_for(block), looped=False)
    return NormConfig(LOOPED_BLOCK, _warps_for(LOOPED_BLOCK), looped=True)


def norm_fwd_config(cols: int) -> NormConfig:
    """Forward launch config for rows of `cols` elements (any T/S: all math is fp32)."""
    return _config(cols, FWD_SINGLE_TILE_MAX_COLS)


def norm_bwd_config(cols: int) -> NormConfig:
    """Backward launch config for rows of `cols` elements (any T/S: all math is fp32)."""
    return _config(cols, BWD_SINGLE_TILE_MAX_COLS)


def _all_configs(single_tile_max: int) -> list[NormConfig]:
    # every config _config can return for this limit (a power of two)
    out, block = [], MIN_BLOCK
    while block < single_tile_max:
        out.append(_config(block, single_tile_max))
        block *= 2
    out.append(_config(single_tile_max, single_tile_max))
    out.append(_config(single_tile_max + 1, single_tile_max))
    return out


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_types(fn: str, t: torch.dtype, s: torch.dtype) -> None:
    # the (T, S) pairs of norm.h that aot_specs() lists; anything else would compile a kernel
    # that the AOT report never checked
    if t not in _DTYPES:
        raise ValueError(f"{fn}: dtype {t} is not supported (float32, float16, bfloat16)")
    if s != t and not (t != torch.float32 and s == torch.float32):
        raise ValueError(f"{fn}: the residual stream dtype {s} must be {t} or (for 16-bit data) "
                         "float32")  # fmt: skip


def _param(fn: str, name: str, p: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    # weight / bias as a contiguous fp32 vector, or a never-read stand-in when absent
    if p is None:
        return dummy
    if p.dtype != torch.float32:
        raise ValueError(f"{fn}: {name} must be float32 (the accumulation type), got {p.dtype}")
    return p.contiguous()


def norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    h: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    eps: float,
    rms: bool,
) -> None:
    """layer_norm (rms=False) / rms_norm (rms=True) of each row of x (+ residual), as norm.h.

    x, y: (rows, cols) contiguous, T in {fp32, fp16, bf16}; residual, h: (rows, cols)
    contiguous of S (T, or fp32 for 16-bit T), both given or both None, h = x + residual is
    written; weight, bias: (cols,) fp32 or None; mean: (rows,) fp32, None exactly when rms;
    rstd: (rows,) fp32. y, h, mean and rstd are written.
    """
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return
    if (residual is None) != (h is None):
        raise ValueError("norm_fwd: h must be given exactly when residual is")
    if (mean is None) != bool(rms):
        raise ValueError("norm_fwd: mean must be None exactly for rms")
    _check_types("norm_fwd", x.dtype, x.dtype if residual is None else residual.dtype)
    cfg = norm_fwd_config(cols)
    kernel = _norm_fwd_looped_kernel if cfg.looped else _norm_fwd_kernel
    kernel[(rows,)](
        x,
        residual,
        _param("norm_fwd", "weight", weight, rstd),
        _param("norm_fwd", "bias", bias, rstd),
        y,
        h,
        mean,
        rstd,
        cols,
        float(eps),
        int(weight is not None),
        int(bias is not None),
        BLOCK=cfg.block,
        HAS_RES=residual is not None,
        RMS=bool(rms),
        num_warps=cfg.num_warps,
    )


def norm_bwd(
    dy: torch.Tensor,
    dh_out: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dh: torch.Tensor,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
    rms: bool,
) -> None:
    """Gradients of norm_fwd from the saved h (the normalised input), mean and rstd.

    dy: (rows, cols) contiguous of T; dh_out, h, dh: (rows, cols) contiguous of S (dh_out may be
    None: no gradient of the returned h); weight: (cols,) fp32 or None; mean: (rows,) fp32, None
    exactly when rms; rstd: (rows,) fp32. Writes dh, and dw / db ((cols,) fp32) when given:
    deterministic, from per-block partial sums over ROWS_PER_BLOCK rows added in block order.
    The row kernels run without FMA contraction: g = dy * w feeds both the row sum c1 and
    g - c1, and a fused multiply-add there leaves the product's rounding error as a spurious
    gradient (one column: rstd * ulp(g) where the exact gradient is 0; seen on an H100).
    """
    rows, cols = dy.shape
    if rows == 0 or cols == 0:
        return
    if (mean is None) != bool(rms):
        raise ValueError("norm_bwd: mean must be None exactly for rms")
    _check_types("norm_bwd", dy.dtype, h.dtype)
    if dh_out is not None and dh_out.dtype != h.dtype:
        raise ValueError(f"norm_bwd: dh_out must have h's dtype {h.dtype}, got {dh_out.dtype}")
    cfg = norm_bwd_config(cols)
    blocks = triton.cdiv(rows, ROWS_PER_BLOCK)
    need_part = dw is not None or db is not None
    if need_part:
        part = torch.empty((2, blocks, cols), dtype=torch.float32, device=dy.device)
        dw_part, db_part = part[0], part[1]
    else:
        dw_part = db_part = rstd  # never written
    w = _param("norm_bwd", "weight", weight, rstd)
    flags = (int(dh_out is not None), int(weight is not None), int(need_part))
    dh_out_arg = h if dh_out is None else dh_out  # never read when absent
    if not cfg.looped:
        _norm_bwd_kernel[(blocks,)](
            dy, dh_out_arg, h, w, mean, rstd, dh, dw_part, db_part, rows, cols, *flags,
            BLOCK=cfg.block, ROWS=ROWS_PER_BLOCK, RMS=bool(rms), num_warps=cfg.num_warps,
            enable_fp_fusion=False,
        )  # fmt: skip
    else:
        c = torch.empty((1 if rms else 2, rows), dtype=torch.float32, device=dy.device)
        c1, c2 = (None, c[0]) if rms else (c[0], c[1])
        _norm_bwd_stats_kernel[(rows,)](
            dy, h, w, mean, rstd, c1, c2, cols, flags[1],
            BLOCK=cfg.block, RMS=bool(rms), num_warps=cfg.num_warps, enable_fp_fusion=False,
        )  # fmt: skip
        _norm_bwd_looped_kernel[(blocks, triton.cdiv(cols, cfg.block))](
            dy, dh_out_arg, h, w, mean, rstd, c1, c2, dh, dw_part, db_part, rows, cols, *flags,
            BLOCK=cfg.block, ROWS=ROWS_PER_BLOCK, RMS=bool(rms), num_warps=cfg.num_warps,
            enable_fp_fusion=False,
        )  # fmt: skip
    if need_part:
        outs = [t for t in (dw, db) if t is not None]
        _norm_param_grad_kernel[(triton.cdiv(cols, PARAM_GRAD_BLOCK), len(outs))](
            part, outs[0], outs[-1], blocks, cols, 0 if dw is not None else 1,
            BLOCK=PARAM_GRAD_BLOCK, UNROLL=UNROLL, num_warps=PARAM_GRAD_WARPS,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# AOT spec list: every (kernel, signature, constexprs, num_warps) the launchers can pick
# ---------------------------------------------------------------------------------------------

# (T, S) pairs: S = T, or fp32 for 16-bit T
_PAIRS = [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"),
          ("bf16", "fp32")]  # fmt: skip


def _spec(kernel, types: dict, const: dict, num_warps: int, label: str) -> dict:
    # signature in the kernel's argument order: types[name], or constexpr (const[name])
    sig = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    missing = [k for k, v in sig.items() if v == "constexpr" and k not in const]
    assert not missing, (kernel, missing)
    return dict(kernel=kernel, signature=sig, constexprs=const, num_warps=num_warps,
                config=label)  # fmt: skip


def _fwd_specs(cfg: NormConfig) -> list[dict]:
    kernel = _norm_fwd_looped_kernel if cfg.looped else _norm_fwd_kernel
    specs = []
    # without a residual S plays no part: one spec per T
    combos = [(t, None) for t in ("fp32", "fp16", "bf16")] + _PAIRS
    for (t, s), rms in ((c, r) for c in combos for r in (False, True)):
        types = dict(x_ptr=f"*{t}", w_ptr="*fp32", b_ptr="*fp32", y_ptr=f"*{t}", rstd_ptr="*fp32",
                     cols="i32", eps="fp32", has_w="i32", has_b="i32")  # fmt: skip
        const = dict(BLOCK=cfg.block, HAS_RES=s is not None, RMS=rms)
        if s is None:
            const.update(res_ptr=None, h_ptr=None)
        else:
            types.update(res_ptr=f"*{s}", h_ptr=f"*{s}")
        if rms:
            const["mean_ptr"] = None
        else:
            types["mean_ptr"] = "*fp32"
        label = " ".join([t, str(cfg), f"res:{s}" if s else "", "rms" if rms else "ln"])
        specs.append(_spec(kernel, types, const, cfg.num_warps, " ".join(label.split())))
    return specs


def _bwd_specs(cfg: NormConfig) -> list[dict]:
    specs = []
    for (t, s), rms in ((p, r) for p in _PAIRS for r in (False, True)):
        types = dict(dy_ptr=f"*{t}", dh_out_ptr=f"*{s}", h_ptr=f"*{s}", w_ptr="*fp32",
                     rstd_ptr="*fp32", dh_ptr=f"*{s}", dw_part_ptr="*fp32", db_part_ptr="*fp32",
                     c2_ptr="*fp32", rows="i32", cols="i32", has_dh_out="i32", has_w="i32",
                     need_part="i32")  # fmt: skip
        const = dict(BLOCK=cfg.block, RMS=rms, ROWS=ROWS_PER_BLOCK)
        if rms:
            const.update(mean_ptr=None, c1_ptr=None)
        else:
            types.update(mean_ptr="*fp32", c1_ptr="*fp32")
        label = f"{t} S:{s} {cfg} {'rms' if rms else 'ln'}"
        kernels = [_norm_bwd_stats_kernel, _norm_bwd_looped_kernel] if cfg.looped else [
            _norm_bwd_kernel]  # fmt: skip
        for kernel in kernels:
            names = set(kernel.arg_names)
            k_types = {k: v for k, v in types.items() if k in names}
            k_const = {k: v for k, v in const.items() if k in names}
            spec = _spec(kernel, k_types, k_const, cfg.num_warps, label)
            specs.append(dict(spec, enable_fp_fusion=False))  # see norm_bwd
    return specs


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps) norm_fwd / norm_bwd can launch.

    Each spec is a dict with kernel (the JITFunction), signature, constexprs, num_warps and
    config (a short label), for lmkernels.triton_kernels.aot.compile_report. aligned=True gives
    the variants the JIT builds for the common case of 16-byte-aligned tensors and cols % 16 == 0
    (vectorised loads); the default gives the generic variants.
    """
    specs = []
    for cfg in _all_configs(FWD_SINGLE_TILE_MAX_COLS):
        specs += _fwd_specs(cfg)
    for cfg in _all_configs(BWD_SINGLE_TILE_MAX_COLS):
        specs += _bwd_specs(cfg)
    specs.append(
        _spec(
            _norm_param_grad_kernel,
            dict(part_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", blocks="i32", cols="i32",
                 first="i32"),
            dict(BLOCK=PARAM_GRAD_BLOCK, UNROLL=UNROLL),
            PARAM_GRAD_WARPS,
            f"blk{PARAM_GRAD_BLOCK}w{PARAM_GRAD_WARPS}x{UNROLL}",
        )
    )  # fmt: skip
    return aot.aligned_variants(specs) if aligned else specs
