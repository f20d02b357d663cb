// LayerNorm / RMSNorm (with an optional fused residual add) forward and backward on CPU
// (contract: lmk/norm.h). Compiled twice, like every csrc/cpu file (vec.h: AVX2 or portable).
//
// Forward, per row (T data, S stream type, fp32 math; fp64 data runs a scalar double twin):
//   A. h = x (+ residual, rounded to S and stored); sum h (layer) or sum h^2 (rms)
//   B. layer only: sum (h - mean)^2 over the row again (two-pass variance: exact enough for
//      rows with a large mean, which a one-pass sum of squares is not)
//   C. y = (h - mean) * rstd * w + b, rounded once to T
// Passes B and C re-read h from L1/L2 (a row of 64K fp32 is 256 KiB), so memory traffic is one
// read of x (and residual), one write of y (and h). Sums use 4 fp32 vector accumulators per
// chunk of kChunk columns and add the chunk sums in double.
//
// Backward, per row (xhat = (h - mean) * rstd, g = dy * w):
//   1. c1 = sum g (layer), c2 = sum g * xhat; the row's dy * xhat and dy are added to its
//      block's dw / db partial rows
//   2. dh = rstd * (g - c1 / n - xhat * c2 / n) (+ dh_out), stored in S
// Work is split into blocks of kNormRowsPerBlock rows (one at::parallel_for item each); each
// block owns one fp32 partial row of dw and of db, and a final column-parallel pass adds the
// partials in block order. The partition depends only on rows, so dw / db are bitwise
// identical for any thread count. Traffic: read dy and h once (pass 2 hits cache), write dh,
// plus 2 * rows / 64 partial rows (~1.5% extra at 4 bytes per element). Outputs (y, dh) of
// 16 MiB or more are written with non-temporal stores (no read-for-ownership).
//
// Special values: NaN/inf in a row propagate to that row only (and into the dw/db columns it
// touches, as in torch). eps is used as given.
#include "lmk/norm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace lmk::cpu::CPU_CAPABILITY {
namespace {

#include "vec.h"

// kChunk and row_sum (fp32 vector sums per chunk, chunk sums added in double): vec.h.

// Sums of d and of its square over the row in one pass, with the chunking of row_sum: pair(j,
// d0, d1) gives d at the 16 columns from j (in any order: only sums are taken), d_at(j, k) at
// the k < 16 columns of a chunk's tail (lanes beyond k must be 0).
template <class P, class F>
void row_sum2(int64_t n, P pair, F d_at, double& sum, double& sum_sq) {
  sum = sum_sq = 0.0;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    // 4 independent accumulators of each kind: the adds and FMAs have 3-4 cycles of latency
    Vf a0 = vset(0.f), a1 = a0, a2 = a0, a3 = a0, q0 = a0, q1 = a0, q2 = a0, q3 = a0;
    int64_t j = c;
    for (; j + 4 * kW <= e; j += 4 * kW) {
      Vf d0, d1, d2, d3;
      pair(j, d0, d1);
      pair(j + 2 * kW, d2, d3);
      a0 = vadd(a0, d0);
      a1 = vadd(a1, d1);
      a2 = vadd(a2, d2);
      a3 = vadd(a3, d3);
      q0 = vfma(d0, d0, q0);
      q1 = vfma(d1, d1, q1);
      q2 = vfma(d2, d2, q2);
      q3 = vfma(d3, d3, q3);
    }
    if (j + 2 * kW <= e) {
      Vf d0, d1;
      pair(j, d0, d1);
      a0 = vadd(a0, d0);
      a1 = vadd(a1, d1);
      q0 = vfma(d0, d0, q0);
      q1 = vfma(d1, d1, q1);
      j += 2 * kW;
    }
    for (; j < e; j += kW) {
      const Vf d = d_at(j, std::min<int64_t>(kW, e - j));
      a2 = vadd(a2, d);
      q2 = vfma(d, d, q2);
    }
    sum += hsum(vadd(vadd(a0, a1), vadd(a2, a3)));
    sum_sq += hsum(vadd(vadd(q0, q1), vadd(q2, q3)));
  }
}

// Software prefetch of the next row while this one is in its (cache-bound) last pass, so the
// memory traffic of row r + 1 overlaps the arithmetic of row r: at(j), called once per 16
// columns j of that pass, touches the next row's streams at the same relative position.
// Without a next row (or for long rows) the pointers are the current row's: harmless hits.
struct NextRow {
  const char* read[2];      // read streams (x, residual / dy, h)
  char* write;              // one write stream (y / dh)
  int64_t rsize[2], wsize;  // element sizes
  inline void at(int64_t j) const {
    __builtin_prefetch(read[0] + j * rsize[0]);
    __builtin_prefetch(read[1] + j * rsize[1]);
    __builtin_prefetch(write + j * wsize, 1);
  }
};

// Rows up to this many bytes prefetch their successor (both then fit in L2 comfortably).
constexpr int64_t kPrefetchRowBytes = 64 * 1024;

// Whether a (rows, n) output of elem-byte elements is written with non-temporal stores: it is
// at least 16 MiB (it would not stay cached for the next op anyway, and skipping the
// read-for-ownership saves a third of the traffic), and every row starts 32-byte aligned and
// holds whole 16-element groups.
inline bool stream_rows(const void* out, int64_t rows, int64_t n, int64_t elem) {
  return kHasStream && reinterpret_cast<uintptr_t>(out) % 32 == 0 && n % 16 == 0 &&
         (n * elem) % 32 == 0 && rows * n * elem >= (int64_t{16} << 20);
}

template <class T>
inline Vf load_k(const T* p, int64_t k) {
  return k == kW ? load(p) : load_n(p, k, 0.f);
}
template <class T>
inline void store_k(T* p, Vf v, int64_t k) {
  if (k == kW) {
    store(p, v);
  } else {
    store_n(p, v, k);
  }
}

// Calls f(j, k) for the 8-column steps j of [0, n): k = kW for every full step, then once with
// the tail's count (the full-step loop then holds no tail code).
template <class F>
inline void for_cols(int64_t n, F f) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) f(j, kW);
  if (j < n) f(j, n - j);
}

// for_cols that also calls next.at(j) once per 16 columns (one cache line of fp32).
template <class F>
inline void for_cols_prefetch(int64_t n, const NextRow& next, F f) {
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    next.at(j);
    f(j, kW);
    f(j + kW, kW);
  }
  for (; j + kW <= n; j += kW) f(j, kW);
  if (j < n) f(j, n - j);
}

// ------------------------------------------------------------------ forward

// Rows [r0, r1). w, b: the weight and bias (or null), in the pair order of T where kPair (h and
// y then move as pairs of 16 elements: load_pair / store_pair).
template <class T, class S, bool kRes, bool kRms, bool kHasW, bool kHasB>
void fwd_rows(const NormFwdParams& p, const float* w, const float* b, int64_t r0, int64_t r1) {
  constexpr bool kPair = std::is_same_v<S, T>;
  const int64_t n = p.cols;
  const bool prefetch = n * static_cast<int64_t>(sizeof(S)) <= kPrefetchRowBytes;
  const bool stream = stream_rows(p.y, p.rows, n, sizeof(T));
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * n;
    T* y = static_cast<T*>(p.y) + r * n;
    const int64_t ahead = prefetch && r + 1 < r1 ? n : 0;  // elements to the prefetched row
    const char* xn = reinterpret_cast<const char*>(x + ahead);
    const char* rn = kRes ? static_cast<const char*>(p.residual) + (r * n + ahead) * sizeof(S) : xn;
    const NextRow next{
        {xn, rn}, reinterpret_cast<char*>(y + ahead), {sizeof(T), sizeof(S)}, sizeof(T)};
    // The normalised values h: x itself, or x + residual as stored in S.
    const S* h;
    if constexpr (kRes) {
      const S* res = static_cast<const S*>(p.residual) + r * n;
      S* hw = static_cast<S*>(p.h) + r * n;
      for_cols(n, [&](int64_t j, int64_t k) {
        store_k(hw + j, vadd(load_k(x + j, k), load_k(res + j, k)), k);
      });
      h = hw;
    } else {
      h = reinterpret_cast<const S*>(x);
    }
    // mean = m + lo exactly enough (m: the nearest float, lo: the rest), so rows whose mean is
    // large against their spread keep every digit of h - mean: (h - m) is exact there.
    float m = 0.f, lo = 0.f, rstd;
    if constexpr (kRms) {
      const double ss = row_sum(n, [&](Vf acc, int64_t j, int64_t k) {
        Vf v = load_k(h + j, k);
        return vfma(v, v, acc);
      });
      rstd = static_cast<float>(1.0 / std::sqrt(ss / n + p.eps));
    } else {
      // Sums of d = h - h_0: the shift keeps fp32 partial sums small for rows with a large mean.
      const float h0 = static_cast<float>(h[0]);
      const Vf s0 = vset(h0);
      auto d_at = [&](int64_t j, int64_t k) {
        const Vf d = vsub(load_k(h + j, k), s0);
        return k == kW ? d : keep_first(d, k, 0.f);
      };
      double mean, var = -1.0;
      if constexpr (sizeof(S) == 2) {
        // 16-bit data: one pass, var = E[d^2] - E[d]^2. Its cancellation error is ~eps_fp32 *
        // (1 + (mean - h_0)^2 / var) relative; accepted while (mean - h_0)^2 <= 16 var (error
        // ~1e-6, far below a 16-bit ulp), else (h_0 an outlier) the two passes below.
        double s1, s2;
        auto pair = [&](int64_t j, Vf& d0, Vf& d1) {
          load_pair(h + j, d0, d1);
          d0 = vsub(d0, s0);
          d1 = vsub(d1, s0);
        };
        row_sum2(n, pair, d_at, s1, s2);
        const double dm = s1 / n;
        mean = h0 + dm;
        const double v = s2 / n - dm * dm;
        if (dm * dm <= 16.0 * v || (dm == 0.0 && v == 0.0)) var = v;
      } else {
        mean = h0 +
               row_sum(n, [&](Vf acc, int64_t j, int64_t k) { return vadd(acc, d_at(j, k)); }) / n;
      }
      m = static_cast<float>(mean);
      lo = static_cast<float>(mean - m);
      if (!(var >= 0.0)) {  // two-pass variance (also for NaN rows: it stays NaN)
        const Vf vm = vset(m);
        const double ss = row_sum(n, [&](Vf acc, int64_t j, int64_t k) {
          Vf d = vsub(load_k(h + j, k), vm);
          d = k == kW ? d : keep_first(d, k, 0.f);
          return vfma(d, d, acc);
        });
        // sum (h - m)^2 = sum (h - mean)^2 + n lo^2
        var = ss / n - double(lo) * lo;
        if (var < 0.0) var = 0.0;  // rounding; NaN (a NaN or inf in the row) stays NaN
      }
      rstd = static_cast<float>(1.0 / std::sqrt(var + p.eps));
      static_cast<float*>(p.mean)[r] = m;
    }
    static_cast<float*>(p.rstd)[r] = rstd;
    // (h - m) * rstd - lo * rstd, not h * rstd - mean * rstd, which loses |mean| / std digits
    const Vf a = vset(rstd), vm = vset(m), c = vset(-lo * rstd);
    auto out = [&](Vf v, int64_t j, int64_t k) {  // v: h at columns j.. (w / b order)
      v = vfma(vsub(v, vm), a, c);
      if constexpr (kHasW && kHasB) {
        v = vfma(v, load_k(w + j, k), load_k(b + j, k));
      } else if constexpr (kHasW) {
        v = vmul(v, load_k(w + j, k));
      } else if constexpr (kHasB) {
        v = vadd(v, load_k(b + j, k));
      }
      return v;
    };
    // Pairs of vectors: one pack (and for natural-order bf16 one lane permute) per 16 outputs.
    auto pass_c = [&](auto put) {
      int64_t j = 0;
      for (; j + 2 * kW <= n; j += 2 * kW) {
        next.at(j);
        Vf v0, v1;
        if constexpr (kPair) {
          load_pair(h + j, v0, v1);
        } else {
          v0 = load(h + j);
          v1 = load(h + j + kW);
        }
        put(y + j, out(v0, j, kW), out(v1, j + kW, kW));
      }
      for (; j < n; j += kW) {
        const int64_t k = std::min<int64_t>(kW, n - j);
        store_k(y + j, out(load_k(h + j, k), j, k), k);
      }
    };
    if (stream) {  // whole rows of 16-element, 32-byte aligned groups
      pass_c([](T* q, Vf v0, Vf v1) {
        if constexpr (kPair) {
          stream_pair(q, v0, v1);
        } else {
          stream2(q, v0, v1);
        }
      });
    } else {
      pass_c([](T* q, Vf v0, Vf v1) {
        if constexpr (kPair) {
          store_pair(q, v0, v1);
        } else {
          store2(q, v0, v1);
        }
      });
    }
  }
  if (stream) store_fence();
}

template <class T, class S, bool kRes, bool kRms>
void fwd_affine(const NormFwdParams& p) {
  const int64_t n = p.cols;
  const float* w = static_cast<const float*>(p.weight);
  const float* b = static_cast<const float*>(p.bias);
  std::unique_ptr<float[]> reordered;  // w and b in the pair order of T (see fwd_rows)
  if constexpr (std::is_same_v<S, T> && kPairPermuted<T>) {
    reordered.reset(new float[2 * n]);
    if (w != nullptr) w = (pair_order(w, reordered.get(), n), reordered.get());
    if (b != nullptr) b = (pair_order(b, reordered.get() + n, n), reordered.get() + n);
  }
  auto run = [&](auto fn) {
    at::parallel_for(0, p.rows, row_grain(n), [&](int64_t r0, int64_t r1) { fn(p, w, b, r0, r1); });
  };
  if (w && b) return run(fwd_rows<T, S, kRes, kRms, true, true>);
  if (w) return run(fwd_rows<T, S, kRes, kRms, true, false>);
  if (b) return run(fwd_rows<T, S, kRes, kRms, false, true>);
  return run(fwd_rows<T, S, kRes, kRms, false, false>);
}

template <class T, class S>
void fwd_typed(const NormFwdParams& p) {
  const bool res = p.residual != nullptr;
  if (res && p.rms) return fwd_affine<T, S, true, true>(p);
  if (res) return fwd_affine<T, S, true, false>(p);
  if (p.rms) return fwd_affine<T, T, false, true>(p);
  return fwd_affine<T, T, false, false>(p);
}

// fp64: the same algorithm in scalar double.
void fwd_f64(const NormFwdParams& p) {
  const int64_t n = p.cols;
  const double* w = static_cast<const double*>(p.weight);
  const double* b = static_cast<const double*>(p.bias);
  at::parallel_for(0, p.rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double* x = static_cast<const double*>(p.x) + r * n;
      double* y = static_cast<double*>(p.y) + r * n;
      const double* h = x;
      if (p.residual != nullptr) {
        const double* res = static_cast<const double*>(p.residual) + r * n;
        double* hw = static_cast<double*>(p.h) + r * n;
        for (int64_t j = 0; j < n; ++j) hw[j] = x[j] + res[j];
        h = hw;
      }
      double mean = 0.0, ss = 0.0;
      if (!p.rms) {
        for (int64_t j = 0; j < n; ++j) mean += h[j];
        mean /= n;
        static_cast<double*>(p.mean)[r] = mean;
      }
      for (int64_t j = 0; j < n; ++j) ss += (h[j] - mean) * (h[j] - mean);
      const double rstd = 1.0 / std::sqrt(ss / n + p.eps);
      static_cast<double*>(p.rstd)[r] = rstd;
      for (int64_t j = 0; j < n; ++j) {
        double v = (h[j] - mean) * rstd;
        if (w != nullptr) v *= w[j];
        if (b != nullptr) v += b[j];
        y[j] = v;
      }
    }
  });
}

// ------------------------------------------------------------------ backward

// One row of a backward block: its streams and statistics.
template <class T, class S>
struct BwdRow {
  const T* dy;
  const S* h;
  S* dh;
  float mean, rstd;
};

// One row's share of pass 1 at the k columns from j: s1 += g (layer), s2 += g * xhat, and
// (kParams) dw += dy * xhat, db += dy. Tails: load_k pads dy (so g) with 0, which zeroes every
// product.
template <bool kRms, bool kParams, class T, class S>
inline void bwd_step(const T* dy, const S* h, Vf m, Vf a, Vf w, int64_t k, Vf& s1, Vf& s2, Vf& dw,
                     Vf& db) {
  const Vf xh = vmul(vsub(load_k(h, k), m), a);
  const Vf d = load_k(dy, k), g = vmul(d, w);
  if constexpr (!kRms) s1 = vadd(s1, g);
  s2 = vfma(g, xh, s2);
  if constexpr (kParams) {
    dw = vfma(d, xh, dw);
    db = vadd(d, db);
  }
}

// Pass 1 over one row q0 or (kTwo) two rows q0, q1 at once: c1[i] = sum g (layer) and c2[i] =
// sum g * xhat of row i, and (kParams) the rows' shares added to the block's partial dw / db
// rows, q0's then q1's: the same additions in the same order as two one-row calls (bitwise the
// same partials), with one load and store of the partials per two rows.
template <bool kTwo, bool kRms, bool kParams, class T, class S>
void bwd_sums(const BwdRow<T, S>& q0, const BwdRow<T, S>& q1, const float* w, int64_t n, float* dwp,
              float* dbp, double* c1, double* c2) {
  // (locals, not the rows' fields: the compiler then keeps them in registers across the stores)
  const T *const dy0 = q0.dy, *const dy1 = q1.dy;
  const S *const h0 = q0.h, *const h1 = q1.h;
  const Vf a0 = vset(q0.rstd), m0 = vset(q0.mean), a1 = vset(q1.rstd), m1 = vset(q1.mean);
  c1[0] = c2[0] = c1[1] = c2[1] = 0.0;
  for (int64_t cb = 0; cb < n; cb += kChunk) {
    Vf s1a = vset(0.f), s2a = s1a, s1b = s1a, s2b = s1a;
    for_cols(std::min(kChunk, n - cb), [&](int64_t jj, int64_t k) {
      const int64_t j = cb + jj;
      const Vf wv = load_k(w + j, k);
      Vf dw = wv, db = wv;  // (unused without kParams)
      if constexpr (kParams) {
        dw = load_k(dwp + j, k);
        db = load_k(dbp + j, k);
      }
      bwd_step<kRms, kParams>(dy0 + j, h0 + j, m0, a0, wv, k, s1a, s2a, dw, db);
      if constexpr (kTwo) bwd_step<kRms, kParams>(dy1 + j, h1 + j, m1, a1, wv, k, s1b, s2b, dw, db);
      if constexpr (kParams) {
        store_k(dwp + j, dw, k);
        store_k(dbp + j, db, k);
      }
    });
    c1[0] += hsum(s1a);
    c2[0] += hsum(s2a);
    c1[1] += hsum(s1b);
    c2[1] += hsum(s2b);
  }
}

// Block [r0, r1) of rows; w: the weight (ones when there is none); kParams: accumulate the
// block's dw / db partial rows dwp / dbp (both, even if only one is asked for). Rows go in
// pairs through pass 1 (bwd_sums), then each through pass 2.
template <class T, class S, bool kRms, bool kParams, bool kDh>
void bwd_block(const NormBwdParams& p, const float* w, int64_t r0, int64_t r1, float* dwp,
               float* dbp) {
  const int64_t n = p.cols;
  if constexpr (kParams) {
    std::fill(dwp, dwp + n, 0.f);
    std::fill(dbp, dbp + n, 0.f);
  }
  const bool prefetch = n * static_cast<int64_t>(sizeof(S)) <= kPrefetchRowBytes;
  const bool stream = stream_rows(p.dh, p.rows, n, sizeof(S));
  auto row = [&](int64_t r) {
    return BwdRow<T, S>{static_cast<const T*>(p.dy) + r * n, static_cast<const S*>(p.h) + r * n,
                        static_cast<S*>(p.dh) + r * n,
                        kRms ? 0.f : static_cast<const float*>(p.mean)[r],
                        static_cast<const float*>(p.rstd)[r]};
  };
  // Pass 2 of row r: dh = rstd * ((g - c1 / n) - xhat * c2 / n)  (+ dh_out), prefetching the
  // row `ahead` elements further. Scaling by rstd last keeps the cancellation exact (e.g. one
  // column: g - c1 = 0 exactly, as in torch).
  auto pass2 = [&](const BwdRow<T, S>& q, int64_t r, double c1, double c2, int64_t ahead) {
    const NextRow next{
        {reinterpret_cast<const char*>(q.dy + ahead), reinterpret_cast<const char*>(q.h + ahead)},
        reinterpret_cast<char*>(q.dh + ahead),
        {sizeof(T), sizeof(S)},
        sizeof(S)};
    const Vf a = vset(q.rstd), m = vset(q.mean);
    const Vf k1 = vset(static_cast<float>(c1 / n)), k2 = vset(static_cast<float>(-c2 / n));
    const S* dho = kDh ? static_cast<const S*>(p.dh_out) + r * n : nullptr;
    auto out = [&](int64_t j, int64_t k) {
      const Vf g = vmul(load_k(q.dy + j, k), load_k(w + j, k));
      const Vf xh = vmul(vsub(load_k(q.h + j, k), m), a);
      Vf v = vmul(vfma(xh, k2, vsub(g, k1)), a);
      if constexpr (kDh) v = vadd(v, load_k(dho + j, k));
      return v;
    };
    if (stream) {  // whole rows of 16-element, 32-byte aligned groups
      for (int64_t j = 0; j < n; j += 2 * kW) {
        next.at(j);
        stream2(q.dh + j, out(j, kW), out(j + kW, kW));
      }
    } else {
      for_cols_prefetch(n, next, [&](int64_t j, int64_t k) { store_k(q.dh + j, out(j, k), k); });
    }
  };
  int64_t r = r0;
  for (; r + 1 < r1; r += 2) {
    const BwdRow<T, S> q[2] = {row(r), row(r + 1)};
    double c1[2], c2[2];
    bwd_sums<true, kRms, kParams>(q[0], q[1], w, n, dwp, dbp, c1, c2);
    // each pass 2 prefetches the row of the next pair at its position
    pass2(q[0], r, c1[0], c2[0], prefetch && r + 2 < r1 ? 2 * n : 0);
    pass2(q[1], r + 1, c1[1], c2[1], prefetch && r + 3 < r1 ? 2 * n : 0);
  }
  if (r < r1) {
    const BwdRow<T, S> q = row(r);
    double c1[2], c2[2];
    bwd_sums<false, kRms, kParams>(q, q, w, n, dwp, dbp, c1, c2);
    pass2(q, r, c1[0], c2[0], 0);
  }
  if (stream) store_fence();
}

// Adds the nb partial rows (stride n) in block order into out, in parallel over columns.
template <class A>
void sum_partials(const A* part, int64_t nb, int64_t n, A* out) {
  at::parallel_for(0, n, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t j = c0; j < c1; ++j) out[j] = 0;
    for (int64_t blk = 0; blk < nb; ++blk) {
      const A* row = part + blk * n;
      for (int64_t j = c0; j < c1; ++j) out[j] += row[j];
    }
  });
}

template <class T, class S, bool kRms, bool kParams, bool kDh>
void bwd_run(const NormBwdParams& p) {
  const int64_t n = p.cols, nb = (p.rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock;
  std::unique_ptr<float[]> ones, part;
  const float* w = static_cast<const float*>(p.weight);
  if (w == nullptr) {
    ones.reset(new float[n]);
    std::fill(ones.get(), ones.get() + n, 1.f);
    w = ones.get();
  }
  if constexpr (kParams) part.reset(new float[2 * nb * n]);
  float* dwp = part.get();
  float* dbp = kParams ? dwp + nb * n : nullptr;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kNormRowsPerBlock, r1 = std::min(p.rows, r0 + kNormRowsPerBlock);
      bwd_block<T, S, kRms, kParams, kDh>(p, w, r0, r1, kParams ? dwp + blk * n : nullptr,
                                          kParams ? dbp + blk * n : nullptr);
    }
  });
  if (p.dw != nullptr) sum_partials(dwp, nb, n, static_cast<float*>(p.dw));
  if (p.db != nullptr) sum_partials(dbp, nb, n, static_cast<float*>(p.db));
}

template <class T, class S>
void bwd_typed(const NormBwdParams& p) {
  const bool params = p.dw != nullptr || p.db != nullptr, dh = p.dh_out != nullptr;
  if (p.rms) {
    if (params)
      return dh ? bwd_run<T, S, true, true, true>(p) : bwd_run<T, S, true, true, false>(p);
    return dh ? bwd_run<T, S, true, false, true>(p) : bwd_run<T, S, true, false, false>(p);
  }
  if (params)
    return dh ? bwd_run<T, S, false, true, true>(p) : bwd_run<T, S, false, true, false>(p);
  return dh ? bwd_run<T, S, false, false, true>(p) : bwd_run<T, S, false, false, false>(p);
}

void bwd_f64(const NormBwdParams& p) {
  const int64_t n = p.cols, nb = (p.rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock;
  const double* w = static_cast<const double*>(p.weight);
  std::unique_ptr<double[]> part(new double[2 * nb * n]);
  double *dwp = part.get(), *dbp = part.get() + nb * n;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      double* pw = dwp + blk * n;
      double* pb = dbp + blk * n;
      std::fill(pw, pw + n, 0.0);
      std::fill(pb, pb + n, 0.0);
      const int64_t r0 = blk * kNormRowsPerBlock, r1 = std::min(p.rows, r0 + kNormRowsPerBlock);
      for (int64_t r = r0; r < r1; ++r) {
        const double* dy = static_cast<const double*>(p.dy) + r * n;
        const double* h = static_cast<const double*>(p.h) + r * n;
        double* dh = static_cast<double*>(p.dh) + r * n;
        const double rstd = static_cast<const double*>(p.rstd)[r];
        const double mean = p.rms ? 0.0 : static_cast<const double*>(p.mean)[r];
        double c1 = 0.0, c2 = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const double xh = (h[j] - mean) * rstd, g = w ? dy[j] * w[j] : dy[j];
          c1 += g;
          c2 += g * xh;
          pw[j] += dy[j] * xh;
          pb[j] += dy[j];
        }
        if (p.rms) c1 = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          const double xh = (h[j] - mean) * rstd, g = w ? dy[j] * w[j] : dy[j];
          double v = rstd * (g - c1 / n - xh * c2 / n);
          if (p.dh_out != nullptr) v += static_cast<const double*>(p.dh_out)[r * n + j];
          dh[j] = v;
        }
      }
    }
  });
  if (p.dw != nullptr) sum_partials(dwp, nb, n, static_cast<double*>(p.dw));
  if (p.db != nullptr) sum_partials(dbp, nb, n, static_cast<double*>(p.db));
}

}  // namespace

void norm_fwd(const NormFwdParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const bool s32 = p.stream_dtype == DType::F32;
  switch (p.dtype) {
    case DType::F32:
      return fwd_typed<float, float>(p);
    case DType::BF16:
      return s32 ? fwd_typed<BFloat16, float>(p) : fwd_typed<BFloat16, BFloat16>(p);
    case DType::F16:
      return s32 ? fwd_typed<Half, float>(p) : fwd_typed<Half, Half>(p);
    case DType::F64:
      return fwd_f64(p);
    case DType::Bool:
      break;
  }
}

void norm_bwd(const NormBwdParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const bool s32 = p.stream_dtype == DType::F32;
  switch (p.dtype) {
    case DType::F32:
      return bwd_typed<float, float>(p);
    case DType::BF16:
      return s32 ? bwd_typed<BFloat16, float>(p) : bwd_typed<BFloat16, BFloat16>(p);
    case DType::F16:
      return s32 ? bwd_typed<Half, float>(p) : bwd_typed<Half, Half>(p);
    case DType::F64:
      return bwd_f64(p);
    case DType::Bool:
      break;
  }
}

}  // namespace lmk::cpu::CPU_CAPABILITY
