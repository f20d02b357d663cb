// Cross-entropy rows on CPU (contract: lmk/cross_entropy.h): per row the loss and, when asked,
// the gradient, in one call. Compiled twice, like every csrc/cpu file (vec.h: AVX2 or portable).
//
// Per row (fp32 accumulation for fp32 / fp16 / bf16 data; fp64 data runs scalar in double):
//   1. m = max_c z_c                      (NaN is not tracked here: pass 2 propagates it)
//   2. s = sum_c 2^((z_c - m) log2e)      (vec.h's exp2v, 1.9e-7 relative); lse = m + ln s (in
//      double); with label smoothing S = sum_c w_c z_c (one more pass; W = sum_c w_c is
//      computed once per call)
//   3. (gradient) g_c = scale_r (p_c coef - eps w_c / cols) for c != t (the target's terms
//      apart, see the contract), p_c = 2^((z_c - lse) log2e), coef = (1 - eps) w_t + eps W / cols +
//      2 z_loss lse, times 1 - (z_c / softcap)^2 with a soft-cap; rounded once to the data type.
// Sums run in fp32 vectors over chunks of kChunk columns whose sums are added in double
// (vec.h's row_sum), so the error does not grow with the vocabulary. A row of the data type is read
// up to three times (passes 1-3); the second and third reads hit the cache for rows up to the L2
// size (a 32K-class fp32 row is 128 KB). With a soft-cap, z = softcap tanh(x / softcap) is computed
// once (scalar tanh) into a per-thread fp32 row and the passes read that instead.
// Special values follow torch's log_softmax: NaN or +inf in a row, or a row of -inf only, gives
// a NaN loss and gradient row (the exp pass turns them into NaN).
// Threading: at::parallel_for over rows (>= ~32K elements per task); each row is computed
// by one thread in a fixed order, so the bits do not depend on the thread count.
#include "lmk/cross_entropy.h"

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

// The per-call constants of the contract (fp32 accumulation).
struct Consts {
  float eps, cap, zl;
  const float* w;  // null: all ones
  double big_w;    // W = sum_c w_c
  int64_t cols, ignore;
};

// Pass 1: the row max (NaN ignored; see the header comment).
template <class S>
float row_max(const S* z, int64_t n) {
  Vf m0 = vset(-kInf), m1 = vset(-kInf);
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    m0 = vmax(load(z + j), m0);
    m1 = vmax(load(z + j + kW), m1);
  }
  for (; j < n; j += kW) m0 = vmax(load_n(z + j, n - j, -kInf), m0);
  return hmax(vmax(m0, m1));
}

// z at the 8 columns from j, of which k are valid (the others read as pad).
template <class S>
inline Vf load_k(const S* z, int64_t j, int64_t k, float pad) {
  return k == kW ? load(z + j) : load_n(z + j, k, pad);
}

// Pass 2: s = sum_c 2^((z_c - m) log2e). The difference is taken before the scaling (not one
// fused z log2e - m log2e): for large logits z - m is exact or nearly, while m log2e would
// carry an absolute error of ulp(m log2e) into every exponent.
template <class S>
double row_sum_exp(const S* z, int64_t n, float m) {
  const Vf l2e = vset(kLog2e), mv = vset(m);
  return row_sum(n, [&](Vf acc, int64_t j, int64_t k) {
    const Vf e = exp2v(vmul(vsub(load_k(z, j, k, 0.f), mv), l2e));
    return vadd(acc, k == kW ? e : keep_first(e, k, 0.f));
  });
}

// Label smoothing's S = sum_c w_c z_c (a second pass over the row, from the cache).
template <class S>
double row_sum_wz(const S* z, const float* w, int64_t n) {
  if (w == nullptr) {
    return row_sum(n,
                   [&](Vf acc, int64_t j, int64_t k) { return vadd(acc, load_k(z, j, k, 0.f)); });
  }
  return row_sum(n, [&](Vf acc, int64_t j, int64_t k) {
    return vfma(load_k(w, j, k, 0.f), load_k(z, j, k, 0.f), acc);
  });
}

// Pass 3: the gradient row (see the header comment); g may alias the row of x.
template <class T, class S>
void row_grad(const S* z, T* g, const Consts& k, int64_t t, float lse, float wt, float scale) {
  const int64_t n = k.cols;
  const float coef = static_cast<float>(
      (1.0 - k.eps) * wt + k.eps * k.big_w / static_cast<double>(n) + 2.0 * k.zl * lse);
  const Vf l2e = vset(kLog2e), lv = vset(lse), cv = vset(scale * coef);
  const float swf = scale * k.eps / static_cast<float>(n), onehot = scale * (1 - k.eps) * wt;
  const Vf sw = vset(swf);
  const Vf inv_cap = vset(k.cap > 0 ? 1.f / k.cap : 0.f), one = vset(1.f);
  const bool smooth = k.eps != 0;
  auto grad8 = [&](Vf zj, const float* wj, int64_t j, int64_t valid) {
    const Vf pj = exp2v(vmul(vsub(zj, lv), l2e));  // p_c (see row_sums)
    Vf gj = vmul(pj, cv);
    if (smooth && k.w != nullptr) {
      gj = vsub(gj, vmul(sw, valid == kW ? load(wj) : load_n(wj, valid, 0.f)));
    } else if (smooth) {
      gj = vsub(gj, sw);
    }
    if (t >= j && t < j + kW) {  // the target: its terms apart (no cancellation near p_t = 1)
      float g[kW], p[kW];
      vstore_raw(g, gj);
      vstore_raw(p, pj);
      const float pt = p[t - j], w_t = k.w != nullptr ? k.w[t] : 1.f;
      g[t - j] = (pt - 1.f) * onehot + (pt * static_cast<float>(k.big_w) - w_t) * swf +
                 pt * (scale * 2.f * k.zl * lse);
      gj = vload_raw(g);
    }
    if (k.cap > 0) {
      const Vf r = vmul(zj, inv_cap);
      gj = vmul(gj, vsub(one, vmul(r, r)));
    }
    return gj;
  };
  int64_t j = 0;
  for (; j + kW <= n; j += kW) store(g + j, grad8(load(z + j), k.w + j * (k.w != nullptr), j, kW));
  if (j < n) {
    const int64_t v = n - j;
    store_n(g + j, grad8(load_n(z + j, v, 0.f), k.w + j * (k.w != nullptr), j, v), v);
  }
}

template <class T>
void rows_f(const CrossEntropyParams& p, const Consts& k, int64_t r0, int64_t r1) {
  const T* x0 = static_cast<const T*>(p.logits);
  T* g0 = static_cast<T*>(p.grad);
  const float* scale = static_cast<const float*>(p.scale);
  std::vector<float> zbuf(k.cap > 0 ? static_cast<size_t>(p.cols) : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = p.target[r];
    T* g = g0 == nullptr ? nullptr : g0 + r * p.grad_row_stride;
    if (t == k.ignore || t < 0 || t >= k.cols) {
      if (p.loss != nullptr) static_cast<float*>(p.loss)[r] = 0.f;
      if (g != nullptr) std::fill(g, g + k.cols, static_cast<T>(0.f));
      continue;
    }
    const T* x = x0 + r * p.logits_row_stride;
    auto run = [&](const auto* z) {
      const float m = row_max(z, k.cols);
      const double lse = static_cast<double>(m) + std::log(row_sum_exp(z, k.cols, m));
      const double wt = k.w != nullptr ? k.w[t] : 1.0;
      if (p.loss != nullptr) {
        const double eps = k.eps, zt = static_cast<float>(z[t]);
        double loss = (1.0 - eps) * wt * (lse - zt) + static_cast<double>(k.zl) * lse * lse;
        if (eps != 0) {
          const double sw = row_sum_wz(z, k.w, k.cols);
          loss += eps / static_cast<double>(k.cols) * (k.big_w * lse - sw);
        }
        static_cast<float*>(p.loss)[r] = static_cast<float>(loss);
      }
      if (g != nullptr) {
        const float sc = scale == nullptr ? 1.f : scale[r * p.scale_stride];
        row_grad(z, g, k, t, static_cast<float>(lse), static_cast<float>(wt), sc);
      }
    };
    if (k.cap > 0) {
      for (int64_t c = 0; c < k.cols; ++c) {
        zbuf[c] = k.cap * std::tanh(static_cast<float>(x[c]) / k.cap);
      }
      run(zbuf.data());
    } else {
      run(x);
    }
  }
}

// fp64 data: the contract in plain double arithmetic (a testing dtype: no vectors).
void rows_d(const CrossEntropyParams& p, int64_t r0, int64_t r1) {
  const double eps = p.label_smoothing, cap = p.softcap, zl = p.z_loss;
  const double* w = static_cast<const double*>(p.weight);
  const double* scale = static_cast<const double*>(p.scale);
  const int64_t n = p.cols;
  std::vector<double> z(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = p.target[r];
    double* g = p.grad == nullptr ? nullptr : static_cast<double*>(p.grad) + r * p.grad_row_stride;
    if (t == p.ignore_index || t < 0 || t >= n) {
      if (p.loss != nullptr) static_cast<double*>(p.loss)[r] = 0.0;
      if (g != nullptr) std::fill(g, g + n, 0.0);
      continue;
    }
    const double* x = static_cast<const double*>(p.logits) + r * p.logits_row_stride;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < n; ++c) {
      z[c] = cap > 0 ? cap * std::tanh(x[c] / cap) : x[c];
      m = std::max(m, z[c]);
    }
    double s = 0, sw = 0, ww = w == nullptr ? static_cast<double>(n) : 0.0;
    for (int64_t c = 0; c < n; ++c) {
      s += std::exp(z[c] - m);
      sw += (w == nullptr ? 1.0 : w[c]) * z[c];
      if (w != nullptr) ww += w[c];
    }
    const double lse = m + std::log(s), wt = w == nullptr ? 1.0 : w[t];
    if (p.loss != nullptr) {
      double loss = (1 - eps) * wt * (lse - z[t]) + zl * lse * lse;
      if (eps != 0) loss += eps / static_cast<double>(n) * (ww * lse - sw);
      static_cast<double*>(p.loss)[r] = loss;
    }
    if (g == nullptr) continue;
    const double sc = scale == nullptr ? 1.0 : scale[r * p.scale_stride];
    const double coef = (1 - eps) * wt + eps * ww / static_cast<double>(n) + 2 * zl * lse;
    for (int64_t c = 0; c < n; ++c) {
      double d = std::exp(z[c] - lse) * coef - eps * (w == nullptr ? 1.0 : w[c]) / n;
      if (c == t) d -= (1 - eps) * wt;
      if (cap > 0) d *= 1 - (z[c] / cap) * (z[c] / cap);
      g[c] = sc * d;
    }
  }
}

}  // namespace

void cross_entropy(const CrossEntropyParams& p) {
  if (p.rows == 0) return;
  if (p.dtype == DType::F64) {
    at::parallel_for(0, p.rows, row_grain(p.cols),
                     [&](int64_t r0, int64_t r1) { rows_d(p, r0, r1); });
    return;
  }
  const float* w = static_cast<const float*>(p.weight);
  double big_w = static_cast<double>(p.cols);  // W, once per call
  if (w != nullptr)
    big_w = row_sum(p.cols,
                    [&](Vf acc, int64_t j, int64_t k) { return vadd(acc, load_k(w, j, k, 0.f)); });
  const Consts k{static_cast<float>(p.label_smoothing),
                 static_cast<float>(p.softcap),
                 static_cast<float>(p.z_loss),
                 w,
                 big_w,
                 p.cols,
                 p.ignore_index};
  at::parallel_for(0, p.rows, row_grain(p.cols), [&](int64_t r0, int64_t r1) {
    switch (p.dtype) {
      case DType::F16:
        rows_f<c10::Half>(p, k, r0, r1);
        break;
      case DType::BF16:
        rows_f<c10::BFloat16>(p, k, r0, r1);
        break;
      default:
        rows_f<float>(p, k, r0, r1);
        break;
    }
  });
}

}  // namespace lmk::cpu::CPU_CAPABILITY
