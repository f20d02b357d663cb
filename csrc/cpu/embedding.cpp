// Embedding lookup and its deterministic weight gradient on CPU (contract: lmk/embedding.h).
// Compiled twice, like every csrc/cpu file (vec.h: AVX2 or portable).
//
// Forward: check every index (one pass over idx), then copy rows, parallel over tokens.
// Backward: a counting sort of the tokens by row (CSR: start[v] .. start[v + 1] lists the
// tokens of row v in increasing t), then rows in parallel: each row's tokens are added in
// that order in fp32 (fp64 for fp64), scaled, rounded once and stored; runs of rows that get
// no gradient are zeroed with one fill each. Every dw row is written exactly once, so the
// traffic is one write of dw plus one read of dy; the order of additions depends only on idx.
// Outputs of 16 MiB or more are written with non-temporal stores.
//
// Fused token + positional forward: the same gather, parallel over tokens, adding the positional
// row (a second gathered row, or the sinusoid computed in registers: 8 f64 angles give 16 output
// columns, Sinusoid below) before the single rounding and store.
#include "lmk/embedding.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace lmk::cpu::CPU_CAPABILITY {
namespace {

#include "vec.h"

template <class I>
int64_t first_bad(const I* idx, int64_t n, int64_t rows) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t v = static_cast<int64_t>(idx[t]);
    if (v < 0 || v >= rows) return t;
  }
  return -1;
}

// Whether an output of `bytes` at `out`, written in rows of row_bytes, takes non-temporal stores:
// 16 MiB or more (it would not stay cached anyway; skipping the read-for-ownership saves a
// third of the traffic) and every row 32-byte aligned.
inline bool stream_out(const void* out, int64_t row_bytes, int64_t bytes) {
  return kHasStream && reinterpret_cast<uintptr_t>(out) % 32 == 0 && row_bytes % 32 == 0 &&
         bytes >= (int64_t{16} << 20);
}

template <class I>
int64_t fwd_typed(const EmbeddingFwdParams& p) {
  const I* idx = static_cast<const I*>(p.idx);
  const int64_t bad = first_bad(idx, p.n, p.num_embeddings);
  if (bad >= 0) return bad;
  const int64_t row_bytes = p.dim * dtype_size(p.dtype);
  const int64_t stride_bytes = p.weight_stride * dtype_size(p.dtype);
  const char* w = static_cast<const char*>(p.weight);
  char* out = static_cast<char*>(p.out);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
  const bool stream = stream_out(out, row_bytes, p.n * row_bytes);
  at::parallel_for(0, p.n, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const char* src = w + static_cast<int64_t>(idx[t]) * stride_bytes;
      if (t + 1 < t1 && row_bytes <= 16384) {  // the next row is a random one: fetch it ahead
        const char* next = w + static_cast<int64_t>(idx[t + 1]) * stride_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(next + b);
      }
      if (stream) {
        copy_stream(out + t * row_bytes, src, row_bytes);
      } else {
        std::memcpy(out + t * row_bytes, src, row_bytes);
      }
    }
    if (stream) store_fence();
  });
  return -1;
}

// ------------------------------------------------------------------ token + positional

#if defined(CPU_CAPABILITY_AVX2)
// sinusoid_pair (lmk/embedding.h) for 8 column pairs: the angles pos * inv_freq[i .. i + 8) in
// f64 (two vectors of 4), reduced in f64; sine and cosine polynomials on the 8 reduced angles in
// f32, swapped and negated per quadrant, then interleaved into the 16 output columns
// (sin, cos of pair i, sin, cos of pair i + 1, ...): lo holds pairs i .. i + 4, hi the rest.
struct Sinusoid {
  __m256d pos;             // the row's position in every lane
  const double* inv_freq;  // the frequencies, one per column pair

  void operator()(int64_t pair, Vf& lo, Vf& hi) const {
    __m256d k[2];
    __m128 r4[2];
    for (int h = 0; h < 2; ++h) {
      const __m256d angle = _mm256_mul_pd(pos, _mm256_loadu_pd(inv_freq + pair + 4 * h));
      k[h] = _mm256_round_pd(_mm256_mul_pd(angle, _mm256_set1_pd(0.63661977236758134308)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256d r = _mm256_fnmadd_pd(k[h], _mm256_set1_pd(1.57079632679489655800e+00), angle);
      r4[h] =
          _mm256_cvtpd_ps(_mm256_fnmadd_pd(k[h], _mm256_set1_pd(6.12323399573676603587e-17), r));
    }
    const __m256 r = _mm256_set_m128(r4[1], r4[0]);
    const __m256i q = _mm256_set_m128i(_mm256_cvtpd_epi32(k[1]), _mm256_cvtpd_epi32(k[0]));
    const __m256 r2 = _mm256_mul_ps(r, r);
    __m256 sp =
        _mm256_fmadd_ps(r2, _mm256_set1_ps(-1.9515295891e-4f), _mm256_set1_ps(8.3321608736e-3f));
    sp = _mm256_fmadd_ps(r2, sp, _mm256_set1_ps(-1.6666654611e-1f));
    sp = _mm256_fmadd_ps(_mm256_mul_ps(r, r2), sp, r);
    __m256 cp = _mm256_fmadd_ps(r2, _mm256_set1_ps(2.443315711809948e-5f),
                                _mm256_set1_ps(-1.388731625493765e-3f));
    cp = _mm256_fmadd_ps(r2, cp, _mm256_set1_ps(4.166664568298827e-2f));
    cp = _mm256_fmadd_ps(_mm256_mul_ps(r2, r2), cp,
                         _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), r2, _mm256_set1_ps(1.0f)));
    // odd quadrants swap sine and cosine; sin is negated in quadrants 2, 3, cos in 1, 2
    const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));
    auto sign_of = [](__m256i v) {  // bit 1 of v in the sign bit
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(v, 1), 31));
    };
    const __m256 s = _mm256_xor_ps(_mm256_blendv_ps(sp, cp, odd), sign_of(q));
    const __m256 c = _mm256_xor_ps(_mm256_blendv_ps(cp, sp, odd),
                                   sign_of(_mm256_add_epi32(q, _mm256_set1_epi32(1))));
    const __m256 u0 = _mm256_unpacklo_ps(s, c), u1 = _mm256_unpackhi_ps(s, c);
    lo = {_mm256_permute2f128_ps(u0, u1, 0x20)};
    hi = {_mm256_permute2f128_ps(u0, u1, 0x31)};
  }
};
constexpr bool kVectorSinusoid = true;
#else
struct Sinusoid {
  void operator()(int64_t, Vf&, Vf&) const {}  // unused: without AVX2 the sinusoid is scalar
};
constexpr bool kVectorSinusoid = false;
#endif

// One output row: dst = round(scale * tok + pe) in A, pe the row prow (learned) or, when prow is
// null, the sinusoid of position `pos`. 16 columns per step (stored with stream2 when kStream:
// dst 32-byte aligned, d % 16 == 0), then the learned row's last columns as vectors, the
// sinusoid's one by one.
template <bool kStream, class T>
void tp_row(const T* tok, const T* prow, int64_t pos, const double* inv_freq, double scale,
            int64_t d, T* dst) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, double>) {  // f64: scalar, sin and cos in f64
    for (; j < d; ++j) {
      double pe;
      if (prow != nullptr) {
        pe = prow[j];
      } else {
        const double angle = static_cast<double>(pos) * inv_freq[j / 2];
        pe = (j & 1) ? std::cos(angle) : std::sin(angle);
      }
      dst[j] = scale * tok[j] + pe;
    }
  } else {
    const float sf = static_cast<float>(scale);
    const Vf vs = vset(sf);
    auto put = [&](int64_t at, Vf y0, Vf y1) {
      y0 = vfma(vs, load(tok + at), y0);
      y1 = vfma(vs, load(tok + at + kW), y1);
      if constexpr (kStream) {
        stream2(dst + at, y0, y1);
      } else {
        store2(dst + at, y0, y1);
      }
    };
    if (prow != nullptr) {
      for (; j + 2 * kW <= d; j += 2 * kW) put(j, load(prow + j), load(prow + j + kW));
      for (; j < d; j += kW) {
        const int64_t k = std::min<int64_t>(kW, d - j);
        store_n(dst + j, vfma(vs, load_n(tok + j, k, 0.f), load_n(prow + j, k, 0.f)), k);
      }
      return;
    }
    if constexpr (kVectorSinusoid) {
      Sinusoid sin16{};
#if defined(CPU_CAPABILITY_AVX2)
      sin16 = {_mm256_set1_pd(static_cast<double>(pos)), inv_freq};
#endif
      for (; j + 2 * kW <= d; j += 2 * kW) {
        Vf lo, hi;
        sin16(j / 2, lo, hi);
        put(j, lo, hi);
      }
    }
    for (; j < d; ++j) {
      const SinCos sc = sinusoid_pair(static_cast<double>(pos) * inv_freq[j / 2]);
      const float pe = (j & 1) ? sc.c : sc.s;
      dst[j] = static_cast<T>(std::fma(sf, static_cast<float>(tok[j]), pe));
    }
  }
}

template <class T, class I>
int64_t tp_fwd_typed(const TokenPosFwdParams& p) {
  const I* ids = static_cast<const I*>(p.ids);
  const I* pos = static_cast<const I*>(p.pos);
  int64_t bad = first_bad(ids, p.n, p.num_embeddings);
  if (bad >= 0) return bad;
  bad = first_bad(pos, p.n, p.num_positions);
  if (bad >= 0) return p.n + bad;
  const int64_t d = p.dim;
  const T* tok = static_cast<const T*>(p.tok_weight);
  const T* posw = static_cast<const T*>(p.pos_weight);
  T* out = static_cast<T*>(p.out);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const bool stream =
      !std::is_same_v<T, double> && d % 16 == 0 && stream_out(out, row_bytes, p.n * row_bytes);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, p.n, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* src = tok + static_cast<int64_t>(ids[t]) * p.tok_stride;
      if (t + 1 < t1 && row_bytes <= 16384) {  // the next token's row is a random one
        const char* next = reinterpret_cast<const char*>(tok + ids[t + 1] * p.tok_stride);
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(next + b);
      }
      const int64_t q = static_cast<int64_t>(pos[t]);
      const T* prow = posw == nullptr ? nullptr : posw + q * p.pos_stride;
      if (stream) {
        tp_row<true>(src, prow, q, p.inv_freq, p.scale, d, out + t * d);
      } else {
        tp_row<false>(src, prow, q, p.inv_freq, p.scale, d, out + t * d);
      }
    }
    if (stream) store_fence();
  });
  return -1;
}

template <class I>
int64_t tp_fwd_index(const TokenPosFwdParams& p) {
  switch (p.dtype) {
    case DType::F32:
      return tp_fwd_typed<float, I>(p);
    case DType::F16:
      return tp_fwd_typed<Half, I>(p);
    case DType::BF16:
      return tp_fwd_typed<BFloat16, I>(p);
    case DType::F64:
      return tp_fwd_typed<double, I>(p);
    case DType::Bool:
      break;
  }
  return -1;
}

// ------------------------------------------------------------------ embedding backward

// dst = scale * (the sum of the dy rows of tokens order[s0 .. s1), added in that order), in fp32
// vectors (fp64 scalars for fp64), rounded once to T.
template <bool kStream, class T>
void sum_rows(const T* dy, const int64_t* order, int64_t s0, int64_t s1, int64_t d, double scale,
              T* dst) {
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t j = 0; j < d; ++j) {
      double acc = dy[order[s0] * d + j];
      for (int64_t s = s0 + 1; s < s1; ++s) acc += dy[order[s] * d + j];
      dst[j] = scale == 1.0 ? acc : acc * scale;
    }
  } else if constexpr (kStream) {  // d % 16 == 0, dst 32-byte aligned (stream_out)
    const Vf vs = vset(static_cast<float>(scale));
    for (int64_t j = 0; j < d; j += 2 * kW) {
      Vf a0 = load(dy + order[s0] * d + j), a1 = load(dy + order[s0] * d + j + kW);
      for (int64_t s = s0 + 1; s < s1; ++s) {
        a0 = vadd(a0, load(dy + order[s] * d + j));
        a1 = vadd(a1, load(dy + order[s] * d + j + kW));
      }
      if (scale != 1.0) {
        a0 = vmul(a0, vs);
        a1 = vmul(a1, vs);
      }
      stream2(dst + j, a0, a1);
    }
  } else {
    const Vf vs = vset(static_cast<float>(scale));
    for (int64_t j = 0; j < d; j += kW) {
      const int64_t k = std::min<int64_t>(kW, d - j);
      auto ld = [&](int64_t t) {
        const T* src = dy + t * d + j;
        return k == kW ? load(src) : load_n(src, k, 0.f);
      };
      Vf acc = ld(order[s0]);
      for (int64_t s = s0 + 1; s < s1; ++s) acc = vadd(acc, ld(order[s]));
      if (scale != 1.0) acc = vmul(acc, vs);
      if (k == kW) {
        store(dst + j, acc);
      } else {
        store_n(dst + j, acc, k);
      }
    }
  }
}

template <class T, class I>
void bwd_typed(const EmbeddingBwdParams& p) {
  const int64_t rows = p.num_embeddings, n = p.n, d = p.dim;
  const I* idx = static_cast<const I*>(p.idx);
  // CSR of the tokens per row, stable in t
  std::vector<int64_t> start(rows + 1, 0), order(n);
  for (int64_t t = 0; t < n; ++t) ++start[static_cast<int64_t>(idx[t]) + 1];
  for (int64_t v = 0; v < rows; ++v) start[v + 1] += start[v];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < n; ++t) order[next[static_cast<int64_t>(idx[t])]++] = t;
  }
  const T* dy = static_cast<const T*>(p.dy);
  T* dw = static_cast<T*>(p.dw);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const bool stream =
      !std::is_same_v<T, double> && d % 16 == 0 && stream_out(dw, row_bytes, rows * row_bytes);
  at::parallel_for(0, rows, grain, [&](int64_t v0, int64_t v1) {
    int64_t zeros_from = v0;  // start of the pending run of rows without gradient
    auto flush = [&](int64_t v) {
      if (v > zeros_from) {
        if (stream) {
          zero_stream(dw + zeros_from * d, (v - zeros_from) * row_bytes);
        } else {
          std::memset(dw + zeros_from * d, 0, static_cast<size_t>((v - zeros_from) * row_bytes));
        }
      }
    };
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t s0 = start[v], s1 = start[v + 1];
      if (s0 == s1 || v == p.padding_idx) continue;
      flush(v);
      zeros_from = v + 1;
      // (1 / count rounded to fp32 for fp32 math, as torch scales)
      double scale = p.scale_grad_by_freq ? 1.0 / static_cast<double>(s1 - s0) : p.grad_scale;
      if constexpr (!std::is_same_v<T, double>) scale = static_cast<float>(scale);
      if (stream) {
        sum_rows<true>(dy, order.data(), s0, s1, d, scale, dw + v * d);
      } else {
        sum_rows<false>(dy, order.data(), s0, s1, d, scale, dw + v * d);
      }
    }
    flush(v1);
    if (stream) store_fence();
  });
}

template <class I>
void bwd_index(const EmbeddingBwdParams& p) {
  switch (p.dtype) {
    case DType::F32:
      return bwd_typed<float, I>(p);
    case DType::F16:
      return bwd_typed<Half, I>(p);
    case DType::BF16:
      return bwd_typed<BFloat16, I>(p);
    case DType::F64:
      return bwd_typed<double, I>(p);
    case DType::Bool:
      break;
  }
}

}  // namespace

int64_t embedding_fwd(const EmbeddingFwdParams& p) {
  if (p.n <= 0) return -1;
  return p.idx64 ? fwd_typed<int64_t>(p) : fwd_typed<int32_t>(p);
}

int64_t token_pos_fwd(const TokenPosFwdParams& p) {
  if (p.n <= 0) return -1;
  return p.ids64 ? tp_fwd_index<int64_t>(p) : tp_fwd_index<int32_t>(p);
}

void embedding_bwd(const EmbeddingBwdParams& p) {
  if (p.num_embeddings <= 0 || p.dim <= 0) return;
  if (p.idx64) {
    bwd_index<int64_t>(p);
  } else {
    bwd_index<int32_t>(p);
  }
}

}  // namespace lmk::cpu::CPU_CAPABILITY
