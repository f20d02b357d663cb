// Fused (flash-style) attention: the contract every backend implements.
//
// Problem. q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq % Hk == 0: query head h reads
// key/value head h / (Hq / Hk) (GQA / MQA; Hk == Hq is plain multi-head). Every tensor is a
// strided view whose last dim is contiguous (element strides for batch, head and sequence).
// Variable-length batches (cu_q / cu_k non-null, int32, B + 1 entries, non-decreasing, cu[0] = 0):
// the tensors are one packed batch (their batch stride is unused), sequence b holds query rows
// cu_q[b] .. cu_q[b + 1] and key rows cu_k[b] .. cu_k[b + 1]; L and S are then the largest
// lengths (max_seqlen) and only bound the work. Without cu, every sequence has L queries and S
// keys.
//
// For query row i and key j of one sequence (lengths Lb, Sb), with the scores
//   s[i, j] = scale * dot(q[i], k[j]) + mask[i, j]        (mask: additive, or bool: false = -inf)
// key j takes part iff mask allows it and it lies in the window around the query's diagonal
//   d(i) = i + (bottom_right ? Sb - Lb : 0):   d(i) - window_left <= j <= d(i) + window_right
// (a negative window side is unbounded; causal is window_right = 0, top-left aligned as torch's
// is_causal unless bottom_right). Then, over the keys that take part,
//   lse[i] = log(sum_j exp(s[i, j]))      (natural log; -inf when no key takes part)
//   o[i]   = sum_j exp(s[i, j] - lse[i]) * v[j]   (zeros when no key takes part, never NaN)
// accumulated in A (f32; f64 for f64 data) and rounded once to T (f32, f16, bf16, f64). A score
// of +inf or NaN, or a NaN in q/k/v, propagates as NaN to the rows it reaches (as the math does).
// lse is always A, laid out (B, Hq, L) contiguous (varlen: (1, Hq, total_q)).
// The mask is a (B, Hq, L, S) strided view (zero strides for broadcast dims): bool, or additive
// of T or of f32 (an f32 mask on 16-bit data is added in A, unrounded); it is only for dense
// batches.
//
// Dropout (drop_threshold > 0): after the softmax, P[i, j] = exp(s[i, j] - lse[i]) is replaced by
// P[i, j] * keep(i, j) * drop_scale, keep from the counter-based RNG of lmk/philox.h
// (dropout_keep(seed, drop_threshold, b * Hq + h, i, j)) and drop_scale = 2^32 / (2^32 -
// drop_threshold), the inverse keep probability; lse stays the undropped one. The backward
// redraws the same keep bits.
//
// Backward, with P[i, j] = exp(s[i, j] - lse[i]) (0 where the key does not take part),
// Z[i, j] = keep(i, j) * drop_scale (1 without dropout) and D[i] = sum_e dO[i, e] * O[i, e]
// (the output as stored, in A):
//   dS[i, j] = P[i, j] * (Z[i, j] * dot(dO[i], v[j]) - D[i])
//   dq[i] = scale * sum_j dS[i, j] k[j]
//   dk[j] = scale * sum over i and over the query heads of the group of dS[i, j] q[i]
//   dv[j] = sum over i and the group's heads of P[i, j] Z[i, j] dO[i]
// in A, rounded once. The sums' order is fixed by the shapes only (no atomics on floats), so
// repeated calls give the same bits. Rows with lse = -inf contribute nothing.
#pragma once
#include <cstdint>

#include "lmk/common.h"
#include "lmk/philox.h"

namespace lmk {

struct AttnParams {
  DType dtype = DType::F32;  // T of q, k, v, o (and dO, dq, dk, dv in the backward)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  void* lse = nullptr;                   // A: f32 (f64 for f64 data), (B, Hq, L) contiguous
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;  // element strides: batch, head, sequence
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  int64_t B = 0, Hq = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;
  double scale = 1.0;
  // mask: null, or a (B, Hq, L, S) strided view of mask_dtype: Bool, T, or F32 (additive)
  const void* mask = nullptr;
  DType mask_dtype = DType::Bool;
  int64_t m_sb = 0, m_sh = 0, m_sl = 0, m_ss = 0;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded; causal: window_right = 0
  bool bottom_right = false;
  const int32_t* cu_q = nullptr;  // varlen: (B + 1) row offsets, or null
  const int32_t* cu_k = nullptr;
  // dropout (lmk/philox.h): threshold 0 = none; drop_scale = 2^32 / (2^32 - drop_threshold)
  uint64_t seed = 0;
  uint32_t drop_threshold = 0;
  double drop_scale = 1.0;
};

struct AttnBwdParams {
  AttnParams fwd;  // q, k, v, o (as the forward stored it), lse, mask, shapes, options
  const void* dout = nullptr;
  int64_t do_sb = 0, do_sh = 0, do_sl = 0;
  void* dq = nullptr;  // like q (its own strides)
  void* dk = nullptr;  // like k
  void* dv = nullptr;  // like v
  int64_t dq_sb = 0, dq_sh = 0, dq_sl = 0;
  int64_t dk_sb = 0, dk_sh = 0, dk_sl = 0;
  int64_t dv_sb = 0, dv_sh = 0, dv_sl = 0;
};

}  // namespace lmk
