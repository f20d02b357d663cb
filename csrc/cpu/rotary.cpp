// Rotary position embedding forward and backward on CPU (contract: lmk/rotary.h). Compiled
// twice, like every csrc/cpu file (vec.h: AVX2 or portable). Rows in parallel; per row, the
// rotate_half layout pairs column j with j + h, so 8 columns of each half move as vectors;
// the interleaved layout pairs neighbours and runs as a scalar loop (fp32 math).
#include "lmk/rotary.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace lmk::cpu::CPU_CAPABILITY {
namespace {

#include "vec.h"

// One row. sg = -1 (forward) or +1 (backward): out[j] = x[j] c[j] + sg x[j+h] s[j or j+h] ...
// One rotated pair (i, k) of a row, in scalar fp32 (fp64 for fp64): k = i + h for rotate_half,
// i + 1 for interleaved pairs.
template <bool kBwd, class T, class C>
inline void rotate_pair(const T* x, T* out, const C* c, const C* s, int64_t i, int64_t k) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A a = static_cast<A>(x[i]), b = static_cast<A>(x[k]);
  const A ca = static_cast<A>(c[i]), cb = static_cast<A>(c[k]);
  const A sa = static_cast<A>(s[i]), sb = static_cast<A>(s[k]);
  A lo, hi;
  if constexpr (kBwd) {  // dx[i] = a ca + b sb, dx[k] = b cb - a sa
    lo = std::fma(b, sb, a * ca);
    hi = b * cb - a * sa;
  } else {  // out[i] = a ca - b sa, out[k] = b cb + a sb
    lo = a * ca - b * sa;
    hi = std::fma(a, sb, b * cb);
  }
  out[i] = static_cast<T>(lo);
  out[k] = static_cast<T>(hi);
}

template <class T, class C, bool kBwd>
void half_row(const T* x, T* out, const C* c, const C* s, int64_t d) {
  const int64_t h = d / 2;
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, double>) {
    for (; j + kW <= h; j += kW) {  // rotate_pair's math on 8 pairs at once
      const Vf a = load(x + j), b = load(x + j + h);
      const Vf ca = load(c + j), cb = load(c + j + h), sa = load(s + j), sb = load(s + j + h);
      Vf lo, hi;
      if constexpr (kBwd) {
        lo = vfma(b, sb, vmul(a, ca));
        hi = vsub(vmul(b, cb), vmul(a, sa));
      } else {
        lo = vsub(vmul(a, ca), vmul(b, sa));
        hi = vfma(a, sb, vmul(b, cb));
      }
      store(out + j, lo);
      store(out + j + h, hi);
    }
  }
  for (; j < h; ++j) rotate_pair<kBwd>(x, out, c, s, j, j + h);
}

template <class T, class C, bool kBwd>
void pair_row(const T* x, T* out, const C* c, const C* s, int64_t d) {
  for (int64_t j = 0; j < d; j += 2) rotate_pair<kBwd>(x, out, c, s, j, j + 1);
}

template <class T, class C>
void run(const RotaryParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const C* cb = static_cast<const C*>(p.cos);
  const C* sb = static_cast<const C*>(p.sin);
  const int64_t d = p.d;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      T* orow = out + r * d;
      const C* c = cb + p.cos_off[r];
      const C* s = sb + p.sin_off[r];
      if (p.interleaved) {
        p.backward ? pair_row<T, C, true>(xr, orow, c, s, d)
                   : pair_row<T, C, false>(xr, orow, c, s, d);
      } else {
        p.backward ? half_row<T, C, true>(xr, orow, c, s, d)
                   : half_row<T, C, false>(xr, orow, c, s, d);
      }
    }
  });
}

template <class T>
void run_cs(const RotaryParams& p) {
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
    if (p.cs_dtype == DType::F32) return run<T, float>(p);
  }
  run<T, T>(p);
}

}  // namespace

void rotary(const RotaryParams& p) {
  if (p.rows <= 0 || p.d <= 0) return;
  switch (p.dtype) {
    case DType::F32:
      return run_cs<float>(p);
    case DType::F16:
      return run_cs<Half>(p);
    case DType::BF16:
      return run_cs<BFloat16>(p);
    case DType::F64:
      return run_cs<double>(p);
    case DType::Bool:
      break;
  }
}

}  // namespace lmk::cpu::CPU_CAPABILITY
