// Softmax / log-softmax forward and backward on CPU (contract: lmk/softmax.h).
//
// Compiled twice by CMake: CPU_CAPABILITY=AVX2 (-mavx2 -mfma -mf16c; 8-wide __m256 code) and
// CPU_CAPABILITY=DEFAULT (the same algorithm on a portable 8-lane struct the compiler
// auto-vectorises). The binding picks one variant at run time.
//
// Algorithm, per row (three passes, fp32 accumulation; fp64 data accumulates in double):
//   1. m = max_j z_j                      z_j = scale * x_j (+ mask_j), masked -> -inf
//   2. s = sum_j exp(z_j - m)             softmax: e_j = exp(z_j - m) is stored in the row's fp32
//                                         buffer (y itself for fp32, a scratch row otherwise)
//   3. softmax: y_j = e_j * (1 / s)       log_softmax: y_j = z_j - (m + log s)
//   Without a float/bool-vector mask z is recomputed from x in each pass (one FMA); with one,
//   pass 1 materialises z into the fp32 buffer. Causal masking only shortens the row: columns
//   j > r % causal_rows are written as 0 (or -inf for log) without being read.
//   Pass 2's exp is exp2_neg: 2^u = 2^n * q(f) with u = (z - m) * log2e, an inline polynomial
//   of degree 5 / 4 / 3 for fp32 / fp16 / bf16 output (1.9e-7 / 2.9e-6 / 1.0e-4 relative), exact
//   0 for -inf and below 2^-127 (flushed instead of producing fp32 denormals), NaN propagates.
//   For softmax on AVX2, log2e is folded into the pass's FMA (u = x * scale * log2e - shift, see
//   sum_chunk): ~10 vector ops per 8 elements, 5 on the FMA pipes in bf16. The pass is
//   exp-bound, so every op counts.
//   Rows longer than 64 KiB (softmax, no vector mask) run passes 1-2 per 4096-column block (the
//   block stays in L1 between them) with per-block max and sum, and pass 3 rescales each block
//   by exp(m_k - M) / S (fwd_row_blocked); x is then read from memory only once.
// Backward, per row (two passes):
//   softmax:     d = sum_k dy_k y_k;  dx_j = scale * y_j * (dy_j - d)
//   log_softmax: d = sum_k dy_k;      dx_j = scale * (dy_j - exp(y_j) * d)
//
// Memory traffic (elements of the data dtype; the fp32 buffer stays in L1/L2 for rows up to
// ~64K): forward reads x twice (softmax, no mask: passes 1-2; the second read hits cache) and
// writes y once (plus an fp32 write+read of the buffer); backward reads y and dy twice, writes dx.
//
// Threading: at::parallel_for over rows, grain chosen so a task has >= ~32K elements (small
// tensors run on the calling thread). When there are fewer rows than ~4x the threads and rows
// are long, every pass is split over (row, column-block) items with per-block partial
// max / sum that are combined in a fixed order (deterministic for a fixed thread count).
//
// Special values (match torch.softmax): NaN anywhere in a row -> the whole row is NaN; +inf in
// a row -> NaN row (inf - inf). With a mask or causal, a row whose every z is -inf (fully
// masked) gives 0 (log: -inf), never NaN, unless it also holds a NaN; without them such a row
// gives NaN, as torch does. A float mask may contain -inf.
// Limits: offsets are 64-bit; exp_neg / exp2_neg are only valid for arguments <= 88 / 127 (they
// are only called on z - max <= 0 (up to rounding) and on log-probabilities); outputs below
// ~1e-38 are flushed to 0.
#include "lmk/softmax.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace lmk::cpu::CPU_CAPABILITY {
namespace {

#include "vec.h"

// exp_neg constants: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2. p is a degree-5 polynomial with
// p(0) = 1, fitted for minimax relative error on [-ln2/2, ln2/2] (9e-8 before rounding).
constexpr float kExpLo = -88.f;  // clamp: n = -127 below about -87.7, whose 2^n bits are +0
// kLog2e, kMagic and the degree-5 2^f constants kF1..kF5 are vec.h's (its exp2v).
constexpr float kLn2Hi = 0.693359375f;  // ln2 split so that n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP1 = 9.999997020e-01f, kP2 = 4.999915063e-01f, kP3 = 1.666763574e-01f,
                kP4 = 4.189793020e-02f, kP5 = 8.290315047e-03f;
// Degree 4 (2.8e-6 relative), enough for results rounded to bf16 / fp16 (the log_softmax
// backward's exp(y)); it reduces with a single ln2 constant (n * ln2 is then off by at most
// 127 * 2.3e-8 * ln2, i.e. < 3e-6 relative), one FMA less than the split.
constexpr float kQ1 = 9.999668598e-01f, kQ2 = 5.000301600e-01f, kQ3 = 1.678747386e-01f,
                kQ4 = 4.151384905e-02f;
constexpr float kLn2 = 0.693147181f;
// exp2_neg (the forward's exp pass): 2^f on [-1/2, 1/2], minimax relative, q(0) = 1, fitted
// here; degree 3 (1.0e-4 relative, 1/20 of a bf16 half-ulp) for bf16, 4 (2.9e-6) for fp16.
constexpr float kExp2Lo = -127.f;  // 2^n bits of n = -127 are +0
constexpr float kD1 = 6.932829022e-01f, kD2 = 2.422102094e-01f, kD3 = 5.500861630e-02f;
constexpr float kE1 = 6.931241751e-01f, kE2 = 2.402409911e-01f, kE3 = 5.590633675e-02f,
                kE4 = 9.582820348e-03f;
// Degree 5 (1.9e-7 relative, evaluated in fp32): fp32 data; kF1..kF5 of vec.h.

// ------------------------------------------------------------------ exp, masks (8 lanes)
#if defined(CPU_CAPABILITY_AVX2)

// z where the bool mask byte is 0, -inf where it is non-zero.
inline Vf apply_bool_mask(Vf z, const uint8_t* m) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, _mm256_setzero_si256()));
  return {_mm256_blendv_ps(_mm256_set1_ps(-kInf), z.v, keep)};
}
// t = v + kMagic rounds v to an integer n held in t's low mantissa bits as n + 127 in
// [0, 254]; shifted into the exponent field they are 2^n (+0 for n = -127).
inline __m256 pow2_from_magic(__m256 t) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
}
// exp(x) for x <= 88 (see the constants above); NaN -> NaN, -inf -> 0. kDeg 5: fp32 accuracy;
// kDeg 4: 3e-6 relative, used when the result is rounded to a 16-bit type.
template <int kDeg = 5>
inline Vf exp_neg(Vf x) {
  __m256 xc = _mm256_max_ps(_mm256_set1_ps(kExpLo), x.v);  // keeps NaN (second operand)
  __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kMagic));
  __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kMagic));
  __m256 r, p;
  if constexpr (kDeg == 5) {
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    p = _mm256_fmadd_ps(_mm256_set1_ps(kP5), r, _mm256_set1_ps(kP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP1));
  } else {
    static_assert(kDeg == 4);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), xc);
    p = _mm256_fmadd_ps(_mm256_set1_ps(kQ4), r, _mm256_set1_ps(kQ3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kQ2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kQ1));
  }
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  return {_mm256_mul_ps(p, pow2_from_magic(t))};
}

// 2^u for u <= 127 (used for 16-bit data): 2^n * q(f), u = n + f, |f| <= 1/2; u below -127
// gives 0, NaN -> NaN. kDeg 3: 1.0e-4 relative (bf16); kDeg 4: 2.9e-6 (fp16).
template <int kDeg>
inline Vf exp2_neg(Vf u) {
  __m256 uc = _mm256_max_ps(_mm256_set1_ps(kExp2Lo), u.v);  // keeps NaN
  __m256 t = _mm256_add_ps(uc, _mm256_set1_ps(kMagic));
  __m256 f = _mm256_sub_ps(uc, _mm256_sub_ps(t, _mm256_set1_ps(kMagic)));
  __m256 p;
  if constexpr (kDeg == 5) {
    p = _mm256_fmadd_ps(_mm256_set1_ps(kF5), f, _mm256_set1_ps(kF4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kF3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kF2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kF1));
  } else if constexpr (kDeg == 4) {
    p = _mm256_fmadd_ps(_mm256_set1_ps(kE4), f, _mm256_set1_ps(kE3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE1));
  } else {
    p = _mm256_fmadd_ps(_mm256_set1_ps(kD3), f, _mm256_set1_ps(kD2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kD1));
  }
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return {_mm256_mul_ps(p, pow2_from_magic(t))};
}

#else  // portable

inline Vf apply_bool_mask(Vf z, const uint8_t* m) {
  return vmap([&](int i) { return m[i] ? -kInf : z.v[i]; });
}
// Scalar twin of the AVX2 pow2_from_magic.
inline float pow2_from_magic(float t) {
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return s;
}
template <int kDeg>
inline float exp_neg1(float x) {
  float xc = kExpLo > x ? kExpLo : x;  // keeps NaN
  float t = xc * kLog2e + kMagic;
  float n = t - kMagic;
  float r = kDeg == 5 ? (xc - n * kLn2Hi) - n * kLn2Lo : xc - n * kLn2;
  float p = kDeg == 5 ? ((((kP5 * r + kP4) * r + kP3) * r + kP2) * r + kP1) * r + 1.f
                      : (((kQ4 * r + kQ3) * r + kQ2) * r + kQ1) * r + 1.f;
  return p * pow2_from_magic(t);
}
template <int kDeg = 5>
inline Vf exp_neg(Vf x) {
  return vmap([&](int i) { return exp_neg1<kDeg>(x.v[i]); });
}
template <int kDeg>
inline float exp2_neg1(float u) {
  float uc = kExp2Lo > u ? kExp2Lo : u;  // keeps NaN
  float t = uc + kMagic;
  float f = uc - (t - kMagic);
  float p = kDeg == 5   ? ((((kF5 * f + kF4) * f + kF3) * f + kF2) * f + kF1) * f + 1.f
            : kDeg == 4 ? (((kE4 * f + kE3) * f + kE2) * f + kE1) * f + 1.f
                        : ((kD3 * f + kD2) * f + kD1) * f + 1.f;
  return p * pow2_from_magic(t);
}
template <int kDeg>
inline Vf exp2_neg(Vf u) {
  return vmap([&](int i) { return exp2_neg1<kDeg>(u.v[i]); });
}

#endif

inline Vf load_bool_masked(Vf z, const uint8_t* m, int64_t n) {
  uint8_t t[kW] = {};
  for (int i = 0; i < n; ++i) t[i] = m[i];
  return apply_bool_mask(z, t);
}

// The shift in log2 units that the folded exp pass subtracts for a max m (see sum_chunk).
inline float fold_shift(float m) { return m * kLog2e; }

enum class MaskKind { None, BoolVec, FloatVec, FloatConst };

// One row of the forward pass. `buf` is the row's fp32 workspace (y itself for fp32 data).
template <class T>
struct FwdRow {
  const T* x;
  T* y;
  float* buf;
  int64_t valid;  // columns [valid, cols) are causally masked
  int64_t cols;
  float scale;
  bool log;
  MaskKind kind;
  bool zero_empty;             // a mask or causal is given: a row with no finite z gives 0, not NaN
  const void* mask;            // row's mask pointer (BoolVec / FloatVec)
  const void* pf_x = nullptr;  // next row of x and y to prefetch during pass 2 (or null)
  void* pf_y = nullptr;
  DType mask_dtype;
  float mask_const;  // FloatConst
};

template <class T, class M>
inline Vf z_float_mask(const FwdRow<T>& a, int64_t j, Vf s, int64_t n) {
  const M* m = static_cast<const M*>(a.mask) + j;
  if (n == kW) return vfma(load(a.x + j), s, load(m));
  return vfma(load_n(a.x + j, n, 0.f), s, load_n(m, n, 0.f));
}

// Materialise z into buf[b, e) (masked rows) and return its max.
template <class T, class M>
float materialize_max(const FwdRow<T>& a, int64_t b, int64_t e) {
  const Vf s = vset(a.scale);
  Vf acc = vset(-kInf);
  int64_t j = b;
  for (; j < e; j += kW) {
    const int64_t n = std::min<int64_t>(kW, e - j);
    Vf z;
    if constexpr (std::is_same_v<M, uint8_t>) {
      const uint8_t* m = static_cast<const uint8_t*>(a.mask) + j;
      z = n == kW ? apply_bool_mask(vmul(load(a.x + j), s), m)
                  : load_bool_masked(vmul(load_n(a.x + j, n, 0.f), s), m, n);
    } else if constexpr (std::is_same_v<M, void>) {
      Vf c = vset(a.mask_const);
      z = n == kW ? vfma(load(a.x + j), s, c) : vfma(load_n(a.x + j, n, 0.f), s, c);
    } else {
      z = z_float_mask<T, M>(a, j, s, n);
    }
    if (n == kW) {
      vstore_raw(a.buf + j, z);
    } else {
      store_n(a.buf + j, z, n);
      z = keep_first(z, n, -kInf);
    }
    acc = vmax(acc, z);
  }
  return hmax(acc);
}

// max_j (kMul ? scale * x_j : x_j) over [b, e), NaN-propagating.
template <class T, bool kMul>
float raw_max(const T* x, int64_t b, int64_t e, float scale) {
  const Vf s = vset(scale);
  auto z = [&](Vf v) { return kMul ? vmul(v, s) : v; };
  Vf m0 = vset(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = b;
  for (; j + 4 * kW <= e; j += 4 * kW) {
    Vf v0, v1, v2, v3;
    load_pair(x + j, v0, v1);
    load_pair(x + j + 2 * kW, v2, v3);
    m0 = vmax(m0, z(v0));
    m1 = vmax(m1, z(v1));
    m2 = vmax(m2, z(v2));
    m3 = vmax(m3, z(v3));
  }
  for (; j + kW <= e; j += kW) m0 = vmax(m0, z(load(x + j)));
  if (j < e) m1 = vmax(m1, keep_first(z(load_n(x + j, e - j, 0.f)), e - j, -kInf));
  return max_nan(max_nan(hmax(m0), hmax(m1)), max_nan(hmax(m2), hmax(m3)));
}

// Pass 1 over columns [b, e) (e <= valid): max of z.
template <class T>
float part_max(const FwdRow<T>& a, int64_t b, int64_t e) {
  if (b >= e) return -kInf;
  switch (a.kind) {
    case MaskKind::BoolVec:
      return materialize_max<T, uint8_t>(a, b, e);
    case MaskKind::FloatConst:
      return materialize_max<T, void>(a, b, e);
    case MaskKind::FloatVec:
      if (a.mask_dtype == DType::F32) return materialize_max<T, float>(a, b, e);
      return materialize_max<T, T>(a, b, e);
    case MaskKind::None:
      break;
  }
  // Rounding is monotone: for 0 < scale < inf, max(scale * x) = scale * max(x) (NaN and -inf
  // included), so the loop needs no multiply.
  if (a.scale > 0.f && a.scale < kInf) return raw_max<T, false>(a.x, b, e, 1.f) * a.scale;
  return raw_max<T, true>(a.x, b, e, a.scale);
}

// z - m for the 8 columns at j (n valid).
template <class T>
inline Vf shifted(const FwdRow<T>& a, int64_t j, Vf s, Vf negm, int64_t n) {
  if (a.kind == MaskKind::None) {
    return n == kW ? vfma(load(a.x + j), s, negm) : vfma(load_n(a.x + j, n, 0.f), s, negm);
  }
  return n == kW ? vadd(vload_raw(a.buf + j), negm) : vadd(load_n(a.buf + j, n, 0.f), negm);
}

constexpr int64_t kSumChunk = 2048;  // multiple of 2 * kW

template <class T>
float part_sum_chunk(const FwdRow<T>& a, int64_t b, int64_t e, float m);

// Pass 2 over [b, e): sum of exp(z - m); softmax stores the exps into buf. When m is -inf every
// z is -inf or NaN: the result is then NaN if the block holds a NaN, else 0.
template <class T>
float part_sum(const FwdRow<T>& a, int64_t b, int64_t e, float m) {
  if (b >= e) return 0.f;
  if (m == -kInf) {
    for (int64_t j = b; j < e; ++j) {
      float z = a.kind == MaskKind::None ? static_cast<float>(a.x[j]) * a.scale : a.buf[j];
      if (std::isnan(z)) return kNaN;
    }
    return 0.f;
  }
  // fp32 vector sums over chunks of kSumChunk columns, chunk sums added in double.
  double total = 0.0;
  for (int64_t c = b; c < e; c += kSumChunk) {
    total += part_sum_chunk(a, c, std::min(e, c + kSumChunk), m);
  }
  return static_cast<float>(total);
}

// Exp degree for data of type T: full fp32 accuracy only where the output keeps it.
template <class T>
constexpr int kExpDeg = std::is_same_v<T, BFloat16> ? 3
                        : sizeof(T) == 2            ? 4
                                                    : 5;
// Backward (log_softmax) keeps degree 4 for 16-bit data: exp(y) is multiplied by a sum.
template <class T>
constexpr int kBwdExpDeg = sizeof(T) == 2 ? 4 : 5;

// Pass 2 inner loop over [b, e): kMat reads z from buf (else z = scale * x), kLog only sums.
// While this (L1-resident) row is computed, the next row of x and y (pf_x / pf_y, if set) is
// prefetched, one line per 16 elements, so pass 1 of the next row finds it in cache and the
// memory traffic overlaps the exp work.
template <class T, bool kMat, bool kLog>
float sum_chunk(const FwdRow<T>& a, int64_t b, int64_t e, float m) {
  const T* x = a.x;
  float* buf = a.buf;
  const char* pfx = static_cast<const char*>(a.pf_x);
  const char* pfy = static_cast<const char*>(a.pf_y);
  // exp(z - m) = 2^u. Softmax with a hardware FMA folds log2e into the shift: u = x * (scale *
  // log2e) - fold_shift(m) in one FMA, rounded once (exact-ish near the max, like z - m). The
  // rounding of the two folded constants only scales every exp of the row by one common factor
  // (plus (z - m) * 6e-8, as rounding z - m does), which the normalisation cancels. log_softmax
  // needs exp(0) = 1 exactly at the max (log s = 0 for a one-element row) and the portable
  // build has no fused multiply-add: both use u = (scale * x - m) * log2e.
  constexpr bool kFold = kHasFma && !kLog;
  const float c = kMat ? 1.f : a.scale;
  const Vf s = vset(kFold ? c * kLog2e : c), negm = vset(kFold ? -fold_shift(m) : -m);
  auto ex = [&](Vf v) {  // exp of the FMA-shifted value v
    if constexpr (kFold) {
      return exp2_neg<kExpDeg<T>>(v);
    } else {
      return exp2_neg<kExpDeg<T>>(vmul(v, vset(kLog2e)));
    }
  };
  // Shifted values of 16 elements; without a mask in x's pair layout (buf then keeps it).
  auto z = [&](int64_t j, Vf& z0, Vf& z1) {
    if constexpr (kMat) {
      z0 = vload_raw(buf + j);
      z1 = vload_raw(buf + j + kW);
    } else {
      load_pair(x + j, z0, z1);
    }
    z0 = vfma(z0, s, negm);
    z1 = vfma(z1, s, negm);
  };
  Vf s0 = vset(0.f);
  int64_t j = b;
  for (; j + 2 * kW <= e; j += 2 * kW) {
    if (pfx != nullptr) {
      __builtin_prefetch(pfx + j * sizeof(T));
      __builtin_prefetch(pfy + j * sizeof(T), 1);
    }
    Vf z0, z1;
    z(j, z0, z1);
    Vf e0 = ex(z0);
    Vf e1 = ex(z1);
    if constexpr (!kLog) {
      vstore_raw(buf + j, e0);
      vstore_raw(buf + j + kW, e1);
    }
    // One accumulator (the pair is added first, off the loop-carried chain): with two, gcc
    // runs out of the 16 ymm registers and spills an accumulator (a store-forwarding chain).
    s0 = vadd(s0, vadd(e0, e1));
    keep_in_register(s0);
  }
  for (; j < e; j += kW) {
    const int64_t n = std::min<int64_t>(kW, e - j);
    Vf v = kMat ? load_n(buf + j, n, 0.f) : load_n(x + j, n, 0.f);
    Vf e0 = keep_first(ex(vfma(v, s, negm)), n, 0.f);
    if constexpr (!kLog) store_n(buf + j, e0, n);
    s0 = vadd(s0, e0);
  }
  return hsum(s0);
}

template <class T>
float part_sum_chunk(const FwdRow<T>& a, int64_t b, int64_t e, float m) {
  const bool mat = a.kind != MaskKind::None;
  if (a.log)
    return mat ? sum_chunk<T, true, true>(a, b, e, m) : sum_chunk<T, false, true>(a, b, e, m);
  return mat ? sum_chunk<T, true, false>(a, b, e, m) : sum_chunk<T, false, false>(a, b, e, m);
}

template <class T>
inline void fill(T* p, int64_t n, float v) {
  std::fill(p, p + n, static_cast<T>(v));
}

template <class T>
void scale_out(const FwdRow<T>& a, int64_t b, int64_t e, float f);

// Pass 3 over [b, e): write y from the row's max m and exp-sum s.
template <class T>
void part_out(const FwdRow<T>& a, int64_t b, int64_t e, float m, float s) {
  if (b >= e) return;
  if (m == -kInf) {  // every z is -inf (s = 0) or the row holds a NaN (s = NaN)
    // Without a mask this is torch's result (-inf - -inf = NaN); with one, an empty row is 0.
    fill(a.y + b, e - b, std::isnan(s) || !a.zero_empty ? kNaN : (a.log ? -kInf : 0.f));
    return;
  }
  int64_t j = b;
  const bool mat = a.kind != MaskKind::None;
  if (a.log) {
    const Vf sc = vset(a.scale), neg = vset(-(m + std::log(s)));
    if (!mat) {
      for (; j + 2 * kW <= e; j += 2 * kW) {
        Vf v0, v1;
        load_pair(a.x + j, v0, v1);
        store_pair(a.y + j, vfma(v0, sc, neg), vfma(v1, sc, neg));
      }
    }
    for (; j < e; j += kW) {
      const int64_t n = std::min<int64_t>(kW, e - j);
      Vf v = shifted(a, j, sc, neg, n);
      if (n == kW) {
        store(a.y + j, v);
      } else {
        store_n(a.y + j, v, n);
      }
    }
    return;
  }
  scale_out(a, b, e, 1.f / s);
}

// y = buf * f over [b, e) (softmax). Full 16-element groups of buf (counted from b, a multiple
// of 16) are in x's pair layout when pass 2 read x (no mask).
template <class T>
void scale_out(const FwdRow<T>& a, int64_t b, int64_t e, float f) {
  const bool mat = a.kind != MaskKind::None;
  const Vf inv = vset(f);
  int64_t j = b;
  for (; j + 2 * kW <= e; j += 2 * kW) {
    Vf v0 = vmul(vload_raw(a.buf + j), inv), v1 = vmul(vload_raw(a.buf + j + kW), inv);
    if (mat) {
      store2(a.y + j, v0, v1);
    } else {
      store_pair(a.y + j, v0, v1);
    }
  }
  for (; j < e; j += kW) {
    const int64_t n = std::min<int64_t>(kW, e - j);
    if (n == kW) {
      store(a.y + j, vmul(vload_raw(a.buf + j), inv));
    } else {
      store_n(a.y + j, vmul(load_n(a.buf + j, n, 0.f), inv), n);
    }
  }
}

// scale_out(a, 0, cols, f) fused with the max of the next row xn (raw values, as raw_max):
// the output stores and the next row's loads overlap in one loop. No mask, no causal.
template <class T>
float scale_out_max(const FwdRow<T>& a, int64_t cols, float f, const T* xn) {
  const Vf inv = vset(f);
  Vf m0 = vset(-kInf), m1 = m0;
  int64_t j = 0;
  for (; j + 2 * kW <= cols; j += 2 * kW) {
    Vf v0, v1;
    load_pair(xn + j, v0, v1);
    m0 = vmax(m0, v0);
    m1 = vmax(m1, v1);
    store_pair(a.y + j, vmul(vload_raw(a.buf + j), inv), vmul(vload_raw(a.buf + j + kW), inv));
  }
  for (; j < cols; j += kW) {
    const int64_t n = std::min<int64_t>(kW, cols - j);
    if (n == kW) {
      store(a.y + j, vmul(vload_raw(a.buf + j), inv));
      m0 = vmax(m0, load(xn + j));
    } else {
      store_n(a.y + j, vmul(load_n(a.buf + j, n, 0.f), inv), n);
      m1 = vmax(m1, keep_first(load_n(xn + j, n, 0.f), n, -kInf));
    }
  }
  return max_nan(hmax(m0), hmax(m1));
}

// Causally masked tail of block [b, e): columns >= valid.
template <class T>
void part_tail(const FwdRow<T>& a, int64_t b, int64_t e) {
  b = std::max(b, a.valid);
  if (b < e) fill(a.y + b, e - b, a.log ? -kInf : 0.f);
}

// Row-independent setup of row r: causal length, mask pointer and kind.
template <class T>
FwdRow<T> make_row(const SoftmaxFwdParams& p, int64_t r, float* buf) {
  FwdRow<T> a;
  a.x = static_cast<const T*>(p.x) + r * p.cols;
  a.y = static_cast<T*>(p.y) + r * p.cols;
  a.buf = buf;
  a.cols = p.cols;
  a.valid = p.causal ? std::min<int64_t>(p.cols, r % p.causal_rows + 1) : p.cols;
  a.scale = static_cast<float>(p.scale);
  a.log = p.log;
  a.kind = MaskKind::None;
  a.zero_empty = p.mask.ptr != nullptr || p.causal;
  a.mask = nullptr;
  a.mask_dtype = p.mask.dtype;
  a.mask_const = 0.f;
  if (p.mask.ptr != nullptr) {
    const char* m =
        static_cast<const char*>(p.mask.ptr) + p.mask.row_offsets[r] * dtype_size(p.mask.dtype);
    if (p.mask.col_stride == 0) {
      if (p.mask.dtype == DType::Bool) {
        if (*reinterpret_cast<const uint8_t*>(m) != 0) a.valid = 0;
      } else {
        a.kind = MaskKind::FloatConst;
        switch (p.mask.dtype) {
          case DType::F32:
            a.mask_const = *reinterpret_cast<const float*>(m);
            break;
          case DType::F16:
            a.mask_const = static_cast<float>(*reinterpret_cast<const Half*>(m));
            break;
          case DType::BF16:
            a.mask_const = static_cast<float>(*reinterpret_cast<const BFloat16*>(m));
            break;
          default:
            break;
        }
      }
    } else {
      a.kind = p.mask.dtype == DType::Bool ? MaskKind::BoolVec : MaskKind::FloatVec;
      a.mask = m;
    }
  }
  return a;
}

// Long rows (softmax without a float/bool-vector mask): blocks of kBlock columns, each read
// from memory once by its max pass and then, from L1, by its exp pass (which prefetches the
// next block), with per-block max m_k and sum s_k; a last pass scales block k by
// exp(m_k - M) / S, M = max m_k, S = sum_k s_k exp(m_k - M) (in double, in block order).
// Returns false (having written nothing final) when some block max is not finite; the caller
// then runs the plain three passes, which own the special cases.
constexpr int64_t kBlock = 4096;  // multiple of 16 and of kSumChunk's divisors

template <class T>
bool fwd_row_blocked(const FwdRow<T>& a) {
  const int64_t n = a.valid, nb = (n + kBlock - 1) / kBlock;
  std::unique_ptr<float[]> mk(new float[2 * nb]);
  float* sk = mk.get() + nb;
  FwdRow<T> c = a;
  c.pf_x = a.x + kBlock;  // prefetch distance: one block ahead (never faults)
  c.pf_y = a.y + kBlock;
  float mx = -kInf;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t b = k * kBlock, e = std::min(n, b + kBlock);
    if (e == n) c.pf_x = c.pf_y = nullptr;
    const float m = part_max(c, b, e);
    if (!(std::fabs(m) < kInf)) return false;  // -inf, +inf or NaN
    mk[k] = m;
    mx = std::max(mx, m);
    sk[k] = part_sum(c, b, e, m);
  }
  // Block k's exps are exp(z - m_k) up to the shift actually applied: fold_shift(m_k) (a float,
  // exact in double) in log2 units when folded, m_k otherwise. Rescale by exactly that.
  auto rel = [&](int64_t k) {
    return kHasFma ? std::exp2(double(fold_shift(mk[k])) - double(fold_shift(mx)))
                   : std::exp(double(mk[k]) - double(mx));
  };
  double total = 0.0;
  for (int64_t k = 0; k < nb; ++k) total += static_cast<double>(sk[k]) * rel(k);
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t b = k * kBlock, e = std::min(n, b + kBlock);
    float f = static_cast<float>(rel(k) / total);
    if (f < std::numeric_limits<float>::min()) f = 0.f;  // as the exp flushes below ~1e-38
    scale_out(a, b, e, f);
  }
  return true;
}

template <class T>
void fwd_row(const FwdRow<T>& a) {
  if (a.kind == MaskKind::None && !a.log && a.valid * static_cast<int64_t>(sizeof(T)) > 64 * 1024 &&
      fwd_row_blocked(a)) {
    part_tail(a, 0, a.cols);
    return;
  }
  const float m = part_max(a, 0, a.valid);
  const float s = part_sum(a, 0, a.valid, m);
  part_out(a, 0, a.valid, m, s);
  part_tail(a, 0, a.cols);
}

// Split long rows into column blocks when there are too few rows to keep every thread busy.
// Returns the number of blocks per row (1: no split).
inline int64_t blocks_per_row(int64_t rows, int64_t cols) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || rows % nt == 0 || rows >= 4 * nt || cols < 16384) return 1;
  int64_t nb = nt / std::gcd(rows, nt);
  return std::min<int64_t>(nb, cols / 4096);
}

// Block [b, e) of a row split into nb blocks (boundaries multiples of 64 elements).
inline void block_range(int64_t cols, int64_t nb, int64_t k, int64_t& b, int64_t& e) {
  const int64_t chunk = ((cols + nb - 1) / nb + 63) / 64 * 64;
  b = std::min(cols, k * chunk);
  e = std::min(cols, b + chunk);
}

template <class T>
void fwd_typed(const SoftmaxFwdParams& p) {
  constexpr bool kF32 = std::is_same_v<T, float>;
  const int64_t rows = p.rows, cols = p.cols;
  const int64_t nb = blocks_per_row(rows, cols);
  if (nb == 1) {
    // Prefetch the next row while computing this one when both fit in L2 comfortably.
    const bool prefetch = cols * static_cast<int64_t>(sizeof(T)) <= 64 * 1024;
    const float scale = static_cast<float>(p.scale);
    const bool fused =
        prefetch && p.mask.ptr == nullptr && !p.causal && !p.log && scale > 0.f && scale < kInf;
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      std::unique_ptr<float[]> scratch(kF32 ? nullptr : new float[cols]);
      float next_max = 0.f;
      bool have_next = false;
      for (int64_t r = r0; r < r1; ++r) {
        float* buf =
            kF32 ? reinterpret_cast<float*>(static_cast<T*>(p.y) + r * cols) : scratch.get();
        FwdRow<T> a = make_row<T>(p, r, buf);
        if (prefetch && r + 1 < r1) {
          a.pf_x = a.x + cols;
          a.pf_y = a.y + cols;
        }
        if (fused) {
          // Plain softmax rows: pass 3 of row r also computes pass 1 of row r + 1.
          const float m = have_next ? next_max : part_max(a, 0, cols);
          const float s = part_sum(a, 0, cols, m);
          have_next = m != -kInf && r + 1 < r1;
          if (have_next) {
            next_max = scale_out_max(a, cols, 1.f / s, a.x + cols) * a.scale;
          } else {
            part_out(a, 0, cols, m, s);
          }
          continue;
        }
        fwd_row(a);
      }
    });
    return;
  }
  // Split path: three parallel sweeps over (row, block) items with per-item partials.
  const int64_t items = rows * nb;
  std::unique_ptr<float[]> scratch(kF32 ? nullptr : new float[rows * cols]);
  std::unique_ptr<float[]> pmax(new float[items]), psum(new float[items]);
  auto row_of = [&](int64_t it) {
    const int64_t r = it / nb;
    float* buf =
        kF32 ? reinterpret_cast<float*>(static_cast<T*>(p.y) + r * cols) : scratch.get() + r * cols;
    return make_row<T>(p, r, buf);
  };
  auto row_max = [&](int64_t r) {
    float m = -kInf;
    for (int64_t k = 0; k < nb; ++k) m = max_nan(m, pmax[r * nb + k]);
    return m;
  };
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      FwdRow<T> a = row_of(it);
      int64_t b, e;
      block_range(cols, nb, it % nb, b, e);
      pmax[it] = part_max(a, b, std::min(e, a.valid));
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      FwdRow<T> a = row_of(it);
      int64_t b, e;
      block_range(cols, nb, it % nb, b, e);
      psum[it] = part_sum(a, b, std::min(e, a.valid), row_max(it / nb));
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      FwdRow<T> a = row_of(it);
      const int64_t r = it / nb;
      float s = 0.f;
      for (int64_t k = 0; k < nb; ++k) s += psum[r * nb + k];
      int64_t b, e;
      block_range(cols, nb, it % nb, b, e);
      part_out(a, b, std::min(e, a.valid), row_max(r), s);
      part_tail(a, b, e);
    }
  });
}

// ------------------------------------------------------------------ forward, fp64 data

void fwd_f64(const SoftmaxFwdParams& p) {
  const int64_t cols = p.cols;
  const double scale = p.scale;
  constexpr double inf = std::numeric_limits<double>::infinity();
  at::parallel_for(0, p.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* x = static_cast<const double*>(p.x) + r * cols;
      double* y = static_cast<double*>(p.y) + r * cols;
      int64_t valid = p.causal ? std::min<int64_t>(cols, r % p.causal_rows + 1) : cols;
      const char* mrow = nullptr;
      if (p.mask.ptr != nullptr) {
        mrow =
            static_cast<const char*>(p.mask.ptr) + p.mask.row_offsets[r] * dtype_size(p.mask.dtype);
      }
      const int64_t ms = p.mask.col_stride;
      // z into y, then max.
      double m = -inf;
      for (int64_t j = 0; j < valid; ++j) {
        double z = scale * x[j];
        if (mrow != nullptr) {
          if (p.mask.dtype == DType::Bool) {
            if (reinterpret_cast<const uint8_t*>(mrow)[j * ms] != 0) z = -inf;
          } else if (p.mask.dtype == DType::F32) {
            z += reinterpret_cast<const float*>(mrow)[j * ms];
          } else {
            z += reinterpret_cast<const double*>(mrow)[j * ms];
          }
        }
        y[j] = z;
        m = (std::isnan(z) || z > m) ? z : m;
      }
      double s = 0.0;
      if (m == -inf) {
        for (int64_t j = 0; j < valid; ++j) s += std::isnan(y[j]) ? y[j] : 0.0;
        const bool zero_empty = p.mask.ptr != nullptr || p.causal;
        const double v = std::isnan(s) || !zero_empty ? std::nan("") : (p.log ? -inf : 0.0);
        std::fill(y, y + valid, v);
      } else if (p.log) {
        for (int64_t j = 0; j < valid; ++j) s += std::exp(y[j] - m);
        const double shift = m + std::log(s);
        for (int64_t j = 0; j < valid; ++j) y[j] -= shift;
      } else {
        for (int64_t j = 0; j < valid; ++j) {
          y[j] = std::exp(y[j] - m);
          s += y[j];
        }
        const double inv = 1.0 / s;
        for (int64_t j = 0; j < valid; ++j) y[j] *= inv;
      }
      std::fill(y + valid, y + cols, p.log ? -inf : 0.0);
    }
  });
}

// ------------------------------------------------------------------ backward

template <class T>
struct BwdRow {
  const T* y;
  const T* dy;
  T* dx;
  float scale;
  bool log;
  bool prefetch = false;  // prefetch the next row of y, dy, dx during the apply pass
  bool stream = false;    // fp32: write dx with non-temporal stores (16-element groups aligned)
};

// Reduction over one chunk [b, e): sum dy*y (softmax) or sum dy (log).
template <class T>
float bwd_dot_chunk(const BwdRow<T>& a, int64_t b, int64_t e) {
  Vf s0 = vset(0.f), s1 = s0;
  int64_t j = b;
  if (a.log) {
    for (; j + 2 * kW <= e; j += 2 * kW) {
      s0 = vadd(s0, load(a.dy + j));
      s1 = vadd(s1, load(a.dy + j + kW));
    }
    if (j + kW <= e) {
      s0 = vadd(s0, load(a.dy + j));
      j += kW;
    }
    if (j < e) s1 = vadd(s1, load_n(a.dy + j, e - j, 0.f));
  } else {
    for (; j + 2 * kW <= e; j += 2 * kW) {
      s0 = vfma(load(a.dy + j), load(a.y + j), s0);
      s1 = vfma(load(a.dy + j + kW), load(a.y + j + kW), s1);
    }
    if (j + kW <= e) {
      s0 = vfma(load(a.dy + j), load(a.y + j), s0);
      j += kW;
    }
    if (j < e) s1 = vfma(load_n(a.dy + j, e - j, 0.f), load_n(a.y + j, e - j, 0.f), s1);
  }
  return hsum(vadd(s0, s1));
}

// Partial reduction over [b, e): fp32 chunk sums added in double.
template <class T>
float bwd_part_dot(const BwdRow<T>& a, int64_t b, int64_t e) {
  double total = 0.0;
  for (int64_t c = b; c < e; c += kSumChunk)
    total += bwd_dot_chunk(a, c, std::min(e, c + kSumChunk));
  return static_cast<float>(total);
}

template <class T>
inline Vf bwd_value(const BwdRow<T>& a, Vf y, Vf dy, Vf sc, Vf d, Vf negd) {
  // softmax: scale * y * (dy - d);  log: scale * (dy - exp(y) * d)
  return a.log ? vmul(sc, vfma(exp_neg<kBwdExpDeg<T>>(y), negd, dy))
               : vmul(sc, vmul(y, vsub(dy, d)));
}

template <class T>
void bwd_part_apply(const BwdRow<T>& a, int64_t b, int64_t e, float d) {
  const T* y = a.y;
  const T* dy = a.dy;
  T* dx = a.dx;
  const int64_t next = a.prefetch ? e - b : 0;  // distance to the next row (contiguous rows)
  const Vf sc = vset(a.scale), vd = vset(d), negd = vset(-d);
  int64_t j = b;
  if constexpr (std::is_same_v<T, float>) {
    if (a.stream) {
      for (; j + 2 * kW <= e; j += 2 * kW) {
        if (next != 0) {
          __builtin_prefetch(y + j + next);
          __builtin_prefetch(dy + j + next);
        }
        stream2(dx + j, bwd_value(a, load(y + j), load(dy + j), sc, vd, negd),
                bwd_value(a, load(y + j + kW), load(dy + j + kW), sc, vd, negd));
      }
    }
  }
  for (; j + 2 * kW <= e; j += 2 * kW) {
    if (next != 0) {
      __builtin_prefetch(y + j + next);
      __builtin_prefetch(dy + j + next);
      __builtin_prefetch(dx + j + next, 1);
    }
    store2(dx + j, bwd_value(a, load(y + j), load(dy + j), sc, vd, negd),
           bwd_value(a, load(y + j + kW), load(dy + j + kW), sc, vd, negd));
  }
  for (; j < e; j += kW) {
    const int64_t n = std::min<int64_t>(kW, e - j);
    store_n(dx + j, bwd_value(a, load_n(y + j, n, 0.f), load_n(dy + j, n, 0.f), sc, vd, negd), n);
  }
}

template <class T>
void bwd_typed(const SoftmaxBwdParams& p) {
  const int64_t rows = p.rows, cols = p.cols;
  auto row = [&](int64_t r) {
    return BwdRow<T>{static_cast<const T*>(p.y) + r * cols, static_cast<const T*>(p.dy) + r * cols,
                     static_cast<T*>(p.dx) + r * cols, static_cast<float>(p.scale), p.log};
  };
  const int64_t nb = blocks_per_row(rows, cols);
  if (nb == 1) {
    const bool prefetch = cols * static_cast<int64_t>(sizeof(T)) <= 32 * 1024;
    // dx larger than half the last-level cache (with y and dy the working set cannot stay
    // cached anyway): non-temporal stores save the read-for-ownership of every dx line.
    const bool stream = kHasStream && std::is_same_v<T, float> && cols % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(p.dx) % 32 == 0 &&
                        rows * cols * static_cast<int64_t>(sizeof(T)) >= (int64_t{16} << 20);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        BwdRow<T> a = row(r);
        a.prefetch = prefetch && r + 1 < r1;
        a.stream = stream;
        bwd_part_apply(a, 0, cols, bwd_part_dot(a, 0, cols));
      }
      if (stream) store_fence();
    });
    return;
  }
  const int64_t items = rows * nb;
  std::unique_ptr<float[]> pd(new float[items]);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t b, e;
      block_range(cols, nb, it % nb, b, e);
      pd[it] = bwd_part_dot(row(it / nb), b, e);
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / nb;
      float d = 0.f;
      for (int64_t k = 0; k < nb; ++k) d += pd[r * nb + k];
      int64_t b, e;
      block_range(cols, nb, it % nb, b, e);
      bwd_part_apply(row(r), b, e, d);
    }
  });
}

void bwd_f64(const SoftmaxBwdParams& p) {
  const int64_t cols = p.cols;
  const double scale = p.scale;
  at::parallel_for(0, p.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* y = static_cast<const double*>(p.y) + r * cols;
      const double* dy = static_cast<const double*>(p.dy) + r * cols;
      double* dx = static_cast<double*>(p.dx) + r * cols;
      double d = 0.0;
      if (p.log) {
        for (int64_t j = 0; j < cols; ++j) d += dy[j];
        for (int64_t j = 0; j < cols; ++j) dx[j] = scale * (dy[j] - std::exp(y[j]) * d);
      } else {
        for (int64_t j = 0; j < cols; ++j) d += dy[j] * y[j];
        for (int64_t j = 0; j < cols; ++j) dx[j] = scale * y[j] * (dy[j] - d);
      }
    }
  });
}

}  // namespace

void softmax_fwd(const SoftmaxFwdParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  switch (p.dtype) {
    case DType::F32:
      return fwd_typed<float>(p);
    case DType::BF16:
      return fwd_typed<BFloat16>(p);
    case DType::F16:
      return fwd_typed<Half>(p);
    case DType::F64:
      return fwd_f64(p);
    case DType::Bool:
      break;
  }
}

void softmax_bwd(const SoftmaxBwdParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  switch (p.dtype) {
    case DType::F32:
      return bwd_typed<float>(p);
    case DType::BF16:
      return bwd_typed<BFloat16>(p);
    case DType::F16:
      return bwd_typed<Half>(p);
    case DType::F64:
      return bwd_f64(p);
    case DType::Bool:
      break;
  }
}

}  // namespace lmk::cpu::CPU_CAPABILITY
