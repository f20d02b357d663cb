// Flash attention, forward and backward (contract: lmk/attention.h; entry points and the caller's
// part: lmk/attention_cuda.h). Torch-free: raw pointers, element strides, sizes and a stream.
//
// Forward, fp16 / bf16 (attn_fwd_mma_kernel<T, D>): tensor cores (mma.sync m16n8k16, fp32
// accumulation). One CTA of 4 warps per (block of BM = 64 query rows, batch * head); each warp
// owns 16 rows. The head dims E and Ev are padded with zeros to a compile-time bucket
// D = 64, 128 or 256 (the larger of the two picks it), so 80 or 96 run in the 128 bucket.
// Shared memory holds the Q tile and one K and one V tile of BN keys (64; 32 for D = 256, which
// keeps the score registers within the budget), rows of D elements in 16-byte chunks swizzled
// (chunk c of row r at c ^ (r % 8)) so that ldmatrix and the 16-byte cp.async writes are free of
// bank conflicts. The key blocks are visited in order over only those that intersect the window /
// causal band of the CTA's rows (and the sequence); per block:
//   V load issued (cp.async) | S = Q K^T (ldmatrix Q and K, mma) | next K load issued |
//   scale, masks, online softmax in registers (exp2 with scale * log2 e folded in) |
//   O += P V (P converted to T in registers, V through ldmatrix.trans).
// Element masks (sequence end, window, the bool / additive mask) are applied only to blocks that
// need them (a uniform test per block); the mask, read through its strides, is staged per block
// as a (BM x BN) fp32 tile in log2 units in shared memory (coalesced reads, few registers). The
// epilogue divides by the row sums, rounds once to T and writes o and lse (rows without keys:
// zeros and -inf). Loads use 16-byte cp.async when the tensor's pointer and strides allow it
// (E or Ev a multiple of 8), else element loads into the same tiles; columns past E / Ev and
// rows past the sequence are zeros.
// Forward, fp32 (attn_fwd_simt_kernel): the same features in plain fp32 arithmetic; one CTA of 4
// warps per 16 query rows (4 per warp) and (batch, head), K / V tiles of 32 keys in shared memory,
// a lane per key for the scores and a lane per column for the output.
//
// Backward (FA2 scheme, deterministic: no atomics, every sum in an order fixed by the shapes):
//   prep   D[i] = sum_e dO[i, e] * O[i, e] in fp32, one warp per query row, into the workspace
//          (attn_bwd_prep_kernel<T>);
//   dkdv   one CTA per (key block, batch, kv head) keeps dk and dv in fp32 registers; it loops
//          over the group's query heads in order and, per head, over the query tiles that reach
//          its keys in order, recomputing P from lse, then writes dk, dv once;
//   dq     one CTA per (query block, batch, head) loops over the key blocks of its band in order.
// fp16 / bf16 run on tensor cores (attn_bwd_dkdv_mma_kernel<T, D>, attn_bwd_dq_mma_kernel<T, D>,
// the head dims padded to D = 64, 128 or 256 as in the forward): dkdv has 64 keys per CTA (16 per
// warp) and query tiles of 32: S^T = K Q^T and dP^T = V dO^T (mma), P^T and dS^T = P^T (dP^T - D)
// in registers, then dV += P^T dO and dK += dS^T Q with the register tiles as the A operands
// (rounded to T); dq has 64 rows per CTA and key tiles of 64: S = Q K^T, dP = dO V^T,
// dQ += dS K. D = 256: dk and dv of 16 keys x 256 columns would take 256 registers per thread,
// so dkdv takes 32 keys per CTA and splits the work over the warps: warp w computes S^T / dP^T
// for keys 16 (w % 2) .. + 15 and queries 16 (w / 2) .. + 15 of the tile, P^T and dS^T (rounded
// to T) meet in shared memory, and the warp accumulates columns 128 (w / 2) .. + 127 of its
// keys' dk / dv from there; dq keeps its register path with key tiles of 16 (its Q, dO, K, V and
// mask tiles then fit 99 KB of shared memory, see kSmemPerBlock). fp32 data runs the
// SIMT kernels (attn_bwd_dkdv_kernel<T> / attn_bwd_dq_kernel<T>: dkdv per 16 keys, a warp per
// 4 keys and a lane per column of dk / dv, a lane per query of a 32-row tile recomputing S, P and
// dP; dq per 16 rows with key tiles of 32, as the forward).
//
// Masks: bool, additive T, or additive f32 (on 16-bit data too; used unrounded in fp32).
// Dropout (drop_threshold > 0; a template parameter DROP of every kernel, so the kernels without it
// are unchanged; with it, the D = 128 backward takes smaller tiles: dkdv query tiles of 16, dq key
// tiles of 32, which keeps it within the registers without spills; D = 256 has such tiles): the
// keep bits come from lmk/philox.h with the packed positions as counters (varlen: batch 0, rows
// cu_q[b] + i, keys cu_k[b] + j). The forward's row max / sum / lse use the undropped P, P V takes
// P * keep and the epilogue multiplies by drop_scale; the backward uses dS = P (keep drop_scale dP
// - D) and dV += (P keep)^T dO, scaled by drop_scale once at the end. In the mma layouts one Philox
// call (four neighbouring keys of one row) serves a thread's pair of adjacent key columns (forward,
// dq); in dkdv, whose column pairs are queries, the lanes holding keys j and j ^ 1 each draw one
// of the two rows and swap a bit (one shuffle). A varlen sequence starting at an odd packed key
// draws per element instead.
// Numerics: scores and softmax in fp32; exp2 / log2 are the MUFU approximations (fast_exp2 /
// fast_log2: relative error ~2^-22); everything else is IEEE (no --use_fast_math). The tensor-core
// kernels round P (and dS) to T for their second product (as every flash kernel does); the row sums
// use the fp32 P. Device primitives (ldmatrix, mma, cp.async, shuffles) sit in one block below; a
// host test harness may define LMK_ATTN_EMULATE and provide them (with the launch macro) to run the
// kernels on a CPU: each CTA as cooperative threads, the warp collectives computed from the PTX
// fragment layouts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lmk/attention.h"
#include "lmk/attention_cuda.h"
#include "lmk/cuda_acc.h"

namespace lmk {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

// ------------------------------------------------------------------ device primitives

#ifndef LMK_ATTN_EMULATE
__device__ __forceinline__ void block_sync() { __syncthreads(); }

__device__ __forceinline__ float shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}
__device__ __forceinline__ float shfl_idx(float v, int src) {
  return __shfl_sync(0xffffffffu, v, src);
}

__device__ __forceinline__ unsigned char* smem_base() {
  extern __shared__ __align__(16) unsigned char lmk_attn_smem[];
  return lmk_attn_smem;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, asynchronous; zeros instead when !valid (src is not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The MUFU approximations (relative error ~2^-22; results below 2^-126 flush to 0), as every
// flash kernel uses for its softmax; the module is built without --use_fast_math, so exp2f /
// log2f would be the slower IEEE ones.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// s * scale_log2 rounded, never contracted into a following add: the backward recomputes P from
// the forward's rounded scaled scores, so an FMA in one pass and not the other would shift every
// exponent by the product's rounding (fp32 dV beyond twice torch's error on an H100).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename V>
__device__ __forceinline__ V ld_g(const V* p) {
  return *p;
}
template <typename V>
__device__ __forceinline__ void st_g(V* p, V v) {
  *p = v;
}

#define LMK_ATTN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif  // LMK_ATTN_EMULATE

// ------------------------------------------------------------------ shared helpers

__host__ __device__ __forceinline__ int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }
__host__ __device__ __forceinline__ int64_t max64(int64_t x, int64_t y) { return x > y ? x : y; }

__device__ __forceinline__ uint16_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Two floats rounded to T, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(bits16(from_acc<T>(lo))) |
         (static_cast<uint32_t>(bits16(from_acc<T>(hi))) << 16);
}

// Everything the kernels need, by value (forward and backward).
struct Args {
  const void* q;
  const void* k;
  const void* v;
  const void* o;  // the forward writes it (const_cast), the backward reads it
  float* lse;     // (B, Hq, L) / (1, Hq, total_q)
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl;
  const void* mask;  // (B, Hq, L, S) of bool, T or f32, or null
  int64_t m_sb, m_sh, m_sl, m_ss;
  const int32_t* cu_q;  // varlen offsets (B + 1), or null
  const int32_t* cu_k;
  int64_t L, S;    // dense lengths; varlen: upper bounds of the sequences' lengths
  int64_t wl, wr;  // window sides, -1: unbounded (every side at least L + S is made -1)
  int B, Hq, group, E, Ev;
  int nblk;       // row (or key) blocks per (batch, head) of the kernel's grid
  int mask_kind;  // kMaskBool (false = -inf), kMaskT or kMaskF32 (additive)
  int bottom_right;
  int q_vec, k_vec, v_vec;  // 16-byte loads allowed (pointer, strides and width)
  int do_vec;               // the same for dO (with v_vec's width Ev)
  float scale, scale_log2;
  // dropout (lmk/philox.h): keep iff the score's random number >= drop_threshold (0: none)
  uint64_t seed;
  uint32_t drop_threshold;
  float drop_scale;  // 2^32 / (2^32 - drop_threshold)
  // backward
  const void* dout;
  int64_t do_sb, do_sh, do_sl;
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_sb, dq_sh, dq_sl, dk_sb, dk_sh, dk_sl, dv_sb, dv_sh, dv_sl;
  float* dsum;  // workspace: D[i], laid out like lse
};

// One sequence: its first rows in the packed tensors (varlen) and its lengths.
struct Seq {
  int64_t q0, k0, Lb, Sb;
};

__device__ __forceinline__ Seq seq_of(const Args& a, int b) {
  Seq s;
  if (a.cu_q != nullptr) {
    s.q0 = ld_g(a.cu_q + b);
    s.Lb = ld_g(a.cu_q + b + 1) - s.q0;
    s.k0 = ld_g(a.cu_k + b);
    s.Sb = ld_g(a.cu_k + b + 1) - s.k0;
  } else {
    s.q0 = 0;
    s.k0 = 0;
    s.Lb = a.L;
    s.Sb = a.S;
  }
  return s;
}

// Row index of lse / D for row i of sequence b, head h.
__device__ __forceinline__ int64_t lse_index(const Args& a, int b, int h, const Seq& s, int64_t i) {
  if (a.cu_q != nullptr) return int64_t{h} * ld_g(a.cu_q + a.B) + s.q0 + i;
  return (int64_t{b} * a.Hq + h) * a.L + i;
}

// Keys [lo, hi) that rows r_lo .. r_hi (inclusive) may reach: the window band and the sequence.
__device__ __forceinline__ void key_range(const Args& a, int64_t r_lo, int64_t r_hi, int64_t off,
                                          int64_t Sb, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = Sb;
  if (a.wl >= 0) lo = max64(lo, r_lo + off - a.wl);
  if (a.wr >= 0) hi = min64(hi, r_hi + off + a.wr + 1);
}

// Query rows [lo, hi) that keys k_lo .. k_hi (inclusive) are reached by.
__device__ __forceinline__ void query_range(const Args& a, int64_t k_lo, int64_t k_hi, int64_t off,
                                            int64_t Lb, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = Lb;
  if (a.wr >= 0) lo = max64(lo, k_lo - off - a.wr);
  if (a.wl >= 0) hi = min64(hi, k_hi - off + a.wl + 1);
}

constexpr int kMaskBool = 0, kMaskT = 1, kMaskF32 = 2;
// Dynamic shared memory a block may use on every target GPU: the opt-in maximum of compute
// capability 8.6 / 8.9 / 12.x (8.0: 163 KB, 9.0: 227 KB). Each kernel's is checked against it
// at compile time, so one build serves them all.
constexpr int kSmemPerBlock = 99 * 1024;

// Bytes per mask element.
template <typename T>
__host__ __device__ __forceinline__ int64_t mask_esize(const Args& a) {
  return a.mask_kind == kMaskBool  ? 1
         : a.mask_kind == kMaskF32 ? static_cast<int64_t>(sizeof(float))
                                   : static_cast<int64_t>(sizeof(T));
}

// The mask's contribution to score (i, j) in log2 units: 0, -inf (bool false) or mask * log2 e
// (an f32 mask on 16-bit data is used as it is, unrounded).
template <typename T>
__device__ __forceinline__ float mask_log2(const Args& a, const void* mrow, int64_t j) {
  if (a.mask_kind == kMaskBool) {
    return ld_g(static_cast<const uint8_t*>(mrow) + j * a.m_ss) != 0 ? 0.f : kNegInf;
  }
  if (a.mask_kind == kMaskF32) return ld_g(static_cast<const float*>(mrow) + j * a.m_ss) * kLog2e;
  return to_acc(ld_g(static_cast<const T*>(mrow) + j * a.m_ss)) * kLog2e;
}

// ------------------------------------------------------------------ dropout (lmk/philox.h)

// Output k (0 .. 3) of a Philox call, by selects (no local memory for a dynamic index).
__device__ __forceinline__ uint32_t philox_pick(const Philox4& r, int k) {
  const uint32_t lo = (k & 1) ? r.x[1] : r.x[0], hi = (k & 1) ? r.x[3] : r.x[2];
  return (k & 2) ? hi : lo;
}

__device__ __forceinline__ Philox4 philox_at(const Args& a, uint32_t bh, int64_t i, int64_t j) {
  return philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), bh, 0u,
                       static_cast<uint32_t>(a.seed), static_cast<uint32_t>(a.seed >> 32));
}

// 1.f if score (i, j) of (batch * Hq + head) bh is kept, else 0.f (packed positions i, j).
__device__ __forceinline__ float drop_keep1(const Args& a, uint32_t bh, int64_t i, int64_t j) {
  return philox_pick(philox_at(a, bh, i, j), static_cast<int>(j & 3)) >= a.drop_threshold ? 1.f
                                                                                          : 0.f;
}

// The keep factors (1 / 0) of scores (i, j) and (i, j + 1). even: j is even (uniform), so both
// come from one Philox call.
__device__ __forceinline__ void drop_keep_kpair(const Args& a, uint32_t bh, int64_t i, int64_t j,
                                                bool even, float& z0, float& z1) {
  if (even) {
    const Philox4 r = philox_at(a, bh, i, j);
    const bool hi = (j & 2) != 0;
    z0 = (hi ? r.x[2] : r.x[0]) >= a.drop_threshold ? 1.f : 0.f;
    z1 = (hi ? r.x[3] : r.x[1]) >= a.drop_threshold ? 1.f : 0.f;
  } else {
    z0 = drop_keep1(a, bh, i, j);
    z1 = drop_keep1(a, bh, i, j + 1);
  }
}

// The keep factors of scores (i, j) and (i + 1, j) held by lane g of a pair of lanes (g, g ^ 1,
// 4 lanes apart in the mma layout) that hold keys j and j ^ 1 for the same queries. even: the
// pair's keys are j and j ^ 1 with j ^ 1 = j +- 1 in one group of four (uniform): the even lane
// draws row i, the odd one row i + 1, each for both keys, and they swap one bit (one Philox call
// per pair of elements).
__device__ __forceinline__ void drop_keep_qpair(const Args& a, uint32_t bh, int64_t i, int64_t j,
                                                int g, bool even, float& z0, float& z1) {
  if (even) {
    const bool odd = (g & 1) != 0;
    const Philox4 r = philox_at(a, bh, i + (odd ? 1 : 0), j);
    const float mine = philox_pick(r, static_cast<int>(j & 3)) >= a.drop_threshold ? 1.f : 0.f;
    const float other =
        philox_pick(r, static_cast<int>((j ^ 1) & 3)) >= a.drop_threshold ? 1.f : 0.f;
    const float got = shfl_xor(other, 4);
    z0 = odd ? got : mine;
    z1 = odd ? mine : got;
  } else {
    z0 = drop_keep1(a, bh, i, j);
    z1 = drop_keep1(a, bh, i + 1, j);
  }
}

// The dropout counters' (batch * Hq + head) of sequence b, head h: a varlen batch is batch 0.
__device__ __forceinline__ uint32_t drop_bh(const Args& a, int b, int h) {
  return static_cast<uint32_t>(a.cu_q != nullptr ? h : b * a.Hq + h);
}

// ------------------------------------------------------------------ tensor-core forward

template <typename T, int D, bool DROP>
struct MmaFwd {
  static constexpr int BM = 64;                  // query rows per CTA (16 per warp)
  static constexpr int BN = D <= 128 ? 64 : 32;  // keys per block (256: fewer S registers)
  static constexpr int kThreads = 128;
  static constexpr int kMinBlocks = D <= 64 ? 3 : D <= 128 ? 2 : 1;  // <= 168 / 255 / 255 regs
  static constexpr int kMaskLd =
      BN + 8;  // row stride of the mask tile (float2 reads conflict-free)
  static constexpr int kSmemData = (BM + 2 * BN) * D * static_cast<int>(sizeof(T));
  // with a mask: plus its (BM x BN) tile in log2 units
  static constexpr int kSmemMask = kSmemData + BM * kMaskLd * static_cast<int>(sizeof(float));
  static_assert(kSmemMask <= kSmemPerBlock,
                "the forward's shared memory must fit every target GPU");
};

// The mask's (BM x BN) tile for query rows m0.. and keys n0.. in log2 units (0 / -inf for bool)
// into sM (rows kMaskLd apart); entries past the sequence are 0 (the key range masks them).
template <typename T, int BM, int BN, int LD, int NT>
__device__ __forceinline__ void load_mask_tile(float* sM, const Args& a, const unsigned char* mp,
                                               int64_t m0, int64_t n0, int64_t Lb, int64_t Sb,
                                               int tid) {
  const int64_t msz = mask_esize<T>(a);
  const int rows = static_cast<int>(min64(BM, Lb - m0)),
            cols = static_cast<int>(min64(BN, Sb - n0));
  for (int idx = tid; idx < BM * BN; idx += NT) {
    const int r = idx / BN, c = idx % BN;
    float x = 0.f;
    if (r < rows && c < cols) x = mask_log2<T>(a, mp + ((m0 + r) * a.m_sl + n0 * a.m_ss) * msz, c);
    sM[r * LD + c] = x;
  }
}

// Element offset of 16-byte chunk c of row r in a swizzled tile with rows of D elements.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// A (ROWS x D) tile of T: rows < nrows and columns < ncols from src (rows `stride` elements
// apart), zeros elsewhere, into the swizzled shared tile sm. vec: 16-byte cp.async (the caller
// commits and waits); else element loads stored at once.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void load_tile(T* sm, const T* src, int64_t stride, int nrows, int ncols,
                                          bool vec, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kIters = ROWS * kChunks / NT;
  static_assert(ROWS * kChunks % NT == 0, "tile chunks must split evenly over the threads");
  if (vec) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kChunks, c = idx % kChunks;
      const bool ok = r < nrows && c * 8 < ncols;
      cp_async_16(sm + swz<D>(r, c), ok ? src + r * stride + c * 8 : src, ok);
    }
  } else {
    for (int it = 0; it < kIters; ++it) {
      const int idx = it * NT + tid;
      const int r = idx / kChunks, c = idx % kChunks;
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (r < nrows) {
        const T* row = src + r * stride;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int col = c * 8 + e;
          if (col < ncols)
            w[e / 2] |= static_cast<uint32_t>(bits16(ld_g(row + col))) << (16 * (e & 1));
        }
      }
      *reinterpret_cast<uint4*>(sm + swz<D>(r, c)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// Warp-level products on swizzled shared tiles (rows of D elements), fragments in the mma
// m16n8k16 layouts: a thread holds rows g = lane / 4 and g + 8 of a 16-row tile and, per 8-column
// n-tile, columns 2 (lane % 4) and 2 (lane % 4) + 1 (its c[0..3]).

// acc (16 x 8 NT) += A (rows a0 .. a0 + 15 of sA) * B^T, B = rows b0 .. b0 + 8 NT - 1 of sB: both
// tiles hold the reduction (the first KS * 16 columns) along their rows (Q K^T, K Q^T, dO V^T).
template <typename T, int D, int KS, int NT>
__device__ __forceinline__ void warp_mm_nt(float (&acc)[NT][4], const T* sA, int a0, const T* sB,
                                           int b0, int lane) {
  static_assert(NT % 2 == 0, "n-tiles come in pairs (one ldmatrix.x4)");
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t fa[4];
    ldsm_x4(fa, sA + swz<D>(a0 + (lane & 15), ks * 2 + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t fb[4];
      ldsm_x4(fb, sB + swz<D>(b0 + np * 16 + (lane & 7) + ((lane >> 4) << 3),
                              ks * 2 + ((lane >> 3) & 1)));
      mma_16816<T>(acc[2 * np], fa, fb[0], fb[1]);
      mma_16816<T>(acc[2 * np + 1], fa, fb[2], fb[3]);
    }
  }
}

// acc (16 x D) += P * B, P (16 x 16 KK) from the accumulator tiles p[2 KK][4] (rounded to T), B =
// rows b0 .. b0 + 16 KK - 1 of sB, all D columns (P V, P^T dO, dS^T Q, dS K).
template <typename T, int D, int KK>
__device__ __forceinline__ void warp_mm_pb(float (&acc)[D / 8][4], const float (&p)[2 * KK][4],
                                           const T* sB, int b0, int lane) {
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    uint32_t fa[4];
    fa[0] = pack2<T>(p[2 * kk][0], p[2 * kk][1]);
    fa[1] = pack2<T>(p[2 * kk][2], p[2 * kk][3]);
    fa[2] = pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    fa[3] = pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t fb[4];
      ldsm_x4_t(fb, sB + swz<D>(b0 + kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                dp * 2 + (lane >> 4)));
      mma_16816<T>(acc[2 * dp], fa, fb[0], fb[1]);
      mma_16816<T>(acc[2 * dp + 1], fa, fb[2], fb[3]);
    }
  }
}

// acc (16 x NC) += A * B, A = rows a0 .. a0 + 15 and the first 16 KK columns of the unswizzled
// shared tile sA (T, rows lda elements apart, 16-byte aligned), B = rows 0 .. 16 KK - 1 and columns
// c0 .. c0 + NC - 1 of sB (P^T dO and dS^T Q of the split dk / dv kernel).
template <typename T, int D, int KK, int NC>
__device__ __forceinline__ void warp_mm_sb(float (&acc)[NC / 8][4], const T* sA, int lda, int a0,
                                           const T* sB, int c0, int lane) {
  static_assert(NC % 16 == 0, "column tiles come in pairs (one ldmatrix.x4)");
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    uint32_t fa[4];
    ldsm_x4(fa, sA + (a0 + (lane & 15)) * lda + (kk * 2 + (lane >> 4)) * 8);
#pragma unroll
    for (int dp = 0; dp < NC / 16; ++dp) {
      uint32_t fb[4];
      ldsm_x4_t(fb, sB + swz<D>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3),
                                c0 / 8 + dp * 2 + (lane >> 4)));
      mma_16816<T>(acc[2 * dp], fa, fb[0], fb[1]);
      mma_16816<T>(acc[2 * dp + 1], fa, fb[2], fb[3]);
    }
  }
}

template <typename T, int D, bool DROP>
__global__ void __launch_bounds__(MmaFwd<T, D, DROP>::kThreads, MmaFwd<T, D, DROP>::kMinBlocks)
    attn_fwd_mma_kernel(const Args a) {
  using C = MmaFwd<T, D, DROP>;
  constexpr int BM = C::BM, BN = C::BN, NT = C::kThreads;
  constexpr int KS = D / 16;  // k-steps of Q K^T
  constexpr int ON = D / 8;   // n-tiles of O
  constexpr int SN = BN / 8;  // n-tiles of S
  constexpr int LDM = C::kMaskLd;
  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sK = sQ + BM * D;
  T* sV = sK + BN * D;
  float* sM = reinterpret_cast<float*>(sV + BN * D);  // only with a mask
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;

  const int64_t bid = blockIdx.x;
  const int qb = a.nblk - 1 - static_cast<int>(bid % a.nblk);  // longest (causal) blocks first
  const int bh = static_cast<int>(bid / a.nblk);
  const int b = bh / a.Hq, h = bh % a.Hq;
  const Seq sq = seq_of(a, b);
  const int64_t m0 = int64_t{qb} * BM;
  if (m0 >= sq.Lb) return;
  const int rows = static_cast<int>(min64(BM, sq.Lb - m0));
  const int64_t off = a.bottom_right ? sq.Sb - sq.Lb : 0;
  int64_t klo, khi;
  key_range(a, m0, m0 + rows - 1, off, sq.Sb, klo, khi);
  const int hk = h / a.group;
  const bool varlen = a.cu_q != nullptr;

  float o[ON][4];
#pragma unroll
  for (int t = 0; t < ON; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float mrow[2] = {kNegInf, kNegInf}, lrow[2] = {0.f, 0.f};
  const int64_t i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  const uint32_t dbh = DROP ? drop_bh(a, b, h) : 0u;
  const bool keven = (sq.k0 & 1) == 0;  // the packed key of an even column is even

  if (klo < khi) {
    const T* qp =
        static_cast<const T*>(a.q) + (varlen ? 0 : b * a.q_sb) + h * a.q_sh + (sq.q0 + m0) * a.q_sl;
    const T* kp =
        static_cast<const T*>(a.k) + (varlen ? 0 : b * a.k_sb) + hk * a.k_sh + sq.k0 * a.k_sl;
    const T* vp =
        static_cast<const T*>(a.v) + (varlen ? 0 : b * a.v_sb) + hk * a.v_sh + sq.k0 * a.v_sl;
    const unsigned char* mp = nullptr;  // the mask of (b, h)
    if (a.mask != nullptr) {
      mp = static_cast<const unsigned char*>(a.mask) + (b * a.m_sb + h * a.m_sh) * mask_esize<T>(a);
    }
    const int nb0 = static_cast<int>(klo / BN), nb1 = static_cast<int>((khi + BN - 1) / BN);

    load_tile<T, D, BM, NT>(sQ, qp, a.q_sl, rows, a.E, a.q_vec, tid);
    load_tile<T, D, BN, NT>(sK, kp + int64_t{nb0} * BN * a.k_sl, a.k_sl,
                            static_cast<int>(min64(BN, sq.Sb - int64_t{nb0} * BN)), a.E, a.k_vec,
                            tid);
    cp_async_commit();

    for (int nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = int64_t{nb} * BN;
      const int nk = static_cast<int>(min64(BN, sq.Sb - n0));
      load_tile<T, D, BN, NT>(sV, vp + n0 * a.v_sl, a.v_sl, nk, a.Ev, a.v_vec, tid);
      cp_async_commit();
      if (mp != nullptr) load_mask_tile<T, BM, BN, LDM, NT>(sM, a, mp, m0, n0, sq.Lb, sq.Sb, tid);
      cp_async_wait<1>();  // Q and this K
      block_sync();

      float s[SN][4];
#pragma unroll
      for (int t = 0; t < SN; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
      warp_mm_nt<T, D, KS, SN>(s, sQ, warp * 16, sK, 0, lane);
      block_sync();  // every warp is done with sK
      if (nb + 1 < nb1) {
        const int64_t n1 = n0 + BN;
        load_tile<T, D, BN, NT>(sK, kp + n1 * a.k_sl, a.k_sl,
                                static_cast<int>(min64(BN, sq.Sb - n1)), a.E, a.k_vec, tid);
      }
      cp_async_commit();

      // scores in log2 units, with the masks of a block that needs them
      const bool whole = a.mask == nullptr && n0 + BN <= sq.Sb &&
                         (a.wl < 0 || n0 >= m0 + BM - 1 + off - a.wl) &&
                         (a.wr < 0 || n0 + BN - 1 <= m0 + off + a.wr);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t i = i0 + 8 * r;
        int lo = 0, hi = BN;  // keys n0 + lo .. n0 + hi - 1 of the block are in row i's band
        if (!whole) {
          int64_t jlo, jhi;
          key_range(a, i, i, off, sq.Sb, jlo, jhi);
          lo = static_cast<int>(min64(max64(jlo - n0, 0), BN));
          hi = static_cast<int>(min64(max64(jhi - n0, 0), BN));
        }
        const float* mrow = sM + (warp * 16 + g + 8 * r) * LDM + tig * 2;
#pragma unroll
        for (int t = 0; t < SN; ++t) {
          float2 madd = make_float2(0.f, 0.f);
          if (mp != nullptr) madd = *reinterpret_cast<const float2*>(mrow + t * 8);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int jj = t * 8 + tig * 2 + c;
            float x = mul_rn(s[t][2 * r + c], a.scale_log2);
            if (!whole) x = (jj < lo || jj >= hi) ? kNegInf : x + (c == 0 ? madd.x : madd.y);
            s[t][2 * r + c] = x;
          }
        }
      }

      // online softmax: the quad of lanes 4g .. 4g + 3 shares rows g and g + 8
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int t = 0; t < SN; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float mn = fmaxf(mrow[r], mx);
        const float base = mn == kNegInf ? 0.f : mn;
        const float alpha = fast_exp2(mrow[r] - base);
        mrow[r] = mn;
        lrow[r] *= alpha;
#pragma unroll
        for (int t = 0; t < ON; ++t) {
          o[t][2 * r] *= alpha;
          o[t][2 * r + 1] *= alpha;
        }
#pragma unroll
        for (int t = 0; t < SN; ++t) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float p = fast_exp2(s[t][2 * r + c] - base);
            s[t][2 * r + c] = p;
            lrow[r] += p;
          }
        }
        if constexpr (DROP) {  // P V takes P * keep (drop_scale in the epilogue); lse does not
#pragma unroll
          for (int t = 0; t < SN; ++t) {
            float z0, z1;
            drop_keep_kpair(a, dbh, sq.q0 + i0 + 8 * r, sq.k0 + n0 + t * 8 + tig * 2, keven, z0,
                            z1);
            s[t][2 * r] *= z0;
            s[t][2 * r + 1] *= z1;
          }
        }
      }

      cp_async_wait<1>();  // this V
      block_sync();
      warp_mm_pb<T, D, BN / 16>(o, s, sV, 0, lane);
      block_sync();  // every warp is done with sV
    }
  }

  // epilogue: row sums over the quad, o / l rounded once, lse
  T* op = static_cast<T*>(const_cast<void*>(a.o)) + (varlen ? 0 : b * a.o_sb) + h * a.o_sh +
          sq.q0 * a.o_sl;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lrow[r];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    const int64_t i = i0 + 8 * r;
    if (i >= sq.Lb) continue;
    const float inv = l == 0.f ? 0.f : (DROP ? a.drop_scale : 1.f) / l;
    T* orow = op + i * a.o_sl;
#pragma unroll
    for (int t = 0; t < ON; ++t) {
      const int col = t * 8 + tig * 2;
      if (col >= a.Ev) continue;
      const float v0 = o[t][2 * r] * inv, v1 = o[t][2 * r + 1] * inv;
      if (col + 1 < a.Ev && (reinterpret_cast<uintptr_t>(orow + col) & 3u) == 0) {
        st_g(reinterpret_cast<uint32_t*>(orow + col), pack2<T>(v0, v1));
      } else {
        st_g(orow + col, from_acc<T>(v0));
        if (col + 1 < a.Ev) st_g(orow + col + 1, from_acc<T>(v1));
      }
    }
    if (tig == 0) {
      st_g(a.lse + lse_index(a, b, h, sq, i), l == 0.f ? kNegInf : (mrow[r] + fast_log2(l)) * kLn2);
    }
  }
}

// ------------------------------------------------------------------ tensor-core backward

template <typename T, int D, bool DROP>
struct MmaBwd {
  static constexpr int kThreads = 128;
  // dk / dv: BN keys per CTA, query tiles of BMQ rows. Up to D = 128 each warp owns 16 keys and
  // all D columns of their dk / dv (registers: 2 D / 8 x 4 per thread). D = 256 (kSplit) would
  // need twice that: the CTA takes 32 keys, warp w computes S^T / dP^T for keys 16 (w % 2) ..
  // and queries BMQ / 2 (w / 2) .., passes P^T and dS^T through shared memory (rounded to T,
  // as the register path rounds them), and owns columns D / 2 (w / 2) .. of its 16 keys' dk / dv.
  static constexpr bool kSplit = D > 128;
  static constexpr int BN = kSplit ? 32 : 64;
  static constexpr int BMQ = DROP && D == 128 ? 16 : 32;  // dropout at 128: fewer registers
  static constexpr int kWarpQ = kSplit ? BMQ / 2 : BMQ;   // queries of a warp's S^T tile
  static constexpr int kWarpCols = kSplit ? D / 2 : D;    // dk / dv columns of a warp
  static constexpr int kLdM1 = BMQ + 8;                   // mask tile (keys x queries) row stride
  static constexpr int kLdP = BMQ + 8;                    // P^T / dS^T tiles (T), row stride
  static constexpr int kSmem1 = (2 * BN + 2 * BMQ) * D * static_cast<int>(sizeof(T)) +
                                2 * BMQ * static_cast<int>(sizeof(float)) +
                                (kSplit ? 2 * BN * kLdP * static_cast<int>(sizeof(T)) : 0);
  static constexpr int kSmem1Mask = kSmem1 + BN * kLdM1 * static_cast<int>(sizeof(float));
  // dq: BM query rows per CTA (16 per warp), key tiles of BNK keys (D = 256: dq takes 128
  // registers per thread, so small key tiles; 16 keys keep Q, dO, K, V and the mask tile
  // within 99 KB: 32 would need 106 KB with a mask)
  static constexpr int BM = 64;
  static constexpr int BNK = D > 128 ? 16 : D > 64 && DROP ? 32 : 64;
  static constexpr int kLdM2 = BNK + 8;
  static constexpr int kSmem2 = (2 * BM + 2 * BNK) * D * static_cast<int>(sizeof(T));
  static constexpr int kSmem2Mask = kSmem2 + BM * kLdM2 * static_cast<int>(sizeof(float));
  static constexpr int kMinBlocks = D <= 64 ? 2 : 1;
  static_assert(kSmem1Mask <= kSmemPerBlock && kSmem2Mask <= kSmemPerBlock,
                "the backward's shared memory must fit every target GPU");
};

// lse in log2 units for P = exp2(x - lse2), with +inf for a row without keys (so its P is 0) and
// for rows past the sequence; D[i] alongside (0 there).
__device__ __forceinline__ void row_stats(const Args& a, int b, int h, const Seq& sq, int64_t i,
                                          float& lse2, float& dsum) {
  lse2 = INFINITY;
  dsum = 0.f;
  if (i < sq.Lb) {
    const int64_t li = lse_index(a, b, h, sq, i);
    const float l = ld_g(a.lse + li);
    lse2 = l == kNegInf ? INFINITY : l * kLog2e;
    dsum = ld_g(a.dsum + li);
  }
}

// s = A B^T and dp = A2 B2^T (16 x 8 SN each, from zero): the scores and dP (S^T and dP^T in
// dkdv) of the warp's rows a0 .. of sA / sA2 and the rows b0 .. of sB / sB2.
template <typename T, int D, int KS, int SN>
__device__ __forceinline__ void scores_and_dp(float (&s)[SN][4], float (&dp)[SN][4], const T* sA,
                                              const T* sA2, int a0, const T* sB, const T* sB2,
                                              int b0, int lane) {
#pragma unroll
  for (int t = 0; t < SN; ++t) {
    s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
    dp[t][0] = dp[t][1] = dp[t][2] = dp[t][3] = 0.f;
  }
  warp_mm_nt<T, D, KS, SN>(s, sA, a0, sB, b0, lane);
  warp_mm_nt<T, D, KS, SN>(dp, sA2, a0, sB2, b0, lane);
}

// In place on the mma tiles of the scores s and of dP (the thread's rows r = 0, 1, 8 apart; its
// columns col0 + 8 t + c): s becomes P keep and dp becomes dS = P (keep drop_scale dP - D), with
// P = exp2(s scale_log2 + mask - lse2) inside the row's band (columns [band_lo[r], band_hi[r])
// less base, clamped to [0, n)), else 0. mrow: the mask tile at the thread's first row and
// column (rows ldm apart; read only when masked); lse2_of(r, col), d_of(r, col) and
// keep(r, t, z0, z1) (DROP: the keep factors of columns col0 + 8 t and + 1) give the rest.
template <bool DROP, int SN, typename Lse2Of, typename DOf, typename Keep>
__device__ __forceinline__ void probs_and_ds(const Args& a, float (&s)[SN][4], float (&dp)[SN][4],
                                             const float* mrow, int ldm, bool masked, int col0,
                                             const int64_t (&band_lo)[2],
                                             const int64_t (&band_hi)[2], int64_t base, int n,
                                             Lse2Of lse2_of, DOf d_of, Keep keep) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lo = static_cast<int>(min64(max64(band_lo[r] - base, 0), n));
    const int hi = static_cast<int>(min64(max64(band_hi[r] - base, 0), n));
#pragma unroll
    for (int t = 0; t < SN; ++t) {
      float2 madd = make_float2(0.f, 0.f);
      if (masked) madd = *reinterpret_cast<const float2*>(mrow + 8 * r * ldm + t * 8);
      float z[2] = {1.f, 1.f};  // keep (dV: drop_scale in the epilogue)
      if constexpr (DROP) keep(r, t, z[0], z[1]);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = col0 + t * 8 + c;
        float p = 0.f;
        if (col >= lo && col < hi) {
          p = fast_exp2(mul_rn(s[t][2 * r + c], a.scale_log2) + (c == 0 ? madd.x : madd.y) -
                        lse2_of(r, col));
        }
        const float dpz = DROP ? z[c] * a.drop_scale * dp[t][2 * r + c] : dp[t][2 * r + c];
        s[t][2 * r + c] = DROP ? p * z[c] : p;
        dp[t][2 * r + c] = p == 0.f ? 0.f : p * (dpz - d_of(r, col));
      }
    }
  }
}

// dk, dv of BN keys of one (sequence, kv head): the group's heads in order, each one's query tiles
// (BMQ rows) that reach the keys in order; S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and
// dK += dS^T Q from registers.
template <typename T, int D, bool DROP>
__global__ void __launch_bounds__(MmaBwd<T, D, DROP>::kThreads, MmaBwd<T, D, DROP>::kMinBlocks)
    attn_bwd_dkdv_mma_kernel(const Args a) {
  using C = MmaBwd<T, D, DROP>;
  constexpr int BN = C::BN, BMQ = C::BMQ, NT = C::kThreads, LDM = C::kLdM1, LDP = C::kLdP;
  constexpr int KS = D / 16, ON = C::kWarpCols / 8, SN = C::kWarpQ / 8;
  T* sK = reinterpret_cast<T*>(smem_base());
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;
  T* sO = sQ + BMQ * D;  // dO
  float* sL = reinterpret_cast<float*>(sO + BMQ * D);
  float* sDs = sL + BMQ;
  T* sP = reinterpret_cast<T*>(sDs + BMQ);  // kSplit: P^T and dS^T (BN keys x BMQ queries)
  T* sdS = sP + BN * LDP;
  // only with a mask: (BN keys x BMQ queries)
  float* sM = C::kSplit ? reinterpret_cast<float*>(sdS + BN * LDP) : sDs + BMQ;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;
  // this warp's keys (rows of S^T), its queries (columns of S^T) and its dk / dv columns
  const int kw = C::kSplit ? (warp & 1) * 16 : warp * 16;
  const int qw = C::kSplit ? (warp >> 1) * C::kWarpQ : 0;
  const int cw = C::kSplit ? (warp >> 1) * C::kWarpCols : 0;

  const int64_t bid = blockIdx.x;
  const int kb = static_cast<int>(bid % a.nblk);
  const int bhk = static_cast<int>(bid / a.nblk);
  const int Hk = a.Hq / a.group;
  const int b = bhk / Hk, hk = bhk % Hk;
  const Seq sq = seq_of(a, b);
  const int64_t n0 = int64_t{kb} * BN;
  if (n0 >= sq.Sb) return;
  const int nk = static_cast<int>(min64(BN, sq.Sb - n0));
  const int64_t off = a.bottom_right ? sq.Sb - sq.Lb : 0;
  int64_t ilo, ihi;
  query_range(a, n0, n0 + nk - 1, off, sq.Lb, ilo, ihi);
  const bool varlen = a.cu_q != nullptr;
  const int64_t msz = mask_esize<T>(a);

  float dk[ON][4], dv[ON][4];
#pragma unroll
  for (int t = 0; t < ON; ++t) {
    dk[t][0] = dk[t][1] = dk[t][2] = dk[t][3] = 0.f;
    dv[t][0] = dv[t][1] = dv[t][2] = dv[t][3] = 0.f;
  }

  if (ilo < ihi) {
    const T* kp = static_cast<const T*>(a.k) + (varlen ? 0 : b * a.k_sb) + hk * a.k_sh +
                  (sq.k0 + n0) * a.k_sl;
    const T* vp = static_cast<const T*>(a.v) + (varlen ? 0 : b * a.v_sb) + hk * a.v_sh +
                  (sq.k0 + n0) * a.v_sl;
    load_tile<T, D, BN, NT>(sK, kp, a.k_sl, nk, a.E, a.k_vec, tid);
    load_tile<T, D, BN, NT>(sV, vp, a.v_sl, nk, a.Ev, a.v_vec, tid);
    cp_async_commit();
    // this thread's two keys (rows of S^T) and the query rows they reach
    int64_t qlo[2], qhi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t j = n0 + kw + g + 8 * r;
      query_range(a, j, j, off, sq.Lb, qlo[r], qhi[r]);
      if (j >= sq.Sb) qhi[r] = qlo[r];  // past the sequence: nothing
    }
    const bool keven = (sq.k0 & 1) == 0;  // the keys of lanes g, g ^ 1 share a Philox call
    for (int hh = 0; hh < a.group; ++hh) {
      const int h = hk * a.group + hh;
      const uint32_t dbh = DROP ? drop_bh(a, b, h) : 0u;
      const T* qp =
          static_cast<const T*>(a.q) + (varlen ? 0 : b * a.q_sb) + h * a.q_sh + sq.q0 * a.q_sl;
      const T* dop = static_cast<const T*>(a.dout) + (varlen ? 0 : b * a.do_sb) + h * a.do_sh +
                     sq.q0 * a.do_sl;
      const unsigned char* mp = nullptr;
      if (a.mask != nullptr) {
        mp = static_cast<const unsigned char*>(a.mask) + (b * a.m_sb + h * a.m_sh) * msz;
      }
      for (int64_t it = ilo / BMQ; it < (ihi + BMQ - 1) / BMQ; ++it) {
        const int64_t i0 = it * BMQ;
        const int nq = static_cast<int>(min64(BMQ, sq.Lb - i0));
        block_sync();  // the previous tiles are consumed
        load_tile<T, D, BMQ, NT>(sQ, qp + i0 * a.q_sl, a.q_sl, nq, a.E, a.q_vec, tid);
        load_tile<T, D, BMQ, NT>(sO, dop + i0 * a.do_sl, a.do_sl, nq, a.Ev, a.do_vec, tid);
        cp_async_commit();
        if (tid < BMQ) row_stats(a, b, h, sq, i0 + tid, sL[tid], sDs[tid]);
        if (mp != nullptr) {
          // keys fastest: coalesced reads of a row-major mask
          for (int idx = tid; idx < BN * BMQ; idx += NT) {
            const int r = idx % BN, c = idx / BN;
            float x = 0.f;
            if (r < nk && c < nq) {
              x = mask_log2<T>(a, mp + ((i0 + c) * a.m_sl + n0 * a.m_ss) * msz, r);
            }
            sM[r * LDM + c] = x;
          }
        }
        cp_async_wait<0>();
        block_sync();

        // P^T and dS^T (rows: keys, columns: queries of the tile; lse and D per column)
        float st[SN][4], dpt[SN][4];
        scores_and_dp<T, D, KS, SN>(st, dpt, sK, sV, kw, sQ, sO, qw, lane);
        probs_and_ds<DROP>(
            a, st, dpt, sM + (kw + g) * LDM + qw + tig * 2, LDM, mp != nullptr, qw + tig * 2, qlo,
            qhi, i0, BMQ, [&](int, int ii) { return sL[ii]; }, [&](int, int ii) { return sDs[ii]; },
            [&](int r, int t, float& z0, float& z1) {
              drop_keep_qpair(a, dbh, sq.q0 + i0 + qw + t * 8 + tig * 2,
                              sq.k0 + n0 + kw + g + 8 * r, g, keven, z0, z1);
            });
        if constexpr (C::kSplit) {
          // the two halves of the keys' P^T / dS^T rows meet in shared memory
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = (kw + g + 8 * r) * LDP + qw + tig * 2;
#pragma unroll
            for (int t = 0; t < SN; ++t) {
              *reinterpret_cast<uint32_t*>(sP + row + t * 8) =
                  pack2<T>(st[t][2 * r], st[t][2 * r + 1]);
              *reinterpret_cast<uint32_t*>(sdS + row + t * 8) =
                  pack2<T>(dpt[t][2 * r], dpt[t][2 * r + 1]);
            }
          }
          block_sync();
          warp_mm_sb<T, D, BMQ / 16, C::kWarpCols>(dv, sP, LDP, kw, sO, cw, lane);
          warp_mm_sb<T, D, BMQ / 16, C::kWarpCols>(dk, sdS, LDP, kw, sQ, cw, lane);
        } else {
          warp_mm_pb<T, D, BMQ / 16>(dv, st, sO, 0, lane);
          warp_mm_pb<T, D, BMQ / 16>(dk, dpt, sQ, 0, lane);
        }
      }
    }
  }

  T* dkp =
      static_cast<T*>(a.dk) + (varlen ? 0 : b * a.dk_sb) + hk * a.dk_sh + (sq.k0 + n0) * a.dk_sl;
  T* dvp =
      static_cast<T*>(a.dv) + (varlen ? 0 : b * a.dv_sb) + hk * a.dv_sh + (sq.k0 + n0) * a.dv_sl;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int kk = kw + g + 8 * r;
    if (kk >= nk) continue;
#pragma unroll
    for (int t = 0; t < ON; ++t) {
      const int col = cw + t * 8 + tig * 2;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (col + c < a.E)
          st_g(dkp + kk * a.dk_sl + col + c, from_acc<T>(dk[t][2 * r + c] * a.scale));
        if (col + c < a.Ev) {
          st_g(dvp + kk * a.dv_sl + col + c,
               from_acc<T>(DROP ? dv[t][2 * r + c] * a.drop_scale : dv[t][2 * r + c]));
        }
      }
    }
  }
}

// dq of BM query rows of one (sequence, head): key tiles (BNK keys) of the band in order;
// S = Q K^T, dP = dO V^T, then dQ += dS K from registers.
template <typename T, int D, bool DROP>
__global__ void __launch_bounds__(MmaBwd<T, D, DROP>::kThreads, MmaBwd<T, D, DROP>::kMinBlocks)
    attn_bwd_dq_mma_kernel(const Args a) {
  using C = MmaBwd<T, D, DROP>;
  constexpr int BM = C::BM, BN = C::BNK, NT = C::kThreads, LDM = C::kLdM2;
  constexpr int KS = D / 16, ON = D / 8, SN = BN / 8;
  T* sQ = reinterpret_cast<T*>(smem_base());
  T* sO = sQ + BM * D;  // dO
  T* sK = sO + BM * D;
  T* sV = sK + BN * D;
  float* sM = reinterpret_cast<float*>(sV + BN * D);  // only with a mask
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, tig = lane & 3;

  const int64_t bid = blockIdx.x;
  const int qb = a.nblk - 1 - static_cast<int>(bid % a.nblk);
  const int bh = static_cast<int>(bid / a.nblk);
  const int b = bh / a.Hq, h = bh % a.Hq;
  const Seq sq = seq_of(a, b);
  const int64_t m0 = int64_t{qb} * BM;
  if (m0 >= sq.Lb) return;
  const int rows = static_cast<int>(min64(BM, sq.Lb - m0));
  const int64_t off = a.bottom_right ? sq.Sb - sq.Lb : 0;
  int64_t klo, khi;
  key_range(a, m0, m0 + rows - 1, off, sq.Sb, klo, khi);
  const int hk = h / a.group;
  const bool varlen = a.cu_q != nullptr;
  const int64_t i0 = m0 + warp * 16 + g;  // this thread's rows: i0 and i0 + 8
  const uint32_t dbh = DROP ? drop_bh(a, b, h) : 0u;
  const bool keven = (sq.k0 & 1) == 0;

  float dq[ON][4];
#pragma unroll
  for (int t = 0; t < ON; ++t) dq[t][0] = dq[t][1] = dq[t][2] = dq[t][3] = 0.f;

  if (klo < khi) {
    const T* qp =
        static_cast<const T*>(a.q) + (varlen ? 0 : b * a.q_sb) + h * a.q_sh + (sq.q0 + m0) * a.q_sl;
    const T* dop = static_cast<const T*>(a.dout) + (varlen ? 0 : b * a.do_sb) + h * a.do_sh +
                   (sq.q0 + m0) * a.do_sl;
    const T* kp =
        static_cast<const T*>(a.k) + (varlen ? 0 : b * a.k_sb) + hk * a.k_sh + sq.k0 * a.k_sl;
    const T* vp =
        static_cast<const T*>(a.v) + (varlen ? 0 : b * a.v_sb) + hk * a.v_sh + sq.k0 * a.v_sl;
    const unsigned char* mp = nullptr;
    if (a.mask != nullptr) {
      mp = static_cast<const unsigned char*>(a.mask) + (b * a.m_sb + h * a.m_sh) * mask_esize<T>(a);
    }
    load_tile<T, D, BM, NT>(sQ, qp, a.q_sl, rows, a.E, a.q_vec, tid);
    load_tile<T, D, BM, NT>(sO, dop, a.do_sl, rows, a.Ev, a.do_vec, tid);
    cp_async_commit();
    float lse2[2], dsum[2];
    int64_t jlo[2], jhi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_stats(a, b, h, sq, i0 + 8 * r, lse2[r], dsum[r]);
      key_range(a, i0 + 8 * r, i0 + 8 * r, off, sq.Sb, jlo[r], jhi[r]);
    }
    const int nb0 = static_cast<int>(klo / BN), nb1 = static_cast<int>((khi + BN - 1) / BN);
    for (int nb = nb0; nb < nb1; ++nb) {
      const int64_t n0 = int64_t{nb} * BN;
      const int nk = static_cast<int>(min64(BN, sq.Sb - n0));
      block_sync();  // the previous key tile is consumed
      load_tile<T, D, BN, NT>(sK, kp + n0 * a.k_sl, a.k_sl, nk, a.E, a.k_vec, tid);
      load_tile<T, D, BN, NT>(sV, vp + n0 * a.v_sl, a.v_sl, nk, a.Ev, a.v_vec, tid);
      cp_async_commit();
      if (mp != nullptr) load_mask_tile<T, BM, BN, LDM, NT>(sM, a, mp, m0, n0, sq.Lb, sq.Sb, tid);
      cp_async_wait<0>();
      block_sync();

      // P and dS (lse and D per row)
      float s[SN][4], dp[SN][4];
      scores_and_dp<T, D, KS, SN>(s, dp, sQ, sO, warp * 16, sK, sV, 0, lane);
      probs_and_ds<DROP>(
          a, s, dp, sM + (warp * 16 + g) * LDM + tig * 2, LDM, mp != nullptr, tig * 2, jlo, jhi, n0,
          BN, [&](int r, int) { return lse2[r]; }, [&](int r, int) { return dsum[r]; },
          [&](int r, int t, float& z0, float& z1) {
            drop_keep_kpair(a, dbh, sq.q0 + i0 + 8 * r, sq.k0 + n0 + t * 8 + tig * 2, keven, z0,
                            z1);
          });
      warp_mm_pb<T, D, BN / 16>(dq, dp, sK, 0, lane);
    }
  }

  T* dqp = static_cast<T*>(a.dq) + (varlen ? 0 : b * a.dq_sb) + h * a.dq_sh + sq.q0 * a.dq_sl;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + 8 * r;
    if (i >= sq.Lb) continue;
#pragma unroll
    for (int t = 0; t < ON; ++t) {
      const int col = t * 8 + tig * 2;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (col + c < a.E)
          st_g(dqp + i * a.dq_sl + col + c, from_acc<T>(dq[t][2 * r + c] * a.scale));
      }
    }
  }
}

// ------------------------------------------------------------------ SIMT kernels (fp32 math)

constexpr int kSimtThreads = 128;
constexpr int kSimtRows = 4;              // query rows (or keys) per warp
constexpr int kSimtBM = 4 * kSimtRows;    // query rows per CTA (forward, dq)
constexpr int kSimtBN = 32;               // keys per tile (a lane per key)
constexpr int kSimtSlices = 256 / 32;     // columns per lane: e = lane + 32 t
constexpr int kSimtKeys = 4 * kSimtRows;  // keys per CTA of the dk / dv kernel
constexpr int kSimtQT = 32;               // query rows per tile there (a lane per row)

// Padded row length of a shared fp32 tile: odd, so a lane per row reads distinct banks.
__host__ __device__ constexpr int pad_odd(int n) { return n | 1; }
// The SIMT kernels' shared bytes grow with the head dims; at the largest (256):
static_assert((kSimtBM * pad_odd(256) + kSimtBN * 2 * pad_odd(256)) * 4 <= kSmemPerBlock &&
                  (kSimtQT + kSimtKeys) * 2 * pad_odd(256) * 4 <= kSmemPerBlock,
              "the SIMT kernels' shared memory must fit every target GPU");

// rows x n elements of T (rows `stride` apart) as fp32 into sm (rows ld apart); rows >= nrows
// are zeros.
template <typename T>
__device__ __forceinline__ void load_rows_f32(float* sm, int ld, const T* src, int64_t stride,
                                              int rows, int nrows, int n, int tid) {
  const int total = rows * n;
  for (int idx = tid; idx < total; idx += kSimtThreads) {
    const int r = idx / n, c = idx - r * n;
    sm[r * ld + c] = r < nrows ? to_acc(ld_g(src + r * stride + c)) : 0.f;
  }
}

template <typename T, bool DROP>
__global__ void __launch_bounds__(kSimtThreads, 2) attn_fwd_simt_kernel(const Args a) {
  const int Ep = pad_odd(a.E), Evp = pad_odd(a.Ev);
  float* sQ = reinterpret_cast<float*>(smem_base());
  float* sK = sQ + kSimtBM * Ep;
  float* sV = sK + kSimtBN * Ep;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;

  const int64_t bid = blockIdx.x;
  const int qb = a.nblk - 1 - static_cast<int>(bid % a.nblk);
  const int bh = static_cast<int>(bid / a.nblk);
  const int b = bh / a.Hq, h = bh % a.Hq;
  const Seq sq = seq_of(a, b);
  const int64_t m0 = int64_t{qb} * kSimtBM;
  if (m0 >= sq.Lb) return;
  const int rows = static_cast<int>(min64(kSimtBM, sq.Lb - m0));
  const int64_t off = a.bottom_right ? sq.Sb - sq.Lb : 0;
  int64_t klo, khi;
  key_range(a, m0, m0 + rows - 1, off, sq.Sb, klo, khi);
  const int hk = h / a.group;
  const bool varlen = a.cu_q != nullptr;
  const int64_t msz = mask_esize<T>(a);

  float o[kSimtRows][kSimtSlices];
  float mrow[kSimtRows], lrow[kSimtRows];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    mrow[r] = kNegInf;
    lrow[r] = 0.f;
#pragma unroll
    for (int t = 0; t < kSimtSlices; ++t) o[r][t] = 0.f;
  }

  if (klo < khi) {
    const T* qp =
        static_cast<const T*>(a.q) + (varlen ? 0 : b * a.q_sb) + h * a.q_sh + (sq.q0 + m0) * a.q_sl;
    const T* kp =
        static_cast<const T*>(a.k) + (varlen ? 0 : b * a.k_sb) + hk * a.k_sh + sq.k0 * a.k_sl;
    const T* vp =
        static_cast<const T*>(a.v) + (varlen ? 0 : b * a.v_sb) + hk * a.v_sh + sq.k0 * a.v_sl;
    load_rows_f32(sQ, Ep, qp, a.q_sl, kSimtBM, rows, a.E, tid);
    const int64_t t0 = klo / kSimtBN, t1 = (khi + kSimtBN - 1) / kSimtBN;
    for (int64_t kt = t0; kt < t1; ++kt) {
      const int64_t n0 = kt * kSimtBN;
      const int nk = static_cast<int>(min64(kSimtBN, sq.Sb - n0));
      block_sync();  // the previous tile is consumed
      load_rows_f32(sK, Ep, kp + n0 * a.k_sl, a.k_sl, kSimtBN, nk, a.E, tid);
      load_rows_f32(sV, Evp, vp + n0 * a.v_sl, a.v_sl, kSimtBN, nk, a.Ev, tid);
      block_sync();

      float dot[kSimtRows];
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r) dot[r] = 0.f;
      for (int e = 0; e < a.E; ++e) {
        const float kv = sK[lane * Ep + e];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) dot[r] += sQ[(warp * kSimtRows + r) * Ep + e] * kv;
      }
      const int64_t j = n0 + lane;
      float p[kSimtRows];
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r) {
        const int64_t i = m0 + warp * kSimtRows + r;
        int64_t jlo, jhi;
        key_range(a, i, i, off, sq.Sb, jlo, jhi);
        float x = kNegInf;
        if (j >= jlo && j < jhi) {
          x = mul_rn(dot[r], a.scale_log2);
          if (a.mask != nullptr && i < sq.Lb) {
            const unsigned char* mrow_p = static_cast<const unsigned char*>(a.mask) +
                                          (b * a.m_sb + h * a.m_sh + i * a.m_sl) * msz;
            x += mask_log2<T>(a, mrow_p, j);
          }
        }
        float mx = x;
#pragma unroll
        for (int w = 16; w >= 1; w >>= 1) mx = fmaxf(mx, shfl_xor(mx, w));
        const float mn = fmaxf(mrow[r], mx);
        const float base = mn == kNegInf ? 0.f : mn;
        const float alpha = fast_exp2(mrow[r] - base);
        mrow[r] = mn;
        p[r] = fast_exp2(x - base);
        lrow[r] = lrow[r] * alpha + p[r];
#pragma unroll
        for (int t = 0; t < kSimtSlices; ++t) o[r][t] *= alpha;
        // P V takes P * keep (drop_scale in the epilogue); the row sums do not
        if constexpr (DROP) p[r] *= drop_keep1(a, drop_bh(a, b, h), sq.q0 + i, sq.k0 + j);
      }
      for (int jj = 0; jj < nk; ++jj) {
        float pj[kSimtRows];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) pj[r] = shfl_idx(p[r], jj);
#pragma unroll
        for (int t = 0; t < kSimtSlices; ++t) {
          const int e = lane + 32 * t;
          if (e < a.Ev) {
            const float vv = sV[jj * Evp + e];
#pragma unroll
            for (int r = 0; r < kSimtRows; ++r) o[r][t] += pj[r] * vv;
          }
        }
      }
    }
  }

  T* op = static_cast<T*>(const_cast<void*>(a.o)) + (varlen ? 0 : b * a.o_sb) + h * a.o_sh +
          sq.q0 * a.o_sl;
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    float l = lrow[r];
#pragma unroll
    for (int w = 16; w >= 1; w >>= 1) l += shfl_xor(l, w);
    const int64_t i = m0 + warp * kSimtRows + r;
    if (i >= sq.Lb) continue;
    const float inv = l == 0.f ? 0.f : (DROP ? a.drop_scale : 1.f) / l;
#pragma unroll
    for (int t = 0; t < kSimtSlices; ++t) {
      const int e = lane + 32 * t;
      if (e < a.Ev) st_g(op + i * a.o_sl + e, from_acc<T>(o[r][t] * inv));
    }
    if (lane == 0) {
      st_g(a.lse + lse_index(a, b, h, sq, i), l == 0.f ? kNegInf : (mrow[r] + fast_log2(l)) * kLn2);
    }
  }
}

// D[i] = sum_e dO[i, e] * O[i, e]: a warp per row of lse's layout (grid-stride); nrows bounds
// the rows (varlen: the exact count Hq * cu_q[B] is read here).
template <typename T>
__global__ void __launch_bounds__(kSimtThreads) attn_bwd_prep_kernel(const Args a, int64_t nrows) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warps = int64_t{gridDim.x} * (kSimtThreads / 32);
  const bool varlen = a.cu_q != nullptr;
  const int64_t len = varlen ? ld_g(a.cu_q + a.B) : a.L;  // rows per head
  const int64_t n = varlen ? min64(nrows, int64_t{a.Hq} * len) : nrows;
  for (int64_t row = int64_t{blockIdx.x} * (kSimtThreads / 32) + (threadIdx.x >> 5); row < n;
       row += warps) {
    const int64_t i = row % len, bh = row / len;
    const int64_t h = bh % a.Hq, b = bh / a.Hq;  // varlen: b == 0
    const T* o = static_cast<const T*>(a.o) + b * a.o_sb + h * a.o_sh + i * a.o_sl;
    const T* d = static_cast<const T*>(a.dout) + b * a.do_sb + h * a.do_sh + i * a.do_sl;
    float acc = 0.f;
    for (int e = lane; e < a.Ev; e += 32) acc += to_acc(ld_g(d + e)) * to_acc(ld_g(o + e));
#pragma unroll
    for (int w = 16; w >= 1; w >>= 1) acc += shfl_xor(acc, w);
    if (lane == 0) st_g(a.dsum + row, acc);
  }
}

// P[i, j] (0 where the key does not take part or the row has no key) from the score dot
// product, in log2 units against lse2 = lse * log2 e.
template <typename T>
__device__ __forceinline__ float prob(const Args& a, float dot, float lse2, bool inside,
                                      const unsigned char* mrow_p, int64_t j) {
  if (!inside || lse2 == kNegInf) return 0.f;
  float x = mul_rn(dot, a.scale_log2);
  if (mrow_p != nullptr) x += mask_log2<T>(a, mrow_p, j);
  return fast_exp2(x - lse2);
}

// dk, dv for kSimtKeys keys of one (sequence, kv head); warp w owns keys w * 4 .. w * 4 + 3.
template <typename T, bool DROP>
__global__ void __launch_bounds__(kSimtThreads) attn_bwd_dkdv_kernel(const Args a) {
  const int Ep = pad_odd(a.E), Evp = pad_odd(a.Ev);
  float* sQ = reinterpret_cast<float*>(smem_base());  // (kSimtQT, Ep)
  float* sO = sQ + kSimtQT * Ep;                      // dO tile (kSimtQT, Evp)
  float* sK = sO + kSimtQT * Evp;                     // (kSimtKeys, Ep)
  float* sV = sK + kSimtKeys * Ep;                    // (kSimtKeys, Evp)
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;

  const int64_t bid = blockIdx.x;
  const int kb = static_cast<int>(bid % a.nblk);
  const int bhk = static_cast<int>(bid / a.nblk);
  const int Hk = a.Hq / a.group;
  const int b = bhk / Hk, hk = bhk % Hk;
  const Seq sq = seq_of(a, b);
  const int64_t n0 = int64_t{kb} * kSimtKeys;
  if (n0 >= sq.Sb) return;
  const int nk = static_cast<int>(min64(kSimtKeys, sq.Sb - n0));
  const int64_t off = a.bottom_right ? sq.Sb - sq.Lb : 0;
  int64_t ilo, ihi;
  query_range(a, n0, n0 + nk - 1, off, sq.Lb, ilo, ihi);
  const bool varlen = a.cu_q != nullptr;
  const int64_t msz = mask_esize<T>(a);

  const T* kp =
      static_cast<const T*>(a.k) + (varlen ? 0 : b * a.k_sb) + hk * a.k_sh + (sq.k0 + n0) * a.k_sl;
  const T* vp =
      static_cast<const T*>(a.v) + (varlen ? 0 : b * a.v_sb) + hk * a.v_sh + (sq.k0 + n0) * a.v_sl;
  load_rows_f32(sK, Ep, kp, a.k_sl, kSimtKeys, nk, a.E, tid);
  load_rows_f32(sV, Evp, vp, a.v_sl, kSimtKeys, nk, a.Ev, tid);

  float dk[kSimtRows][kSimtSlices], dv[kSimtRows][kSimtSlices];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
#pragma unroll
    for (int t = 0; t < kSimtSlices; ++t) dk[r][t] = dv[r][t] = 0.f;
  }

  if (ilo < ihi) {
    for (int hh = 0; hh < a.group; ++hh) {
      const int h = hk * a.group + hh;
      const T* qp =
          static_cast<const T*>(a.q) + (varlen ? 0 : b * a.q_sb) + h * a.q_sh + sq.q0 * a.q_sl;
      const T* dop = static_cast<const T*>(a.dout) + (varlen ? 0 : b * a.do_sb) + h * a.do_sh +
                     sq.q0 * a.do_sl;
      const unsigned char* mbase = nullptr;
      if (a.mask != nullptr) {
        mbase = static_cast<const unsigned char*>(a.mask) + (b * a.m_sb + h * a.m_sh) * msz;
      }
      for (int64_t it = ilo / kSimtQT; it < (ihi + kSimtQT - 1) / kSimtQT; ++it) {
        const int64_t i0 = it * kSimtQT;
        const int nq = static_cast<int>(min64(kSimtQT, sq.Lb - i0));
        block_sync();  // the previous tile is consumed
        load_rows_f32(sQ, Ep, qp + i0 * a.q_sl, a.q_sl, kSimtQT, nq, a.E, tid);
        load_rows_f32(sO, Evp, dop + i0 * a.do_sl, a.do_sl, kSimtQT, nq, a.Ev, tid);
        block_sync();
        // lane = query row i of the tile
        const int64_t i = i0 + lane;
        float lse2 = kNegInf, dsum = 0.f;
        int64_t jlo = 0, jhi = 0;
        const unsigned char* mrow_p = nullptr;
        if (lane < nq) {
          const int64_t li = lse_index(a, b, h, sq, i);
          lse2 = ld_g(a.lse + li) * kLog2e;
          dsum = ld_g(a.dsum + li);
          key_range(a, i, i, off, sq.Sb, jlo, jhi);
          if (mbase != nullptr) mrow_p = mbase + i * a.m_sl * msz;
        }
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) {
          const int kk = warp * kSimtRows + r;
          if (kk >= nk) break;  // uniform over the warp
          const int64_t j = n0 + kk;
          float s = 0.f, dp = 0.f;
          for (int e = 0; e < a.E; ++e) s += sQ[lane * Ep + e] * sK[kk * Ep + e];
          for (int e = 0; e < a.Ev; ++e) dp += sO[lane * Evp + e] * sV[kk * Evp + e];
          const float p = prob<T>(a, s, lse2, lane < nq && j >= jlo && j < jhi, mrow_p, j);
          // dropout: dS takes keep * drop_scale * dP, dV P * keep (drop_scale in the epilogue)
          const float z = DROP ? drop_keep1(a, drop_bh(a, b, h), sq.q0 + i, sq.k0 + j) : 1.f;
          const float ds = p == 0.f ? 0.f : p * ((DROP ? z * a.drop_scale * dp : dp) - dsum);
          const float pz = p * z;
          for (int ii = 0; ii < nq; ++ii) {
            const float pi = shfl_idx(pz, ii), dsi = shfl_idx(ds, ii);
#pragma unroll
            for (int t = 0; t < kSimtSlices; ++t) {
              const int e = lane + 32 * t;
              if (e < a.Ev) dv[r][t] += pi * sO[ii * Evp + e];
              if (e < a.E) dk[r][t] += dsi * sQ[ii * Ep + e];
            }
          }
        }
      }
    }
  }

  T* dkp =
      static_cast<T*>(a.dk) + (varlen ? 0 : b * a.dk_sb) + hk * a.dk_sh + (sq.k0 + n0) * a.dk_sl;
  T* dvp =
      static_cast<T*>(a.dv) + (varlen ? 0 : b * a.dv_sb) + hk * a.dv_sh + (sq.k0 + n0) * a.dv_sl;
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int kk = warp * kSimtRows + r;
    if (kk >= nk) break;
#pragma unroll
    for (int t = 0; t < kSimtSlices; ++t) {
      const int e = lane + 32 * t;
      if (e < a.E) st_g(dkp + kk * a.dk_sl + e, from_acc<T>(dk[r][t] * a.scale));
      if (e < a.Ev)
        st_g(dvp + kk * a.dv_sl + e, from_acc<T>(DROP ? dv[r][t] * a.drop_scale : dv[r][t]));
    }
  }
}

// dq for kSimtBM query rows of one (sequence, head); warp w owns rows w * 4 .. w * 4 + 3.
template <typename T, bool DROP>
__global__ void __launch_bounds__(kSimtThreads) attn_bwd_dq_kernel(const Args a) {
  const int Ep = pad_odd(a.E), Evp = pad_odd(a.Ev);
  float* sQ = reinterpret_cast<float*>(smem_base());  // (kSimtBM, Ep)
  float* sO = sQ + kSimtBM * Ep;                      // dO (kSimtBM, Evp)
  float* sK = sO + kSimtBM * Evp;                     // (kSimtBN, Ep)
  float* sV = sK + kSimtBN * Ep;                      // (kSimtBN, Evp)
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;

  const int64_t bid = blockIdx.x;
  const int qb = a.nblk - 1 - static_cast<int>(bid % a.nblk);
  const int bh = static_cast<int>(bid / a.nblk);
  const int b = bh / a.Hq, h = bh % a.Hq;
  const Seq sq = seq_of(a, b);
  const int64_t m0 = int64_t{qb} * kSimtBM;
  if (m0 >= sq.Lb) return;
  const int rows = static_cast<int>(min64(kSimtBM, sq.Lb - m0));
  const int64_t off = a.bottom_right ? sq.Sb - sq.Lb : 0;
  int64_t klo, khi;
  key_range(a, m0, m0 + rows - 1, off, sq.Sb, klo, khi);
  const int hk = h / a.group;
  const bool varlen = a.cu_q != nullptr;
  const int64_t msz = mask_esize<T>(a);

  float dq[kSimtRows][kSimtSlices];
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
#pragma unroll
    for (int t = 0; t < kSimtSlices; ++t) dq[r][t] = 0.f;
  }

  if (klo < khi) {
    const T* qp =
        static_cast<const T*>(a.q) + (varlen ? 0 : b * a.q_sb) + h * a.q_sh + (sq.q0 + m0) * a.q_sl;
    const T* dop = static_cast<const T*>(a.dout) + (varlen ? 0 : b * a.do_sb) + h * a.do_sh +
                   (sq.q0 + m0) * a.do_sl;
    const T* kp =
        static_cast<const T*>(a.k) + (varlen ? 0 : b * a.k_sb) + hk * a.k_sh + sq.k0 * a.k_sl;
    const T* vp =
        static_cast<const T*>(a.v) + (varlen ? 0 : b * a.v_sb) + hk * a.v_sh + sq.k0 * a.v_sl;
    load_rows_f32(sQ, Ep, qp, a.q_sl, kSimtBM, rows, a.E, tid);
    load_rows_f32(sO, Evp, dop, a.do_sl, kSimtBM, rows, a.Ev, tid);
    float lse2[kSimtRows], dsum[kSimtRows];
#pragma unroll
    for (int r = 0; r < kSimtRows; ++r) {
      const int64_t i = m0 + warp * kSimtRows + r;
      lse2[r] = kNegInf;
      dsum[r] = 0.f;
      if (i < sq.Lb) {
        const int64_t li = lse_index(a, b, h, sq, i);
        lse2[r] = ld_g(a.lse + li) * kLog2e;
        dsum[r] = ld_g(a.dsum + li);
      }
    }
    const int64_t t0 = klo / kSimtBN, t1 = (khi + kSimtBN - 1) / kSimtBN;
    for (int64_t kt = t0; kt < t1; ++kt) {
      const int64_t n0 = kt * kSimtBN;
      const int nk = static_cast<int>(min64(kSimtBN, sq.Sb - n0));
      block_sync();
      load_rows_f32(sK, Ep, kp + n0 * a.k_sl, a.k_sl, kSimtBN, nk, a.E, tid);
      load_rows_f32(sV, Evp, vp + n0 * a.v_sl, a.v_sl, kSimtBN, nk, a.Ev, tid);
      block_sync();
      const int64_t j = n0 + lane;
      float ds[kSimtRows];
#pragma unroll
      for (int r = 0; r < kSimtRows; ++r) {
        const int rr = warp * kSimtRows + r;
        const int64_t i = m0 + rr;
        float s = 0.f, dp = 0.f;
        for (int e = 0; e < a.E; ++e) s += sQ[rr * Ep + e] * sK[lane * Ep + e];
        for (int e = 0; e < a.Ev; ++e) dp += sO[rr * Evp + e] * sV[lane * Evp + e];
        int64_t jlo, jhi;
        key_range(a, i, i, off, sq.Sb, jlo, jhi);
        const unsigned char* mrow_p = nullptr;
        if (a.mask != nullptr && i < sq.Lb) {
          mrow_p = static_cast<const unsigned char*>(a.mask) +
                   (b * a.m_sb + h * a.m_sh + i * a.m_sl) * msz;
        }
        const bool inside = i < sq.Lb && lane < nk && j >= jlo && j < jhi;
        const float p = prob<T>(a, s, lse2[r], inside, mrow_p, j);
        const float z = DROP ? drop_keep1(a, drop_bh(a, b, h), sq.q0 + i, sq.k0 + j) : 1.f;
        ds[r] = p == 0.f ? 0.f : p * ((DROP ? z * a.drop_scale * dp : dp) - dsum[r]);
      }
      for (int jj = 0; jj < nk; ++jj) {
        float dsj[kSimtRows];
#pragma unroll
        for (int r = 0; r < kSimtRows; ++r) dsj[r] = shfl_idx(ds[r], jj);
#pragma unroll
        for (int t = 0; t < kSimtSlices; ++t) {
          const int e = lane + 32 * t;
          if (e < a.E) {
            const float kv = sK[jj * Ep + e];
#pragma unroll
            for (int r = 0; r < kSimtRows; ++r) dq[r][t] += dsj[r] * kv;
          }
        }
      }
    }
  }

  T* dqp = static_cast<T*>(a.dq) + (varlen ? 0 : b * a.dq_sb) + h * a.dq_sh + sq.q0 * a.dq_sl;
#pragma unroll
  for (int r = 0; r < kSimtRows; ++r) {
    const int64_t i = m0 + warp * kSimtRows + r;
    if (i >= sq.Lb) continue;
#pragma unroll
    for (int t = 0; t < kSimtSlices; ++t) {
      const int e = lane + 32 * t;
      if (e < a.E) st_g(dqp + i * a.dq_sl + e, from_acc<T>(dq[r][t] * a.scale));
    }
  }
}

// ------------------------------------------------------------------ host side

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// 16-byte loads of rows of n elements (esize bytes each) at p with these element strides.
bool vec_ok(const void* p, int64_t n, int64_t esize, bool varlen, int64_t sb, int64_t sh,
            int64_t sl) {
  const int64_t w = 16 / esize;
  return n > 0 && n % w == 0 && aligned(p, 16) && (varlen || sb % w == 0) && sh % w == 0 &&
         sl % w == 0;
}

constexpr int64_t kMaxGrid = 2147483647;

cudaError_t check_common(const AttnParams& p) {
  if (p.dtype != DType::F32 && p.dtype != DType::F16 && p.dtype != DType::BF16) {
    return p.dtype == DType::F64 ? cudaErrorNotSupported : cudaErrorInvalidValue;
  }
  if (p.B < 0 || p.Hq < 0 || p.Hk < 0 || p.L < 0 || p.S < 0 || p.E < 0 || p.Ev < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.E > kAttnMaxHeadDim || p.Ev > kAttnMaxHeadDim) return cudaErrorNotSupported;
  if (p.Hq > 0 && (p.Hk <= 0 || p.Hq % p.Hk != 0)) return cudaErrorInvalidValue;
  if ((p.cu_q == nullptr) != (p.cu_k == nullptr)) return cudaErrorInvalidValue;
  if (p.cu_q != nullptr && p.mask != nullptr) return cudaErrorInvalidValue;
  if (p.mask != nullptr && p.mask_dtype != DType::Bool && p.mask_dtype != p.dtype &&
      p.mask_dtype != DType::F32) {
    return cudaErrorInvalidValue;
  }
  if (p.window_left < -1 || p.window_right < -1) return cudaErrorInvalidValue;
  if (p.B > INT32_MAX || p.Hq > INT32_MAX) return cudaErrorInvalidValue;
  return cudaSuccess;
}

Args make_args(const AttnParams& p) {
  Args a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.o = p.o;
  a.lse = static_cast<float*>(p.lse);
  a.q_sb = p.q_sb, a.q_sh = p.q_sh, a.q_sl = p.q_sl;
  a.k_sb = p.k_sb, a.k_sh = p.k_sh, a.k_sl = p.k_sl;
  a.v_sb = p.v_sb, a.v_sh = p.v_sh, a.v_sl = p.v_sl;
  a.o_sb = p.o_sb, a.o_sh = p.o_sh, a.o_sl = p.o_sl;
  a.mask = p.mask;
  a.mask_kind = p.mask_dtype == DType::Bool  ? kMaskBool
                : p.mask_dtype == DType::F32 ? kMaskF32
                                             : kMaskT;
  a.m_sb = p.m_sb, a.m_sh = p.m_sh, a.m_sl = p.m_sl, a.m_ss = p.m_ss;
  a.cu_q = p.cu_q;
  a.cu_k = p.cu_k;
  a.L = p.L;
  a.S = p.S;
  // a side that reaches past every key is unbounded (this also keeps the kernels' sums small)
  const int64_t far = p.L + p.S;
  a.wl = p.window_left >= far ? -1 : p.window_left;
  a.wr = p.window_right >= far ? -1 : p.window_right;
  a.B = static_cast<int>(p.B);
  a.Hq = static_cast<int>(p.Hq);
  a.group = p.Hk > 0 ? static_cast<int>(p.Hq / p.Hk) : 1;
  a.E = static_cast<int>(p.E);
  a.Ev = static_cast<int>(p.Ev);
  a.bottom_right = p.bottom_right ? 1 : 0;
  a.scale = static_cast<float>(p.scale);
  a.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  a.seed = p.seed;
  a.drop_threshold = p.drop_threshold;
  a.drop_scale = p.drop_threshold != 0 ? static_cast<float>(p.drop_scale) : 1.f;
  const bool varlen = p.cu_q != nullptr;
  const int64_t esize = dtype_size(p.dtype);
  a.q_vec = vec_ok(p.q, p.E, esize, varlen, p.q_sb, p.q_sh, p.q_sl);
  a.k_vec = vec_ok(p.k, p.E, esize, varlen, p.k_sb, p.k_sh, p.k_sl);
  a.v_vec = vec_ok(p.v, p.Ev, esize, varlen, p.v_sb, p.v_sh, p.v_sl);
  return a;
}

// One 1-D grid of blocks over (row blocks, batch, heads).
cudaError_t grid_of(int64_t blocks_per_head, int64_t heads, int64_t B, unsigned& grid) {
  const int64_t n = blocks_per_head * heads * B;
  if (blocks_per_head > INT32_MAX || n > kMaxGrid) return cudaErrorInvalidValue;
  grid = static_cast<unsigned>(n);
  return cudaSuccess;
}

template <typename T, int D, bool DROP>
cudaError_t fwd_mma(Args a, int64_t B, cudaStream_t stream) {
  using C = MmaFwd<T, D, DROP>;
  a.nblk = static_cast<int>((a.L + C::BM - 1) / C::BM);
  unsigned grid = 0;
  cudaError_t err = grid_of(a.nblk, a.Hq, B, grid);
  if (err != cudaSuccess) return err;
  const int smem = a.mask != nullptr ? C::kSmemMask : C::kSmemData;
  const void* fn = reinterpret_cast<const void*>(&attn_fwd_mma_kernel<T, D, DROP>);
  err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemMask);
  if (err != cudaSuccess) return err;
  LMK_ATTN_LAUNCH((attn_fwd_mma_kernel<T, D, DROP>), grid, C::kThreads, smem, stream, a);
  return cudaGetLastError();
}

template <typename T, bool DROP>
cudaError_t fwd_mma_dispatch(const Args& a, int64_t B, cudaStream_t stream) {
  const int d = std::max(a.E, a.Ev);
  if (d <= 64) return fwd_mma<T, 64, DROP>(a, B, stream);
  if (d <= 128) return fwd_mma<T, 128, DROP>(a, B, stream);
  return fwd_mma<T, 256, DROP>(a, B, stream);
}

// Dropout is a template parameter of the tensor-core kernels: the kernels without it stay as
// they are (two of them sit at the register limit).
template <typename T>
cudaError_t fwd_mma_dispatch(const Args& a, int64_t B, cudaStream_t stream) {
  return a.drop_threshold != 0 ? fwd_mma_dispatch<T, true>(a, B, stream)
                               : fwd_mma_dispatch<T, false>(a, B, stream);
}

// Shared bytes of the SIMT kernels for rows_q query rows and rows_k keys per tile.
int simt_smem(const Args& a, int rows_q, int rows_k) {
  return (rows_q + rows_k) * (pad_odd(a.E) + pad_odd(a.Ev)) * static_cast<int>(sizeof(float));
}

template <typename Kernel>
cudaError_t set_smem(Kernel* kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <bool DROP>
cudaError_t fwd_simt(Args a, int64_t B, cudaStream_t stream) {
  a.nblk = static_cast<int>((a.L + kSimtBM - 1) / kSimtBM);
  unsigned grid = 0;
  cudaError_t err = grid_of(a.nblk, a.Hq, B, grid);
  if (err != cudaSuccess) return err;
  // sQ (kSimtBM x Ep), sK (kSimtBN x Ep), sV (kSimtBN x Evp)
  const int smem = (kSimtBM * pad_odd(a.E) + kSimtBN * (pad_odd(a.E) + pad_odd(a.Ev))) *
                   static_cast<int>(sizeof(float));
  err = set_smem(&attn_fwd_simt_kernel<float, DROP>, smem);
  if (err != cudaSuccess) return err;
  LMK_ATTN_LAUNCH((attn_fwd_simt_kernel<float, DROP>), grid, kSimtThreads, smem, stream, a);
  return cudaGetLastError();
}

template <typename T, int D, bool DROP>
cudaError_t bwd_mma(const Args& a, int64_t B, cudaStream_t stream) {
  using C = MmaBwd<T, D, DROP>;
  {  // dk, dv
    Args c = a;
    c.nblk = static_cast<int>((a.S + C::BN - 1) / C::BN);
    unsigned grid = 0;
    cudaError_t err = grid_of(c.nblk, a.Hq / a.group, B, grid);
    if (err != cudaSuccess) return err;
    const int smem = a.mask != nullptr ? C::kSmem1Mask : C::kSmem1;
    err = set_smem(&attn_bwd_dkdv_mma_kernel<T, D, DROP>, C::kSmem1Mask);
    if (err != cudaSuccess) return err;
    if (grid > 0) {
      LMK_ATTN_LAUNCH((attn_bwd_dkdv_mma_kernel<T, D, DROP>), grid, C::kThreads, smem, stream, c);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  {  // dq
    Args c = a;
    c.nblk = static_cast<int>((a.L + C::BM - 1) / C::BM);
    unsigned grid = 0;
    cudaError_t err = grid_of(c.nblk, a.Hq, B, grid);
    if (err != cudaSuccess) return err;
    const int smem = a.mask != nullptr ? C::kSmem2Mask : C::kSmem2;
    err = set_smem(&attn_bwd_dq_mma_kernel<T, D, DROP>, C::kSmem2Mask);
    if (err != cudaSuccess) return err;
    if (grid > 0) {
      LMK_ATTN_LAUNCH((attn_bwd_dq_mma_kernel<T, D, DROP>), grid, C::kThreads, smem, stream, c);
      err = cudaGetLastError();
    }
    return err;
  }
}

// The SIMT backward (fp32 data): dk / dv, then dq.
template <typename T, bool DROP>
cudaError_t bwd_simt(const Args& a, int64_t B, cudaStream_t stream) {
  // dk, dv
  {
    Args c = a;
    c.nblk = static_cast<int>((a.S + kSimtKeys - 1) / kSimtKeys);
    unsigned grid = 0;
    cudaError_t err = grid_of(c.nblk, a.Hq / a.group, B, grid);
    if (err != cudaSuccess) return err;
    const int smem = simt_smem(a, kSimtQT, kSimtKeys);
    err = set_smem(&attn_bwd_dkdv_kernel<T, DROP>, smem);
    if (err != cudaSuccess) return err;
    if (grid > 0) {
      LMK_ATTN_LAUNCH((attn_bwd_dkdv_kernel<T, DROP>), grid, kSimtThreads, smem, stream, c);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  // dq
  {
    Args c = a;
    c.nblk = static_cast<int>((a.L + kSimtBM - 1) / kSimtBM);
    unsigned grid = 0;
    cudaError_t err = grid_of(c.nblk, a.Hq, B, grid);
    if (err != cudaSuccess) return err;
    const int smem = simt_smem(a, kSimtBM, kSimtBN);
    err = set_smem(&attn_bwd_dq_kernel<T, DROP>, smem);
    if (err != cudaSuccess) return err;
    if (grid > 0) {
      LMK_ATTN_LAUNCH((attn_bwd_dq_kernel<T, DROP>), grid, kSimtThreads, smem, stream, c);
      err = cudaGetLastError();
    }
    return err;
  }
}

template <typename T>
cudaError_t bwd_typed(Args a, int64_t B, int64_t lse_rows, cudaStream_t stream) {
  // D = rowsum(dO * O)
  const int64_t warps_per_block = kSimtThreads / 32;
  const unsigned prep_grid = static_cast<unsigned>(
      min64((lse_rows + warps_per_block - 1) / warps_per_block, int64_t{1} << 20));
  if (lse_rows > 0) {
    LMK_ATTN_LAUNCH(attn_bwd_prep_kernel<T>, prep_grid, kSimtThreads, 0, stream, a, lse_rows);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (!std::is_same_v<T, float>) {  // tensor cores (head dims up to 256)
    const int d = std::max(a.E, a.Ev);
    const bool drop = a.drop_threshold != 0;
    if (d <= 64)
      return drop ? bwd_mma<T, 64, true>(a, B, stream) : bwd_mma<T, 64, false>(a, B, stream);
    if (d <= 128) {
      return drop ? bwd_mma<T, 128, true>(a, B, stream) : bwd_mma<T, 128, false>(a, B, stream);
    }
    return drop ? bwd_mma<T, 256, true>(a, B, stream) : bwd_mma<T, 256, false>(a, B, stream);
  }
  return a.drop_threshold != 0 ? bwd_simt<T, true>(a, B, stream) : bwd_simt<T, false>(a, B, stream);
}

}  // namespace

cudaError_t attention_fwd_cuda(const AttnParams& p, cudaStream_t stream) {
  cudaError_t err = check_common(p);
  if (err != cudaSuccess) return err;
  if (p.B == 0 || p.Hq == 0 || p.L == 0) return cudaSuccess;
  if ((p.Ev > 0 && p.o == nullptr) || p.lse == nullptr) return cudaErrorInvalidValue;
  if ((p.E > 0 && p.q == nullptr) ||
      (p.S > 0 && ((p.E > 0 && p.k == nullptr) || (p.Ev > 0 && p.v == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  const Args a = make_args(p);
  switch (p.dtype) {
    case DType::F32:
      return p.drop_threshold != 0 ? fwd_simt<true>(a, p.B, stream)
                                   : fwd_simt<false>(a, p.B, stream);
    case DType::F16:
      return fwd_mma_dispatch<__half>(a, p.B, stream);
    case DType::BF16:
      return fwd_mma_dispatch<__nv_bfloat16>(a, p.B, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t attention_bwd_cuda(const AttnBwdParams& p, float* workspace, cudaStream_t stream) {
  const AttnParams& f = p.fwd;
  cudaError_t err = check_common(f);
  if (err != cudaSuccess) return err;
  if (f.B == 0 || f.Hq == 0) return cudaSuccess;
  Args a = make_args(f);
  a.dout = p.dout;
  a.do_sb = p.do_sb, a.do_sh = p.do_sh, a.do_sl = p.do_sl;
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  a.dq_sb = p.dq_sb, a.dq_sh = p.dq_sh, a.dq_sl = p.dq_sl;
  a.dk_sb = p.dk_sb, a.dk_sh = p.dk_sh, a.dk_sl = p.dk_sl;
  a.dv_sb = p.dv_sb, a.dv_sh = p.dv_sh, a.dv_sl = p.dv_sl;
  a.dsum = workspace;
  a.do_vec =
      vec_ok(p.dout, f.Ev, dtype_size(f.dtype), f.cu_q != nullptr, p.do_sb, p.do_sh, p.do_sl);
  // lse / workspace rows: dense B * Hq * L; varlen Hq * total_q, counted on the device (the prep
  // kernel's grid covers Hq * max_q * B >= Hq * total_q rows and stops at the total)
  const bool varlen = f.cu_q != nullptr;
  const int64_t rows = varlen ? f.Hq * f.L * f.B : f.B * f.Hq * f.L;
  if (rows > 0 && (workspace == nullptr || f.lse == nullptr)) return cudaErrorInvalidValue;
  switch (f.dtype) {
    case DType::F32:
      return bwd_typed<float>(a, f.B, rows, stream);
    case DType::F16:
      return bwd_typed<__half>(a, f.B, rows, stream);
    case DType::BF16:
      return bwd_typed<__nv_bfloat16>(a, f.B, rows, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lmk
