// Embedding lookup and its weight gradient: the contract every backend implements.
//
// Forward: out[t, :] = weight[idx[t], :] for t < n, a plain copy in the weight's dtype T
// (f32, f16, bf16, f64). Indices are int32 or int64 and are checked first: any idx[t] outside
// [0, num_embeddings) makes the call write nothing and report the first such t.
//
// Backward (deterministic): dw[v, :] = scale_v * sum over t with idx[t] == v, in increasing t,
// of dy[t, :], accumulated in A (f32; f64 for f64 data) and rounded once to T, where
// scale_v = 1 / count(v) (rounded to A) with scale_grad_by_freq, else grad_scale (rounded to A;
// 1 for a plain embedding, the forward's scale for the token table of the fused layer below; a
// scale of exactly 1 multiplies nothing). Rows never looked up, and
// the row padding_idx (when >= 0), are zeros. The order of the additions depends only on idx, so
// the result is bitwise the same on every call and for any thread count. Indices are those the
// forward checked.
//
// Fused token + positional embedding (lmkernels.functional.token_positional_embedding):
//   out[t, j] = round_T(scale * tok[ids[t], j] + pe(t, j)), evaluated in A
// where pe(t, j) = pos_weight[pos[t], j] for a learned table, or, with no table (the sinusoid),
//   pe(t, j) = sin(pos[t] * inv_freq[j / 2]) for even j, cos(pos[t] * inv_freq[j / 2]) for odd j,
// inv_freq[i] = 10000^(-2i / dim) handed in by the caller as ceil(dim / 2) f64 values (the same
// bits on every backend). The angle is the f64 product pos * inv_freq, reduced in f64 to a
// quadrant q and r in [-pi/4, pi/4] (sinusoid_pair below); sine and cosine of r are f32
// polynomials, so the sinusoid is within a few f32 ulp of the exact value for positions below
// 2^31 (the f64 reference rounds the exact value). f64 data takes sin and cos of the f64 angle
// in f64 instead. Checks come first and a failed check writes
// nothing: ids[t] in [0, num_embeddings) for every t, then pos[t] in [0, num_positions)
// (num_positions = 2^31 for the sinusoid); the first bad t is reported as t (ids) or n + t
// (positions). Its backward is two embedding backwards: the token table's with grad_scale =
// scale (and padding_idx), the positional table's with grad_scale 1.
#pragma once
#include <cmath>
#include <cstdint>

#include "lmk/common.h"

namespace lmk {

struct EmbeddingFwdParams {
  DType dtype = DType::F32;      // T of weight and out
  const void* weight = nullptr;  // (num_embeddings, dim), rows weight_stride elements apart
  const void* idx = nullptr;     // (n) int32 or int64
  bool idx64 = true;
  void* out = nullptr;  // (n, dim) contiguous
  int64_t n = 0, dim = 0, num_embeddings = 0, weight_stride = 0;
};

struct EmbeddingBwdParams {
  DType dtype = DType::F32;   // T of dy and dw
  const void* dy = nullptr;   // (n, dim) contiguous
  const void* idx = nullptr;  // (n) int32 or int64, all in [0, num_embeddings)
  bool idx64 = true;
  void* dw = nullptr;  // (num_embeddings, dim) contiguous
  int64_t n = 0, dim = 0, num_embeddings = 0;
  int64_t padding_idx = -1;  // a row that gets no gradient, or -1
  bool scale_grad_by_freq = false;
  double grad_scale = 1.0;  // the scale of every row without scale_grad_by_freq
};

struct TokenPosFwdParams {
  DType dtype = DType::F32;          // T of both tables and out
  const void* tok_weight = nullptr;  // (num_embeddings, dim), rows tok_stride elements apart
  const void* ids = nullptr;         // (n) int32 or int64
  bool ids64 = true;
  const void* pos_weight = nullptr;  // (num_positions, dim), rows pos_stride apart; null: sinusoid
  const void* pos = nullptr;         // (n) int32 or int64
  bool pos64 = true;
  const double* inv_freq = nullptr;  // (ceil(dim / 2)) for the sinusoid
  double scale = 1.0;                // rounded to A
  void* out = nullptr;               // (n, dim) contiguous
  int64_t n = 0, dim = 0, num_embeddings = 0, tok_stride = 0, num_positions = 0, pos_stride = 0;
};

// The largest position the sinusoid takes (exclusive): the f64 angle stays accurate below it.
constexpr int64_t kSinusoidPositions = int64_t{1} << 31;

// Sine and cosine of angle = pos * inv_freq (pos < 2^31, inv_freq <= 1): reduced in f64 by
// Cody-Waite with pi/2 in two parts to r in [-pi/4, pi/4] and the quadrant q, then f32 minimax
// polynomials on r (Cephes' sinf/cosf coefficients, < 1 ulp there), rotated by q. Every backend
// evaluates these steps (the vectorised CPU loop and the Triton kernel transcribe them).
struct SinCos {
  float s, c;
};
LMK_HD SinCos sinusoid_pair(double angle) {
  constexpr double kTwoOverPi = 0.63661977236758134308;
  constexpr double kPiO2Hi = 1.57079632679489655800e+00;  // pi/2 rounded to f64
  constexpr double kPiO2Lo = 6.12323399573676603587e-17;  // pi/2 - kPiO2Hi
  const double k = rint(angle * kTwoOverPi);
  const float r = static_cast<float>((angle - k * kPiO2Hi) - k * kPiO2Lo);
  const float r2 = r * r;
  const float sp =
      r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cp =
      1.0f - 0.5f * r2 +
      r2 * r2 *
          (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const int64_t q = static_cast<int64_t>(k) & 3;
  // q = 0: (sp, cp); 1: (cp, -sp); 2: (-sp, -cp); 3: (-cp, sp)
  const float s = (q & 1) ? cp : sp, c = (q & 1) ? sp : cp;
  return {(q & 2) ? -s : s, ((q + 1) & 2) ? -c : c};
}

}  // namespace lmk
