# Triton fused attention, FlashAttention-2 style: forward (online softmax, the L x S score matrix
# never stored) and the three-kernel backward.
#
# Semantics: csrc/include/lmk/attention.h (the contract shared by every backend). For query i and
# key j of one sequence (lengths Lb, Sb):
#   s[i, j] = scale * q[i].k[j] (+ additive mask; bool mask false = key excluded); key j takes
#   part iff the mask allows it and d(i) - window_left <= j <= d(i) + window_right with
#   d(i) = i + (bottom_right ? Sb - Lb : 0) (a negative side is unbounded; causal: right = 0);
#   lse[i] = log sum_j exp(s[i, j]) (-inf without keys), o[i] = sum_j exp(s[i, j] - lse[i]) v[j]
#   (zeros without keys). Backward: P = exp(s - lse), D[i] = dO[i].O[i] (O as stored),
#   dS = P * (dO.v^T - D), dq = scale dS k, dk = scale dS^T q, dv = P^T dO; dk / dv sum over
#   the query heads of the GQA group (query head h reads key/value head h // (Hq / Hk)).
# T (q, k, v, o, dO, dq, dk, dv, an additive mask) is fp32/fp16/bf16; lse and D are fp32; an
# additive mask may also be fp32 on fp16 / bf16 data (added in fp32, unrounded).
# Dropout (drop_thr > 0, lmk/philox.h): score (b, h, i, j) is kept iff philox4x32_10(c = (j >> 2,
# i, b * Hq + h, 0), key = seed).x[j & 3] >= drop_thr (varlen: b = 0, i and j packed
# positions); the forward's m, l and lse use the undropped p, o accumulates p * Z with
# Z = keep * drop_scale; the backward redraws the bits: dv += (P Z)^T dO, dS = P (Z dP - D).
# _philox4x32_10 is the generator on uint32 tiles (umulhi for the high words), _drop_keep draws
# one call per row and group of 4 keys and interleaves the 4 lanes (join + reshape); the seed
# and threshold travel as int32 bit patterns (the JIT types them i32 like every other int).
#
# Kernels (every grid is one flat axis 0, so no per-axis limit applies):
#   _attn_fwd_kernel      one program per (BLOCK_M queries, head, batch entry) (varlen: per
#                         (query block, head, sequence); blocks past the sequence's end exit).
#                         q stays in registers; the program walks, in increasing order, only the
#                         key blocks that intersect its rows' window band (block skipping:
#                         causal reads about half of k and v): s = q k^T in log2 units (the
#                         scale folded into log2(e)), running max m and sum l in fp32,
#                         p = exp2(s - m), acc = acc * exp2(m_old - m) + p v. The blocks that cut
#                         the band's edges or the sequence's end mask their elements (a runtime
#                         branch: the interior blocks skip it). Traffic: q, o, lse once; k, v
#                         once per query block of the band; + the mask's tiles.
#   _attn_bwd_pre_kernel  D = rowsum(dO * O) in fp32 into a (B, Hq, L) scratch: reads O, dO.
#   _attn_bwd_dkdv_kernel one program per (BLOCK_N keys, kv head, batch entry / sequence): k, v
#                         and the dk, dv accumulators stay in registers; it loops over the
#                         group's query heads, then the band's query blocks, in a fixed order:
#                         s^T = k q^T, P^T = exp2(s^T - lse), dv += P^T dO, dP^T = v dO^T,
#                         dS^T = P^T (dP^T - D), dk += dS^T q. No atomics: every dk / dv row is
#                         written once, by one program, its sums in an order fixed by the
#                         shapes, so repeated calls give the same bits. Traffic: k, v, dk, dv
#                         once; q, dO, lse, D once per key block of the band.
#   _attn_bwd_dq_kernel   one program per (query block, head, batch entry / sequence): q, dO,
#                         lse, D and the dq accumulator in registers; loops over the band's key
#                         blocks as the forward does: dq += dS k. Traffic: q, dO, dq once; k, v
#                         once per query block of the band.
#
# Numerics. The softmax arithmetic is fp32: scores, max, sums, exp2 (s2 = (q.k) * scale *
# log2(e), + mask * log2(e) for an additive mask; lse is stored in natural log,
# (m + log2 l) * ln 2). The products are tl.dot with fp32 accumulation: fp16/bf16 operands
# (tensor cores on the GPU), P and dS rounded to T (round-to-nearest-even) before their products,
# as FlashAttention-2; for fp32 data every tl.dot uses input_precision="ieee" (true fp32
# products, no TF32), so fp32 results match the fp32 reference to about 1e-6 relative: fp32 is
# the exact path (FMA units, small tiles), fp16/bf16 the fast one. Excluded scores are -inf
# before exp2, so they give P = 0 exactly; a row without keys keeps l = 0 and gives o = 0,
# lse = -inf (the backward reads lse = -inf as +inf: P = 0, no gradient); a +inf or NaN score
# gives NaN in its row. o, dq, dk and dv are rounded once with _common.cast_out.
# Interpreter: bf16 tl.dot is integer arithmetic there and fp32 -> bf16 casts truncate, so under
# TRITON_INTERPRET (the _INTERPRET constexpr, fixed at import) bf16 operands are widened to fp32
# before tl.dot (exact: a bf16 product fits fp32) and P / dS are rounded with cast_out; the AOT
# compiled kernels never contain that path.
#
# Memory access. Every q / k / v / o / dO / dq / dk / dv tile is read and written in 16-byte
# vectors: the kernels tell the compiler (tl.multiple_of on the pointer tiles, head dims as
# multiples of 16 bytes) that rows start 16-byte aligned, and the launchers make it true: a
# tensor whose start, batch / head / row strides or head dim is not a multiple of 16 bytes goes
# through a zero-padded aligned copy (an output through a scratch copied back), extra traffic
# with the same results (zero columns add nothing to q.k and give zero output columns). The
# common layouts (contiguous, or the (B, L, H, D) memory of the ops layer, head dims a multiple
# of 8 fp16/bf16 or 4 fp32 elements: 16, 40, 64, 80, 96, 128, 192, 256) take no copy. The mask
# is read element by element through its own strides (any broadcast, no copy; bool as u8).
#
# Configs: attention_config (kernel, padded head dim, dtype, arch, mask or not, dropout): head
# dims go to one of three buckets, BLOCK_D = 64, 128, 256 (for q/k and v alike), with a
# (BLOCK_M, BLOCK_N, num_warps) table per kernel and bucket for fp16/bf16 and one for fp32
# (smaller), and smaller 16-bit tiles with a mask (its unvectorised tile loads take registers).
# The arch is the launching GPU's table, config_arch(device): 90 for compute capability 9.x,
# 86 for the GPUs with 99 KB of shared memory per block (8.6, 8.9, 12.x), else 80 (the
# launchers' arch= overrides it: the interpreter tests pick one). num_stages (the loop's
# software-pipelining depth) is part of the config, passed at every launch and compiled with by
# the AOT report: Triton's default 3, except _SM90_STAGES (sm_90: 4 for the 16-bit forward at
# d128 / d256) and _SM86_STAGES (99 KB: 2, or 1, where sm_80's program needs more); every arch
# uses the sm_80 tiles. Dropout is the constexpr
# DROPOUT: 0 compiles no dropout code; 1 compiles it behind a uniform runtime branch
# (drop_thr != 0). Only the common configurations (fp16 / bf16 without a mask or with a bool
# mask) have both variants (a no-dropout launch pays nothing); the others (fp32, additive
# masks) have only DROPOUT=1, which their no-dropout launches also use (the branch skips the
# work; the variant's registers are the price). Where a DROPOUT=1 variant would spill with the
# usual tile, _DROPOUT_TILES gives it a smaller one.
# aot_specs(): per head bucket, fp16 / bf16: forward, dK/dV, dQ for 4 mask kinds (none, bool,
# additive T, additive fp32), the first two twice (DROPOUT 0 / 1), + the preprocess = 19; fp32:
# 3 kernels x 3 mask kinds + the preprocess = 10; 3 x (19 + 19 + 10) = 144 launches per arch
# (window, causal-ness, bottom_right, varlen and dropout's seed / threshold are runtime
# arguments). A spec names the archs that launch it (a config whose num_stages differs between
# archs is one spec per distinct config): 223 specs, 432 (spec, arch) compiles for sm_80 / 86 /
# 90, all with zero spills and shared memory within the arch's limit.
#
# Limits and trade-offs:
#   * head dims E, Ev <= 256, one BLOCK_D for both: head dim 16 or 32 pays the padding to 64
#     in the dots; Ev much smaller than E (or larger) pays max(E, Ev);
#   * L, S (varlen: the totals) < 2^29; B * Hq * query blocks < 2^31 programs; element offsets
#     are int64; strides are passed as i32 (a stride >= 2^31 elements makes the JIT compile an
#     i64 variant that aot_specs() does not list);
#   * the backward recomputes P (two score products per tile in dK/dV and in dQ): 2.5x the
#     forward's matmul work, no L x S scratch; dq has its own kernel instead of atomics;
#   * GQA: the dK/dV program serialises the group's heads (Hq / Hk times the loop length);
#   * varlen rows outside every sequence (cu_q[-1] < total) are not written; max_q / max_k
#     bound the grid (0: the totals, no host sync);
#   * register use is bounded by the configs, checked by the AOT report (aot_specs() +
#     lmkernels.triton_kernels.aot): zero spills on sm_80 / sm_90 for every config.
# The AOT report compiles the signatures without Triton's value specialisation (ints == 1,
# 16-byte divisibility); those specialised variants only remove instructions.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmkernels.triton_kernels import aot
from lmkernels.triton_kernels._common import INTERPRET as _INTERPRET
from lmkernels.triton_kernels._common import cast_out as _cast_out
from lmkernels.triton_kernels._common import mul_rn

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

MAX_HEAD_DIM = 256
MAX_LEN = 1 << 29


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc):
    # acc + a @ b in fp32 (acc None: a @ b). fp32 operands: IEEE products (no TF32).
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif _INTERPRET and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _operand(x, DT: tl.constexpr):
    # an fp32 tile (P, dS) as a dot operand of type DT, rounded to nearest even
    if DT == tl.float32:
        y = x
    elif _INTERPRET:
        y = _cast_out(x, DT)
    else:
        y = x.to(DT)
    return y


@triton.jit
def _tile(base, rows, stride, offs_d):
    # pointers of a (rows, BLOCK_D) tile of a T tensor: row r at base + r * stride. The
    # launchers pass 16-byte aligned tensors whose strides are multiples of 16 bytes, so every
    # row starts 16-byte aligned: said here, the loads and stores are 16-byte vectors (the
    # generic AOT variant included).
    return tl.multiple_of(base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :], [16, 16])


@triton.jit
def _vec_multiple(n, VEC: tl.constexpr):
    # n (a head dim, a multiple of VEC: the launchers pad it) in a form whose divisibility the
    # compiler sees, so that the masks offs_d < n are constant over 16-byte vectors
    return (n // VEC) * VEC


@triton.jit
def _seq(b, cu_q_ptr, cu_k_ptr, varlen, L, S):
    # (batch index into the tensors, first query row, queries, first key row, keys) of batch
    # entry / sequence b
    if varlen != 0:
        q0 = tl.load(cu_q_ptr + b)
        lb = tl.load(cu_q_ptr + b + 1) - q0
        k0 = tl.load(cu_k_ptr + b)
        sb = tl.load(cu_k_ptr + b + 1) - k0
        bt = b * 0
    else:
        q0 = b * 0
        lb = L + b * 0
        k0 = b * 0
        sb = S + b * 0
        bt = b
    return bt, q0, lb, k0, sb


@triton.jit
def _key_blocks(m0, m_last, off, sb, wl, wr, BLOCK_N: tl.constexpr):
    # Key blocks [lo, hi) holding a key of the window of some row in m0..m_last, and the
    # interior [f_lo, f_hi) of it: blocks whose every key lies inside every row's window and
    # before sb (no element mask needed). wl, wr >= 0 (unbounded: a sentinel above any
    # distance). Every quantity is clamped to >= 0 before a division (the interpreter floors,
    # the GPU truncates).
    d0 = m0 + off
    d1 = m_last + off
    first = tl.maximum(d0 - wl, 0)
    end = tl.maximum(tl.minimum(d1 + wr + 1, sb), first)
    lo = first // BLOCK_N
    hi = tl.where(end > first, (end + BLOCK_N - 1) // BLOCK_N, lo)
    f_lo = (tl.maximum(d1 - wl, 0) + BLOCK_N - 1) // BLOCK_N
    f_hi = tl.maximum(tl.minimum(d0 + wr + 1, sb), 0) // BLOCK_N
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.maximum(tl.minimum(f_hi, hi), f_lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _query_blocks(n0, n_last, off, lb, wl, wr, BLOCK_M: tl.constexpr):
    # Query blocks [lo, hi) with a row whose window holds a key of n0..n_last, and the interior
    # [f_lo, f_hi): blocks whose every row's window holds every one of those keys (rows past lb
    # need no mask: their lse reads as +inf, so P = 0). Clamped to >= 0 before divisions.
    first = tl.maximum(n0 - wr - off, 0)
    end = tl.maximum(tl.minimum(n_last + wl - off + 1, lb), first)
    lo = first // BLOCK_M
    hi = tl.where(end > first, (end + BLOCK_M - 1) // BLOCK_M, lo)
    f_lo = (tl.maximum(n_last - wr - off, 0) + BLOCK_M - 1) // BLOCK_M
    f_hi = tl.maximum(n0 + wl - off + 1, 0) // BLOCK_M
    f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
    f_hi = tl.maximum(tl.minimum(f_hi, hi), f_lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _scores(
    s,  # (rows, cols) fp32: q.k * scale * log2(e)
    m_tile,  # pointer tile of the mask (unused without mask)
    in_bounds,  # (rows, cols) bool: mask element inside the tensor
    rows_d,  # (rows, 1) or (1, cols) int32: d(i) of each query
    cols_j,  # (1, cols) or (rows, 1) int32: each key's index
    edge,  # runtime bool: a block on the band's edge or the sequence's end
    sb,
    wl,
    wr,
    MASK: tl.constexpr,  # 0 none, 1 bool (u8, nonzero = take part), 2 additive (T)
):
    # the scores in log2 units with the mask and (on edge blocks) the window and the sequence
    # end applied (-inf: excluded)
    if MASK == 1:
        mb = tl.load(m_tile, mask=in_bounds, other=0)
        s = tl.where(mb != 0, s, -float("inf"))
    elif MASK == 2:
        s = s + tl.load(m_tile, mask=in_bounds, other=0.0).to(tl.float32) * _LOG2E
    if edge:
        keep = (cols_j < sb) & (cols_j >= rows_d - wl) & (cols_j <= rows_d + wr)
        s = tl.where(keep, s, -float("inf"))
    return s


# Philox4x32-10 (lmk/philox.h): multipliers and the Weyl key increments
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    # lmk/philox.h's philox4x32_10 on uint32 tiles (c*) and uint32 scalars (k*): the high word
    # of each 32 x 32 product from umulhi, the low word from the wrapping uint32 multiply
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + _PHILOX_W0
            k1 = k1 + _PHILOX_W1
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _u32(x):
    # an int32 scalar argument holding a uint32 bit pattern (or the constexpr 1 that some
    # Triton versions specialise) as a uint32 scalar; tl.cast takes both (tl.to_tensor is
    # newer than Triton 3.6)
    return tl.cast(x, tl.uint32, bitcast=True)


@triton.jit
def _lane(x0, x1, x2, x3, lane):
    # x{lane} for a runtime scalar lane in 0..3
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def _shifted(a0, a1, a2, a3, b0, b1, b2, b3, lane):
    # lane 0..6 of the concatenated lanes (a0..a3, b0..b3) (runtime scalar lane)
    return tl.where(lane < 4, _lane(a0, a1, a2, a3, lane), _lane(b0, b1, b2, b3, lane - 4))


@triton.jit
def _drop_keep(seed_lo, seed_hi, thr, bh, rows, j0, BN: tl.constexpr, ALIGNED: tl.constexpr):
    # attention.h's dropout keep bits of query positions rows (R,) int32 and the BN keys at
    # positions j0 .. j0 + BN - 1 (>= 0) for the (batch * Hq + head) index bh: an (R, BN) bool
    # tile, philox4x32_10(c = (j >> 2, i, bh, 0), key = (seed_lo, seed_hi)).x[j & 3] >= thr
    # (unsigned). One Philox call per row and group of 4 keys: on an (R, BN / 4) tile, the four
    # lanes interleaved (join + reshape). A block that starts off a multiple of 4 (sh = j0 & 3,
    # varlen only) straddles BN / 4 + 1 groups: its key 4t + u is lane sh + u of group t (lanes
    # 0..3) or of group t + 1 (lanes 4..6), so it also draws the next groups. ALIGNED (a mask:
    # a dense batch, j0 a multiple of BN) compiles without that path.
    G: tl.constexpr = BN // 4
    sh = j0 & 3
    g = (j0 >> 2) + tl.arange(0, G)
    c0 = (g[None, :] + rows[:, None] * 0).to(tl.uint32, bitcast=True)
    c1 = (rows[:, None] + g[None, :] * 0).to(tl.uint32, bitcast=True)
    c2 = c1 * 0 + bh.to(tl.int32).to(tl.uint32, bitcast=True)
    c3 = c1 * 0
    k0 = _u32(seed_lo)
    k1 = _u32(seed_hi)
    t = _u32(thr)
    a0, a1, a2, a3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    if ALIGNED or sh == 0:
        y0 = a0 >= t
        y1 = a1 >= t
        y2 = a2 >= t
        y3 = a3 >= t
    else:
        b0, b1, b2, b3 = _philox4x32_10(c0 + 1, c1, c2, c3, k0, k1)
        y0 = _shifted(a0, a1, a2, a3, b0, b1, b2, b3, sh) >= t
        y1 = _shifted(a0, a1, a2, a3, b0, b1, b2, b3, sh + 1) >= t
        y2 = _shifted(a0, a1, a2, a3, b0, b1, b2, b3, sh + 2) >= t
        y3 = _shifted(a0, a1, a2, a3, b0, b1, b2, b3, sh + 3) >= t
    # [r, t, a, b] = y(2a + b)[r, t] -> [r, 4t + 2a + b]
    keep = tl.join(tl.join(y0, y2), tl.join(y1, y3))
    return tl.reshape(keep, [rows.shape[0], BN])


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, Hq, L, E) T, strided, last dim contiguous
    k_ptr,  # (B, Hk, S, E) T
    v_ptr,  # (B, Hk, S, Ev) T
    o_ptr,  # (B, Hq, L, Ev) T, written
    lse_ptr,  # (B, Hq, L) fp32 contiguous, written (natural log)
    mask_ptr,  # (B, Hq, L, S) view: u8 (bool) or T (additive); without mask a placeholder
    cu_q_ptr,  # varlen: (nseq + 1,) int32 query row offsets; dense: a placeholder, never read
    cu_k_ptr,  # varlen: (nseq + 1,) int32 key row offsets; dense: a placeholder
    q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl,
    m_sb, m_sh, m_sl, m_ss,  # mask strides (elements; 0 for broadcast dims)
    Hq,
    group,  # Hq // Hk
    L,  # queries per batch entry (varlen: the total)
    S,  # keys per batch entry (varlen: the total)
    E,  # multiple of 16 bytes / sizeof(T) (padded by the launcher)
    Ev,  # likewise
    n_mblocks,  # query blocks per (head, batch entry / sequence)
    varlen,  # 0 dense, 1 packed sequences (cu_q / cu_k)
    qk_scale,  # scale * log2(e)
    wl,  # window left, >= 0 (unbounded: a sentinel > max(L, S))
    wr,  # window right, >= 0 (causal: 0)
    bottom_right,  # 0 / 1: the diagonal of query i is key i + Sb - Lb
    seed_lo,  # dropout: the Philox key's low 32 bits (an int32 bit pattern)
    seed_hi,  # its high 32 bits
    drop_thr,  # dropout threshold, uint32 as an int32 bit pattern (0: no dropout)
    drop_scale,  # 2^32 / (2^32 - threshold)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= E, Ev
    MASK: tl.constexpr,  # 0 none, 1 bool, 2 additive (T or fp32)
    DROPOUT: tl.constexpr,  # 0: no dropout code; 1: dropout where drop_thr != 0 (runtime)
):  # fmt: skip
    VEC: tl.constexpr = 128 // q_ptr.dtype.element_ty.primitive_bitwidth
    E = _vec_multiple(E, VEC)
    Ev = _vec_multiple(Ev, VEC)
    pid = tl.program_id(0)
    mb = pid % n_mblocks
    bh = pid // n_mblocks
    h = bh % Hq
    b = bh // Hq
    bt, q0, lb, k0, sb = _seq(b, cu_q_ptr, cu_k_ptr, varlen, L, S)
    m0 = mb * BLOCK_M
    if m0 >= lb:
        return
    hk = h // group
    bt64 = bt.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = q_ptr + bt64 * q_sb + h64 * q_sh + q0.to(tl.int64) * q_sl
    k_base = k_ptr + bt64 * k_sb + hk.to(tl.int64) * k_sh + k0.to(tl.int64) * k_sl
    v_base = v_ptr + bt64 * v_sb + hk.to(tl.int64) * v_sh + k0.to(tl.int64) * v_sl
    o_base = o_ptr + bt64 * o_sb + h64 * o_sh + q0.to(tl.int64) * o_sl
    m_base = mask_ptr + bt64 * m_sb + h64 * m_sh
    off = bottom_right * (sb - lb)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < lb
    q = tl.load(_tile(q_base, offs_m, q_sl, offs_d), mask=m_ok[:, None] & (offs_d < E)[None, :],
                other=0.0)  # fmt: skip

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, f_lo, f_hi, hi = _key_blocks(m0, tl.minimum(m0 + BLOCK_M, lb) - 1, off, sb, wl, wr,
                                     BLOCK_N)  # fmt: skip
    for kb in range(lo, hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sb
        k = tl.load(_tile(k_base, offs_n, k_sl, offs_d),
                    mask=n_ok[:, None] & (offs_d < E)[None, :], other=0.0)  # fmt: skip
        s = mul_rn(_mma(q, tl.trans(k), None), qk_scale)
        m_tile = m_base + offs_m.to(tl.int64)[:, None] * m_sl + offs_n.to(tl.int64)[None, :] * m_ss
        s = _scores(s, m_tile, m_ok[:, None] & n_ok[None, :], (offs_m + off)[:, None],
                    offs_n[None, :], (kb < f_lo) | (kb >= f_hi), sb, wl, wr, MASK)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            if drop_thr != 0:  # l and lse keep the undropped p
                keep = _drop_keep(seed_lo, seed_hi, drop_thr, bt * Hq + h, q0 + offs_m,
                                  k0 + kb * BLOCK_N, BLOCK_N, MASK != 0)  # fmt: skip
                p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(_tile(v_base, offs_n, v_sl, offs_d),
                    mask=n_ok[:, None] & (offs_d < Ev)[None, :], other=0.0)  # fmt: skip
        acc = _mma(_operand(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # l == 0: no key took part (o = 0, lse = -inf); NaN stays NaN
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, -float("inf"), (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(_tile(o_base, offs_m, o_sl, offs_d), _cast_out(o, o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d < Ev)[None, :])  # fmt: skip
    lse_row = ((bt * Hq + h).to(tl.int64) * L + q0) + offs_m
    tl.store(lse_ptr + lse_row, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_pre_kernel(
    o_ptr,  # (B, Hq, L, Ev) T, the forward's output
    do_ptr,  # (B, Hq, L, Ev) T, its gradient
    delta_ptr,  # (B, Hq, L) fp32 contiguous, written: rowsum(dO * O)
    o_sb, o_sh, o_sl, do_sb, do_sh, do_sl,
    Hq,
    L,
    Ev,  # multiple of 16 bytes / sizeof(T)
    n_mblocks,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= Ev
):  # fmt: skip
    VEC: tl.constexpr = 128 // o_ptr.dtype.element_ty.primitive_bitwidth
    Ev = _vec_multiple(Ev, VEC)
    pid = tl.program_id(0)
    mb = pid % n_mblocks
    bh = pid // n_mblocks
    h = (bh % Hq).to(tl.int64)
    b = (bh // Hq).to(tl.int64)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < L)[:, None] & (offs_d < Ev)[None, :]
    o = tl.load(_tile(o_ptr + b * o_sb + h * o_sh, rows, o_sl, offs_d), mask=ok, other=0.0)
    do = tl.load(_tile(do_ptr + b * do_sb + h * do_sh, rows, do_sl, offs_d), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (b * Hq + h) * L + rows, delta, mask=rows < L)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (B, Hq, L, E) T
    k_ptr,  # (B, Hk, S, E) T
    v_ptr,  # (B, Hk, S, Ev) T
    do_ptr,  # (B, Hq, L, Ev) T
    lse_ptr,  # (B, Hq, L) fp32, the forward's
    delta_ptr,  # (B, Hq, L) fp32, _attn_bwd_pre_kernel's
    dk_ptr,  # (B, Hk, S, E) T, written
    dv_ptr,  # (B, Hk, S, Ev) T, written
    mask_ptr,  # as the forward's
    cu_q_ptr,
    cu_k_ptr,
    q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, do_sb, do_sh, do_sl,
    dk_sb, dk_sh, dk_sl, dv_sb, dv_sh, dv_sl, m_sb, m_sh, m_sl, m_ss,
    Hq,
    Hk,
    group,
    L,
    S,
    E,
    Ev,
    n_nblocks,  # key blocks per (kv head, batch entry / sequence)
    varlen,
    qk_scale,
    scale,
    wl,
    wr,
    bottom_right,
    seed_lo,
    seed_hi,
    drop_thr,
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    VEC: tl.constexpr = 128 // q_ptr.dtype.element_ty.primitive_bitwidth
    E = _vec_multiple(E, VEC)
    Ev = _vec_multiple(Ev, VEC)
    pid = tl.program_id(0)
    nb = pid % n_nblocks
    bh = pid // n_nblocks
    hk = bh % Hk
    b = bh // Hk
    bt, q0, lb, k0, sb = _seq(b, cu_q_ptr, cu_k_ptr, varlen, L, S)
    n0 = nb * BLOCK_N
    if n0 >= sb:
        return
    bt64 = bt.to(tl.int64)
    hk64 = hk.to(tl.int64)
    k064 = k0.to(tl.int64)
    off = bottom_right * (sb - lb)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < sb
    k_ok = n_ok[:, None] & (offs_d < E)[None, :]
    v_ok = n_ok[:, None] & (offs_d < Ev)[None, :]
    k = tl.load(_tile(k_ptr + bt64 * k_sb + hk64 * k_sh + k064 * k_sl, offs_n, k_sl, offs_d),
                mask=k_ok, other=0.0)  # fmt: skip
    v = tl.load(_tile(v_ptr + bt64 * v_sb + hk64 * v_sh + k064 * v_sl, offs_n, v_sl, offs_d),
                mask=v_ok, other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, f_lo, f_hi, hi = _query_blocks(n0, tl.minimum(n0 + BLOCK_N, sb) - 1, off, lb, wl, wr,
                                       BLOCK_M)  # fmt: skip
    # the group's query heads, then the band's query blocks: a fixed order
    for j in range(0, group * (hi - lo)):
        h = (hk * group + j // (hi - lo)).to(tl.int64)
        mb = lo + j % (hi - lo)
        q_base = q_ptr + bt64 * q_sb + h * q_sh + q0.to(tl.int64) * q_sl
        do_base = do_ptr + bt64 * do_sb + h * do_sh + q0.to(tl.int64) * do_sl
        row0 = (bt64 * Hq + h) * L + q0
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < lb
        q = tl.load(_tile(q_base, offs_m, q_sl, offs_d),
                    mask=m_ok[:, None] & (offs_d < E)[None, :], other=0.0)  # fmt: skip
        do = tl.load(_tile(do_base, offs_m, do_sl, offs_d),
                     mask=m_ok[:, None] & (offs_d < Ev)[None, :], other=0.0)  # fmt: skip
        lse = tl.load(lse_ptr + row0 + offs_m, mask=m_ok, other=-float("inf"))
        lse2 = tl.where(lse == -float("inf"), float("inf"), lse * _LOG2E)  # no key: P = 0
        delta = tl.load(delta_ptr + row0 + offs_m, mask=m_ok, other=0.0)
        st = mul_rn(_mma(k, tl.trans(q), None), qk_scale)  # (BLOCK_N, BLOCK_M)
        m_tile = (mask_ptr + bt64 * m_sb + h * m_sh + offs_m.to(tl.int64)[None, :] * m_sl
                  + offs_n.to(tl.int64)[:, None] * m_ss)  # fmt: skip
        st = _scores(st, m_tile, n_ok[:, None] & m_ok[None, :], (offs_m + off)[None, :],
                     offs_n[:, None], (mb < f_lo) | (mb >= f_hi), sb, wl, wr, MASK)  # fmt: skip
        pt = tl.exp2(st - lse2[None, :])
        dpt = _mma(v, tl.trans(do), None)
        pzt = pt
        if DROPOUT:
            if drop_thr != 0:  # Z = keep * drop_scale: dv += (P Z)^T dO, dS = P (Z dP - D)
                keep = tl.trans(_drop_keep(seed_lo, seed_hi, drop_thr, bt64 * Hq + h,
                                           q0 + offs_m, k0 + n0, BLOCK_N, MASK != 0))  # fmt: skip
                zt = tl.where(keep, drop_scale, 0.0)
                pzt = pt * zt
                dpt = dpt * zt
        dv = _mma(_operand(pzt, do.dtype), do, dv)
        dst = pt * (dpt - delta[None, :])
        dk = _mma(_operand(dst, q.dtype), q, dk)
    dk = dk * scale
    dk_base = dk_ptr + bt64 * dk_sb + hk64 * dk_sh + k064 * dk_sl
    tl.store(_tile(dk_base, offs_n, dk_sl, offs_d), _cast_out(dk, dk_ptr.dtype.element_ty),
             mask=k_ok)  # fmt: skip
    dv_base = dv_ptr + bt64 * dv_sb + hk64 * dv_sh + k064 * dv_sl
    tl.store(_tile(dv_base, offs_n, dv_sl, offs_d), _cast_out(dv, dv_ptr.dtype.element_ty),
             mask=v_ok)  # fmt: skip


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, Hq, L, E) T
    k_ptr,  # (B, Hk, S, E) T
    v_ptr,  # (B, Hk, S, Ev) T
    do_ptr,  # (B, Hq, L, Ev) T
    lse_ptr,  # (B, Hq, L) fp32
    delta_ptr,  # (B, Hq, L) fp32
    dq_ptr,  # (B, Hq, L, E) T, written
    mask_ptr,
    cu_q_ptr,
    cu_k_ptr,
    q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, do_sb, do_sh, do_sl,
    dq_sb, dq_sh, dq_sl, m_sb, m_sh, m_sl, m_ss,
    Hq,
    group,
    L,
    S,
    E,
    Ev,
    n_mblocks,
    varlen,
    qk_scale,
    scale,
    wl,
    wr,
    bottom_right,
    seed_lo,
    seed_hi,
    drop_thr,
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    VEC: tl.constexpr = 128 // q_ptr.dtype.element_ty.primitive_bitwidth
    E = _vec_multiple(E, VEC)
    Ev = _vec_multiple(Ev, VEC)
    pid = tl.program_id(0)
    mb = pid % n_mblocks
    bh = pid // n_mblocks
    h = bh % Hq
    b = bh // Hq
    bt, q0, lb, k0, sb = _seq(b, cu_q_ptr, cu_k_ptr, varlen, L, S)
    m0 = mb * BLOCK_M
    if m0 >= lb:
        return
    hk = h // group
    bt64 = bt.to(tl.int64)
    h64 = h.to(tl.int64)
    q064 = q0.to(tl.int64)
    k_base = k_ptr + bt64 * k_sb + hk.to(tl.int64) * k_sh + k0.to(tl.int64) * k_sl
    v_base = v_ptr + bt64 * v_sb + hk.to(tl.int64) * v_sh + k0.to(tl.int64) * v_sl
    m_base = mask_ptr + bt64 * m_sb + h64 * m_sh
    off = bottom_right * (sb - lb)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < lb
    q_ok = m_ok[:, None] & (offs_d < E)[None, :]
    q = tl.load(_tile(q_ptr + bt64 * q_sb + h64 * q_sh + q064 * q_sl, offs_m, q_sl, offs_d),
                mask=q_ok, other=0.0)  # fmt: skip
    do = tl.load(_tile(do_ptr + bt64 * do_sb + h64 * do_sh + q064 * do_sl, offs_m, do_sl, offs_d),
                 mask=m_ok[:, None] & (offs_d < Ev)[None, :], other=0.0)  # fmt: skip
    row0 = (bt64 * Hq + h64) * L + q0
    lse = tl.load(lse_ptr + row0 + offs_m, mask=m_ok, other=-float("inf"))
    lse2 = tl.where(lse == -float("inf"), float("inf"), lse * _LOG2E)  # no key: P = 0
    delta = tl.load(delta_ptr + row0 + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, f_lo, f_hi, hi = _key_blocks(m0, tl.minimum(m0 + BLOCK_M, lb) - 1, off, sb, wl, wr,
                                     BLOCK_N)  # fmt: skip
    for kb in range(lo, hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sb
        k = tl.load(_tile(k_base, offs_n, k_sl, offs_d),
                    mask=n_ok[:, None] & (offs_d < E)[None, :], other=0.0)  # fmt: skip
        v = tl.load(_tile(v_base, offs_n, v_sl, offs_d),
                    mask=n_ok[:, None] & (offs_d < Ev)[None, :], other=0.0)  # fmt: skip
        s = mul_rn(_mma(q, tl.trans(k), None), qk_scale)
        m_tile = m_base + offs_m.to(tl.int64)[:, None] * m_sl + offs_n.to(tl.int64)[None, :] * m_ss
        s = _scores(s, m_tile, m_ok[:, None] & n_ok[None, :], (offs_m + off)[:, None],
                    offs_n[None, :], (kb < f_lo) | (kb >= f_hi), sb, wl, wr, MASK)  # fmt: skip
        p = tl.exp2(s - lse2[:, None])
        dp = _mma(do, tl.trans(v), None)
        if DROPOUT:
            if drop_thr != 0:
                keep = _drop_keep(seed_lo, seed_hi, drop_thr, bt * Hq + h, q0 + offs_m,
                                  k0 + kb * BLOCK_N, BLOCK_N, MASK != 0)  # fmt: skip
                dp = dp * tl.where(keep, drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _mma(_operand(ds, k.dtype), k, dq)
    dq = dq * scale
    dq_base = dq_ptr + bt64 * dq_sb + h64 * dq_sh + q064 * dq_sl
    tl.store(_tile(dq_base, offs_m, dq_sl, offs_d), _cast_out(dq, dq_ptr.dtype.element_ty),
             mask=q_ok)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnConfig:
    """A program tile: block_m queries by block_n keys (the backward preprocess: block_m rows,
    block_n unused) on num_warps warps, the loop software-pipelined num_stages deep; block_d is
    the padded head dim."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int = aot.DEFAULT_NUM_STAGES

    def __str__(self) -> str:
        return (f"m{self.block_m}n{self.block_n}d{self.block_d}w{self.num_warps}"
                f"s{self.num_stages}")  # fmt: skip


KERNELS = ("fwd", "pre", "dkdv", "dq")
HEAD_BUCKETS = (64, 128, 256)
ARCHS = (80, 86, 90)

# (kernel, 16-bit?, block_d) -> (block_m, block_n, num_warps). fp16/bf16 tiles follow
# FlashAttention-2's (128 x 64 forward tiles; the dK/dV program holds k, v, dk, dv for its
# block_n keys, so its block_n shrinks with the head dim); fp32 (IEEE products on FMA units)
# uses smaller tiles. Every entry is checked by the AOT report (registers, spills, shared
# memory with Triton's default 3 pipeline stages) on sm_80, sm_86 and sm_90.
_TILES = {
    ("fwd", True, 64): (128, 64, 4),
    ("fwd", True, 128): (128, 64, 8),
    ("fwd", True, 256): (64, 32, 8),
    ("dkdv", True, 64): (32, 128, 8),
    ("dkdv", True, 128): (32, 64, 8),
    ("dkdv", True, 256): (32, 32, 8),
    ("dq", True, 64): (128, 32, 8),
    ("dq", True, 128): (64, 32, 4),
    ("dq", True, 256): (32, 32, 4),
    ("fwd", False, 64): (32, 32, 4),
    ("fwd", False, 128): (32, 32, 8),
    ("fwd", False, 256): (32, 16, 8),
    ("dkdv", False, 64): (32, 16, 8),
    ("dkdv", False, 128): (16, 16, 8),
    ("dkdv", False, 256): (16, 32, 8),
    ("dq", False, 64): (32, 16, 8),
    ("dq", False, 128): (32, 16, 8),
    ("dq", False, 256): (32, 16, 8),
}
# With a mask: the mask tile's loads cannot be vectorised (any strides, 1-byte bools), so its
# addresses take registers; these 16-bit tiles replace _TILES' (fewer elements per thread).
_MASKED_TILES = {
    ("fwd", True, 64): (128, 64, 8),
    ("fwd", True, 128): (128, 32, 8),
    ("dkdv", True, 64): (32, 32, 4),
    ("dq", True, 128): (64, 32, 8),
}
# The DROPOUT=1 variants (every fp32 launch, 16-bit ones with dropout or an additive mask),
# keyed (kernel, 16-bit?, block_d, masked?): the Philox tiles and the lane interleave take
# registers; these tiles replace _TILES' / _MASKED_TILES' where those spill (ptxas, sm_80/90).
_DROPOUT_TILES = {
    ("fwd", True, 64, False): (128, 64, 8),
    ("fwd", True, 128, True): (64, 32, 8),
    ("dkdv", True, 128, True): (32, 32, 8),
    ("dq", True, 256, True): (32, 32, 8),
    **{("dkdv", False, 64, m): (16, 16, 8) for m in (False, True)},
    **{("dkdv", False, 128, m): (16, 16, 4) for m in (False, True)},
    **{("dkdv", False, 256, m): (16, 16, 8) for m in (False, True)},
    **{("dq", False, 128, m): (32, 16, 4) for m in (False, True)},
}
# the preprocess: 4096 elements of O and of dO per program on 4 warps (32 per thread each)
_PRE_ELEMS, _PRE_WARPS = 4096, 4
# sm_90's own choices: num_stages by (kernel, 16-bit?, block_d); every tile and every other
# entry is sm_80's (Triton's default, 3 stages). The forward's K/V loop is software-pipelined
# num_stages deep, each stage one K and one V tile in shared memory (16-32 KB for these 16-bit
# tiles: 32 or 64 keys x d128, 32 keys x d256). Reason for the 4th stage: sm_90's wgmma tensor
# cores finish an iteration's two dots about 2.5x sooner per SM than sm_80's mma.sync (dense
# fp16: ~990 TFLOPS on 132 SMs vs ~312 on 108) while a load from memory takes about as long,
# so at equal tiles the loop needs more K/V tiles in flight to keep them busy; and sm_90 has
# the room: with it these programs take 88-188 KB (ptxas, sm_90), within the 227 KB per block
# with >= 39 KB to spare, at no occupancy cost (160-255 registers per thread on 8 warps
# already allow one program per SM). sm_80 keeps 3: its slower dots cover the loads' latency
# sooner (4 stages would fit there too: 132-156 KB for the unmasked and fp32-mask programs).
# d64 keeps 3 on sm_90 as well: its unmasked 4-warp program has no register headroom (252 of
# 255 at 3 stages, 255 at 4). No GPU was available to time any of this: the argument above is
# the whole case; the AOT report checks 0 spills and shared memory within each arch's limit.
_SM90_STAGES = {
    ("fwd", True, 128): 4,
    ("fwd", True, 256): 4,
}
# The 99 KB GPUs' choices (config_arch 86: compute capability 8.6 / 8.9 / 12.x, whose blocks
# get at most 99 KB of shared memory, against sm_80's 163 KB): sm_80's tiles with 2 pipeline
# stages instead of 3 for the variants, keyed (kernel, 16-bit?, block_d, masked?, dropout?),
# whose sm_80 program needs more than 99 KB: the d256 ones (a K + V stage of 32 16-bit or 16
# fp32 keys is 32 KB), the unmasked 16-bit forward at d128 (m128n64: 115 KB) and the 16-bit d64
# forward with mask and dropout (its fp32-mask launches stage a 32 KB mask tile: 120 KB). One
# stage fewer frees one K / V (and mask) tile: the AOT report checks each within 99 KB on sm_86
# with zero spills. Tiles stay sm_80's, so the results are bitwise sm_80's.
_SM86_STAGES = {
    **{(k, b, 256, m, dr): 2 for k in ("fwd", "dkdv", "dq") for b in (False, True)
       for m in (False, True) for dr in (False, True)},
    **{("fwd", True, 128, False, dr): 2 for dr in (False, True)},
    ("fwd", True, 64, True, True): 2,
    ("dq", False, 256, True, True): 1,  # 2 stages: 100 KB with an fp32 mask
}  # fmt: skip


def head_bucket(head_dim: int) -> int:
    """The padded head dim (BLOCK_D) serving head dims up to ``head_dim``."""
    for d in HEAD_BUCKETS:
        if head_dim <= d:
            return d
    raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM}")


def attention_config(
    kernel: str,
    head_dim: int,
    dtype: torch.dtype,
    arch: int = 80,
    masked: bool = False,
    dropout: bool = False,
) -> AttnConfig:
    """Launch config of ``kernel`` ("fwd", "pre", "dkdv", "dq") for head dim max(E, Ev) =
    ``head_dim`` (<= 256, after the padding to 16 bytes), data type ``dtype``, with or without
    a mask, for the variant with dropout code (DROPOUT=1) or without, on an sm_``arch`` GPU
    (ARCHS, see config_arch; 86 and 90 use the sm_80 tiles, which compile without spills
    there too, with _SM86_STAGES' shallower or _SM90_STAGES' deeper pipelines)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention_config: kernel must be one of {KERNELS}, got {kernel!r}")
    if arch not in ARCHS:
        raise ValueError(f"attention_config: arch must be one of {ARCHS}, got {arch}")
    d = head_bucket(head_dim)
    if kernel == "pre":
        return AttnConfig(_PRE_ELEMS // d, 0, d, _PRE_WARPS)
    key = (kernel, dtype != torch.float32, d)
    bm, bn, w = _MASKED_TILES.get(key, _TILES[key]) if masked else _TILES[key]
    if dropout:
        bm, bn, w = _DROPOUT_TILES.get((*key, masked), (bm, bn, w))
    stages = aot.DEFAULT_NUM_STAGES
    if arch == 90:
        stages = _SM90_STAGES.get(key, stages)
    elif arch == 86:
        stages = _SM86_STAGES.get((*key, masked, dropout), stages)
    return AttnConfig(bm, bn, d, w, stages)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (16-bit data?, mask kind) compiled twice, without dropout code (DROPOUT=0) and with it
# (DROPOUT=1): the common configurations. Every other one has only the DROPOUT=1 variant, whose
# dropout code sits behind a uniform runtime branch (drop_thr != 0), so no-dropout launches skip
# it: fewer AOT specs, at the price of that variant's register allocation.
_DROPOUT_PAIRED = {(True, 0), (True, 1)}


def dropout_variant(dtype: torch.dtype, kind: int, threshold: int) -> int:
    """The DROPOUT constexpr a launch with mask kind ``kind`` (0 none, 1 bool, 2 additive T,
    3 additive fp32) and dropout ``threshold`` uses."""
    if (dtype != torch.float32, kind) in _DROPOUT_PAIRED:
        return int(threshold != 0)
    return 1


def _dropout_variants(dtype: torch.dtype, kind: int) -> tuple[int, ...]:
    return (0, 1) if (dtype != torch.float32, kind) in _DROPOUT_PAIRED else (1,)


_LOG2E_PY = 1.4426950408889634
_PLACEHOLDER: dict[torch.device, torch.Tensor] = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    # an int32 pair standing for the pointers a launch never reads (the mask without one, cu_q /
    # cu_k of a dense batch), so every variant has one signature
    if device not in _PLACEHOLDER:
        _PLACEHOLDER[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _PLACEHOLDER[device]


def config_arch(device: torch.device) -> int:
    """The config table (ARCHS) for ``device``: 90 for a compute capability 9.x GPU (sm_90's
    227 KB of shared memory per block); 86 for 8.6, 8.9 and 12.x (99 KB per block; also taken,
    as the smallest table, by the GPUs before 8.0, which are not a target: the report does not
    compile for them); 80 for every other GPU (8.0 and 8.7: 163 KB; 10.x: 227 KB) and for a
    device that is not a GPU (the interpreter on CPU tensors; tests pick an arch with the
    launchers' ``arch``)."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9:
        return 90
    if (major, minor) in ((8, 6), (8, 9)) or major == 12 or major < 8:
        return 86
    return 80


def _check_tensor(fn: str, name: str, t, shape: tuple, dtype: torch.dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{fn}: {name} must be {tuple(shape)} of {dtype}, got "
                         f"{tuple(t.shape)} of {t.dtype}")  # fmt: skip
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, q on {device}")
    if t.dim() == 4 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{fn}: {name}'s last dim must be contiguous (stride(-1) == 1)")


def _check_qkv(fn: str, q, k, v) -> tuple[int, ...]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor")
    if q.dtype not in _DTYPES:
        raise ValueError(f"{fn}: dtype {q.dtype} is not supported (float32, float16, bfloat16)")
    b, hq, length, e = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != e:
        raise ValueError(f"{fn}: k must be ({b}, Hk, S, {e}), got {tuple(k.shape)}")
    hk, s = k.shape[1], k.shape[2]
    ev = v.shape[3]
    _check_tensor(fn, "q", q, q.shape, q.dtype, q.device)
    _check_tensor(fn, "k", k, (b, hk, s, e), q.dtype, q.device)
    _check_tensor(fn, "v", v, (b, hk, s, ev), q.dtype, q.device)
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"{fn}: Hq ({hq}) must be a multiple of Hk ({hk})")
    if not (1 <= e <= MAX_HEAD_DIM and 1 <= ev <= MAX_HEAD_DIM):
        raise ValueError(f"{fn}: head dims must be in [1, {MAX_HEAD_DIM}], got E {e}, Ev {ev}")
    if length >= MAX_LEN or s >= MAX_LEN:
        raise ValueError(f"{fn}: L ({length}) and S ({s}) must be below 2^29")
    return b, hq, length, e, hk, s, ev


def _check_lse(fn: str, lse, shape: tuple, device) -> None:
    _check_tensor(fn, "lse", lse, shape, torch.float32, device)
    if not lse.is_contiguous():
        raise ValueError(f"{fn}: lse must be contiguous")


def _check_varlen(fn: str, opts, b: int, length: int, s: int, device):
    """(varlen, cu_q, cu_k, batch entries or sequences, query bound, key bound)."""
    cu_q, cu_k = opts.cu_q, opts.cu_k
    if cu_q is None and cu_k is None:
        ph = _placeholder(device)
        return False, ph, ph, b, length, s
    if cu_q is None or cu_k is None:
        raise ValueError(f"{fn}: cu_q and cu_k must be given together")
    for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{fn}: {name} must be a non-empty 1-D int32 tensor")
        if cu.device != device or (cu.shape[0] > 1 and cu.stride(0) != 1):
            raise ValueError(f"{fn}: {name} must be contiguous, on q's device")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"{fn}: cu_q and cu_k hold {cu_q.shape[0]} and {cu_k.shape[0]} offsets")
    if b != 1:
        raise ValueError(f"{fn}: a packed (varlen) batch has B == 1, got {b}")
    # the largest lengths bound the grid; without them the totals do (no host sync)
    max_q = min(opts.max_q, length) if opts.max_q > 0 else length
    max_k = min(opts.max_k, s) if opts.max_k > 0 else s
    return True, cu_q, cu_k, cu_q.shape[0] - 1, max_q, max_k


def _check_mask(fn: str, mask, q, shape: tuple, varlen: bool):
    """(mask kind: 0 none, 1 bool, 2 additive of q's dtype, 3 additive fp32 on fp16 / bf16
    data; pointer argument; its four strides). The kernels' MASK is min(kind, 2)."""
    if mask is None:
        return 0, _placeholder(q.device), (0, 0, 0, 0)
    if varlen:
        raise ValueError(f"{fn}: a mask is only for dense batches (not with cu_q / cu_k)")
    if not isinstance(mask, torch.Tensor) or mask.dtype not in (torch.bool, q.dtype,
                                                                torch.float32):  # fmt: skip
        raise ValueError(f"{fn}: mask must be bool, {q.dtype} or float32")
    if tuple(mask.shape) != tuple(shape) or mask.device != q.device:
        raise ValueError(f"{fn}: mask must be a {tuple(shape)} view on q's device, got "
                         f"{tuple(mask.shape)} on {mask.device}")  # fmt: skip
    if mask.dtype == torch.bool:
        return 1, mask.view(torch.uint8), tuple(mask.stride())
    return 2 if mask.dtype == q.dtype else 3, mask, tuple(mask.stride())


def _i32(x: int) -> int:
    # a uint32 value as the int32 with its bits (so that the JIT types it i32)
    return x - (1 << 32) if x >= 1 << 31 else x


def _dropout(fn: str, opts) -> tuple[int, tuple[int, int, int, float]]:
    """(threshold, the kernels' seed_lo, seed_hi, drop_thr, drop_scale arguments)."""
    thr = int(opts.drop_threshold)
    seed = int(opts.seed)
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"{fn}: seed must be in [0, 2^64), got {seed}")
    if not 0 <= thr < 1 << 32:
        raise ValueError(f"{fn}: drop_threshold must be in [0, 2^32), got {thr}")
    scale = float(opts.drop_scale) if thr else 1.0
    return thr, (_i32(seed & 0xFFFFFFFF), _i32(seed >> 32), _i32(thr), scale)


def _window(opts, length: int, s: int) -> tuple[int, int]:
    # -1 (unbounded) -> a sentinel above every |j - d(i)|, so the kernels need no branch
    big = max(length, s) + 1
    wl = big if opts.window_left < 0 else min(int(opts.window_left), big)
    wr = big if opts.window_right < 0 else min(int(opts.window_right), big)
    return wl, wr


def _grid(fn: str, *factors: int) -> int:
    n = math.prod(factors)
    if n >= 1 << 31:
        raise ValueError(f"{fn}: {n} programs (B * H * blocks) exceed 2^31 - 1")
    return n


def _vec(dtype: torch.dtype) -> int:
    # elements per 16-byte vector
    return 16 // torch.empty(0, dtype=dtype).element_size()


def _pad(d: int, vec: int) -> int:
    return -(-d // vec) * vec


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    # batch, head, row strides; 0 for a dim of size 1 (never stepped over)
    return tuple(st if n > 1 else 0 for st, n in zip(t.stride()[:3], t.shape[:3], strict=True))


def _aligned(t: torch.Tensor, d: int, vec: int) -> bool:
    # what the kernels' _tile assumes: 16-byte aligned start and strides, head dim d
    return (t.shape[-1] == d and t.data_ptr() % 16 == 0
            and all(st % vec == 0 for st in _strides(t)))  # fmt: skip


def _input(t: torch.Tensor, d: int, vec: int) -> torch.Tensor:
    """t, or a zero-padded aligned copy of it with head dim d (zeros change no dot product)."""
    if _aligned(t, d, vec):
        return t
    buf = t.new_zeros(*t.shape[:-1], d)
    buf[..., : t.shape[-1]] = t
    return buf


def _output(t: torch.Tensor, d: int, vec: int) -> torch.Tensor:
    """t, or an aligned scratch with head dim d that _copy_back copies into t."""
    return t if _aligned(t, d, vec) else t.new_empty(*t.shape[:-1], d)


def _copy_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src is not dst:
        dst.copy_(src[..., : dst.shape[-1]])


def attention_fwd(q, k, v, mask, out, lse, opts, *, arch: int | None = None) -> None:
    """out, lse = attention.h's forward.

    q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev): fp32 / fp16 / bf16 strided views whose
    last dim is contiguous, Hq % Hk == 0, E, Ev <= 256; mask None or a (B, Hq, L, S) view of
    bool (True: the key takes part) or q's dtype (added to the scaled scores), dense only;
    out (B, Hq, L, Ev) of q's dtype (any strides, last dim contiguous) and lse (B, Hq, L)
    contiguous fp32, overwritten (lse in natural log, -inf for a row without keys, whose output
    is zeros). opts: lmkernels.ops.attention.AttnOptions (scale, window_left / window_right,
    -1 unbounded, causal = window_right 0; bottom_right; cu_q / cu_k int32 offsets of a packed
    batch, then B == 1 and L / S are the totals, max_q / max_k the longest sequences; rows
    outside every sequence are not written).
    Tensors that are not 16-byte aligned (start, batch / head / row strides, head dim a
    multiple of 16 bytes) are served through a zero-padded aligned copy (outputs: a scratch
    copied back): extra traffic, same results. arch: the config table (ARCHS) to launch with;
    None: config_arch(q.device).
    """
    fn = "attention_fwd"
    b, hq, length, e, hk, s, ev = _check_qkv(fn, q, k, v)
    _check_tensor(fn, "out", out, (b, hq, length, ev), q.dtype, q.device)
    _check_lse(fn, lse, (b, hq, length), q.device)
    varlen, cu_q, cu_k, nb, max_q, _ = _check_varlen(fn, opts, b, length, s, q.device)
    kind, m, m_st = _check_mask(fn, mask, q, (b, hq, length, s), varlen)
    thr, drop_args = _dropout(fn, opts)
    drop = dropout_variant(q.dtype, kind, thr)
    wl, wr = _window(opts, length, s)
    vec = _vec(q.dtype)
    e_p, ev_p = _pad(e, vec), _pad(ev, vec)
    arch = config_arch(q.device) if arch is None else arch
    cfg = attention_config("fwd", max(e_p, ev_p), q.dtype, arch, kind != 0, drop == 1)
    n_mb = triton.cdiv(max_q, cfg.block_m)
    grid = _grid(fn, n_mb, nb, hq)
    if grid == 0:
        return
    q_, k_, v_ = _input(q, e_p, vec), _input(k, e_p, vec), _input(v, ev_p, vec)
    o_ = _output(out, ev_p, vec)
    _attn_fwd_kernel[(grid,)](
        q_, k_, v_, o_, lse, m, cu_q, cu_k, *_strides(q_), *_strides(k_), *_strides(v_),
        *_strides(o_), *m_st, hq, hq // hk, length, s, e_p, ev_p, n_mb, int(varlen),
        float(opts.scale) * _LOG2E_PY, wl, wr, int(bool(opts.bottom_right)), *drop_args,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, MASK=min(kind, 2),
        DROPOUT=drop, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _copy_back(out, o_)


def attention_bwd(dout, q, k, v, out, lse, mask, dq, dk, dv, opts, *, arch: int | None = None
                  ) -> None:  # fmt: skip
    """dq, dk, dv = attention.h's backward (deterministic: no atomics, fixed summation order).

    dout, out (B, Hq, L, Ev) and q, k, v, mask, lse, opts as attention_fwd's (out and lse as
    it stored them); dq, dk, dv like q, k, v (any strides, last dim contiguous), overwritten
    (varlen: rows outside every sequence are not written). Uses a (B, Hq, L) fp32 scratch for
    rowsum(dout * out); unaligned tensors and arch as in attention_fwd.
    """
    fn = "attention_bwd"
    b, hq, length, e, hk, s, ev = _check_qkv(fn, q, k, v)
    for name, t in (("dout", dout), ("out", out)):
        _check_tensor(fn, name, t, (b, hq, length, ev), q.dtype, q.device)
    _check_lse(fn, lse, (b, hq, length), q.device)
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_tensor(fn, name, t, like.shape, q.dtype, q.device)
    varlen, cu_q, cu_k, nb, max_q, max_k = _check_varlen(fn, opts, b, length, s, q.device)
    kind, m, m_st = _check_mask(fn, mask, q, (b, hq, length, s), varlen)
    thr, drop_args = _dropout(fn, opts)
    drop = dropout_variant(q.dtype, kind, thr)
    wl, wr = _window(opts, length, s)
    arch = config_arch(q.device) if arch is None else arch
    vec = _vec(q.dtype)
    e_p, ev_p = _pad(e, vec), _pad(ev, vec)
    d = max(e_p, ev_p)
    pre = attention_config("pre", d, q.dtype, arch)
    kv = attention_config("dkdv", d, q.dtype, arch, kind != 0, drop == 1)
    cq = attention_config("dq", d, q.dtype, arch, kind != 0, drop == 1)
    n_pre = triton.cdiv(length, pre.block_m)
    n_nb = triton.cdiv(max_k, kv.block_n)
    n_mb = triton.cdiv(max_q, cq.block_m)
    grids = (_grid(fn, n_pre, b, hq), _grid(fn, n_nb, nb, hk), _grid(fn, n_mb, nb, hq))
    q_, k_, v_ = _input(q, e_p, vec), _input(k, e_p, vec), _input(v, ev_p, vec)
    o_, do_ = _input(out, ev_p, vec), _input(dout, ev_p, vec)
    dq_, dk_, dv_ = _output(dq, e_p, vec), _output(dk, e_p, vec), _output(dv, ev_p, vec)
    qk_scale, scale = float(opts.scale) * _LOG2E_PY, float(opts.scale)
    tail = (n_nb, int(varlen), qk_scale, scale, wl, wr, int(bool(opts.bottom_right)), *drop_args)
    delta = torch.empty(b, hq, length, dtype=torch.float32, device=q.device)
    if grids[0]:
        _attn_bwd_pre_kernel[(grids[0],)](
            o_, do_, delta, *_strides(o_), *_strides(do_), hq, length, ev_p, n_pre,
            BLOCK_M=pre.block_m, BLOCK_D=pre.block_d, num_warps=pre.num_warps,
            num_stages=pre.num_stages,
        )  # fmt: skip
    strides = (*_strides(q_), *_strides(k_), *_strides(v_), *_strides(do_))
    if grids[1]:
        _attn_bwd_dkdv_kernel[(grids[1],)](
            q_, k_, v_, do_, lse, delta, dk_, dv_, m, cu_q, cu_k, *strides, *_strides(dk_),
            *_strides(dv_), *m_st, hq, hk, hq // hk, length, s, e_p, ev_p, *tail,
            BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, BLOCK_D=kv.block_d, MASK=min(kind, 2),
            DROPOUT=drop, num_warps=kv.num_warps, num_stages=kv.num_stages,
        )  # fmt: skip
    if grids[2]:
        _attn_bwd_dq_kernel[(grids[2],)](
            q_, k_, v_, do_, lse, delta, dq_, m, cu_q, cu_k, *strides, *_strides(dq_), *m_st,
            hq, hq // hk, length, s, e_p, ev_p, n_mb, *tail[1:],
            BLOCK_M=cq.block_m, BLOCK_N=cq.block_n, BLOCK_D=cq.block_d, MASK=min(kind, 2),
            DROPOUT=drop, num_warps=cq.num_warps, num_stages=cq.num_stages,
        )  # fmt: skip
    for dst, src in ((dq, dq_), (dk, dk_), (dv, dv_)):
        _copy_back(dst, src)


# ---------------------------------------------------------------------------------------------
# AOT spec list: every (kernel, signature, constexprs, num_warps, num_stages, archs) the
# launchers can pick
# ---------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNEL_FN = {
    "fwd": _attn_fwd_kernel,
    "pre": _attn_bwd_pre_kernel,
    "dkdv": _attn_bwd_dkdv_kernel,
    "dq": _attn_bwd_dq_kernel,
}
_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "MASK", "DROPOUT")
_FP32_ARGS = ("qk_scale", "scale", "drop_scale")
_FP32_PTRS = ("lse_ptr", "delta_ptr")
_I32_PTRS = ("cu_q_ptr", "cu_k_ptr")
_MASK_TY = {0: "i32", 1: "u8", 3: "fp32"}  # 2 (additive): T


def _spec(kernel: str, t: str, cfg: AttnConfig, kind: int, drop: int = 0) -> dict:
    fn = _KERNEL_FN[kernel]
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name == "mask_ptr":
            sig[name] = "*" + _MASK_TY.get(kind, t)
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + t
        elif name in _FP32_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    if kernel == "pre":
        const = dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d)
        label = f"{t} pre {cfg}"
    else:
        const = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                     MASK=min(kind, 2), DROPOUT=drop)  # fmt: skip
        label = f"{t} {kernel} {cfg} mask:{('none', 'bool', 'add', 'add32')[kind]}"
        label += " drop" if drop else ""
    return dict(kernel=fn, signature=sig, constexprs=const, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, config=label)  # fmt: skip


def aot_specs(aligned: bool = False) -> list[dict]:
    """Every (kernel, signature, constexprs, num_warps, num_stages) attention_fwd / attention_bwd
    can launch, per arch:
    3 head-dim buckets x (fp16 / bf16: forward, dK/dV, dQ for 4 mask kinds, the none / bool ones
    with DROPOUT 0 and 1, + the preprocess = 19 each; fp32: 3 kernels x 3 mask kinds + the
    preprocess = 10) = 144 launches per arch (the window, causal-ness, bottom_right, varlen and
    the dropout seed / threshold are runtime arguments; sm_86 and sm_90 use the sm_80 tiles,
    with _SM86_STAGES' / _SM90_STAGES' num_stages): 223 specs (one per distinct config, 81 of
    them shared by all three archs), 432 (spec, arch) pairs.

    Each spec is a dict with kernel (the JITFunction), signature, constexprs, num_warps,
    num_stages, archs (the ARCHS whose launchers pick it; it compiles for those only) and
    config (a short label), for lmkernels.triton_kernels.aot.compile_report. aligned=True gives
    the variants the JIT builds for 16-byte-aligned tensors (vectorised loads); the default gives
    the generic variants.
    """
    by_key: dict[tuple, dict] = {}  # one spec per distinct launch, with the archs that pick it
    for dtype in _DTYPES:
        t = _TY[dtype]
        for d in HEAD_BUCKETS:
            for arch in ARCHS:
                for kernel in KERNELS:
                    for kind in _mask_kinds(kernel, dtype):
                        drops = (0,) if kernel == "pre" else _dropout_variants(dtype, kind)
                        for drop in drops:
                            cfg = attention_config(kernel, d, dtype, arch, kind != 0, drop == 1)
                            key = (t, kernel, cfg, kind, drop)
                            if key not in by_key:
                                by_key[key] = _spec(kernel, t, cfg, kind, drop)
                                by_key[key]["archs"] = ()
                            by_key[key]["archs"] += (arch,)
    specs = list(by_key.values())
    if not aligned:
        return specs
    specs = aot.aligned_variants(specs)
    for spec in specs:
        # the ints the JIT would mark 16-divisible too: head dims and the T tensors' strides
        sig = spec["signature"]
        spec["divisible_by_16"] = tuple(
            n for n in sig if sig[n].startswith("*") or n in ("E", "Ev") or _is_t_stride(n)
        )
    return specs


def _mask_kinds(kernel: str, dtype: torch.dtype) -> tuple[int, ...]:
    if kernel == "pre":
        return (0,)
    return (0, 1, 2) if dtype == torch.float32 else (0, 1, 2, 3)


def _is_t_stride(name: str) -> bool:
    return name.endswith(("_sb", "_sh", "_sl")) and not name.startswith("m_")
