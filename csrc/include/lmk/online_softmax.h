// Online softmax statistics: the running (max m, sum s = sum_k exp(z_k - m)) of a row, built one
// value or one partial result at a time, so a row of any length needs one read to get its
// normaliser (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018).
//
// Host + device (LMK_HD), templated on the accumulator type A (float, or double for fp64 data).
//
// Special values, chosen to match the plain two-pass softmax:
//   * z = -inf (masked out) contributes exactly 0, also when the running max is still -inf
//     (a naive exp(-inf - -inf) would be NaN);
//   * a NaN anywhere makes the max NaN (softmax_max propagates NaN, unlike fmaxf), so s and
//     every output of the row become NaN;
//   * +inf gives exp(inf - inf) = NaN, as the two-pass formula does;
//   * a row whose values are all -inf ends with m = -inf, s = 0: softmax_inv_sum returns 0 so
//     the row's outputs are 0, never NaN (the masked-softmax rule; a caller that wants torch's
//     NaN for an unmasked all -inf row replaces the statistics by NaN).
// combine() is commutative bit for bit (max, and a sum of two products), so a butterfly
// reduction gives every lane the same result.
#pragma once
#include <math.h>

#include "lmk/common.h"

namespace lmk {

template <typename A>
struct SoftmaxStats {
  A m;  // running max (-inf: nothing seen yet, or everything masked out)
  A s;  // sum of exp(z - m) over the values seen
};

LMK_HD float softmax_exp(float x) { return expf(x); }
LMK_HD double softmax_exp(double x) { return exp(x); }
LMK_HD float softmax_log(float x) { return logf(x); }
LMK_HD double softmax_log(double x) { return log(x); }

// max that returns NaN if either argument is NaN.
template <typename A>
LMK_HD A softmax_max(A a, A b) {
  return (a > b || a != a) ? a : b;
}

// exp(z - m), with exactly 0 for z = -inf (whatever m is).
template <typename A>
LMK_HD A softmax_exp_shift(A z, A m) {
  return z == -static_cast<A>(INFINITY) ? A(0) : softmax_exp(z - m);
}

// The statistics of an empty (or fully masked) row.
template <typename A>
LMK_HD SoftmaxStats<A> softmax_stats_empty() {
  return {-static_cast<A>(INFINITY), A(0)};
}

// Merge two partial results.
template <typename A>
LMK_HD SoftmaxStats<A> softmax_combine(SoftmaxStats<A> a, SoftmaxStats<A> b) {
  const A m = softmax_max(a.m, b.m);
  return {m, a.s * softmax_exp_shift(a.m, m) + b.s * softmax_exp_shift(b.m, m)};
}

// Add one value.
template <typename A>
LMK_HD SoftmaxStats<A> softmax_push(SoftmaxStats<A> st, A z) {
  const A m = softmax_max(st.m, z);
  return {m, st.s * softmax_exp_shift(st.m, m) + softmax_exp_shift(z, m)};
}

// 1 / s, or 0 for a fully masked row (m = -inf, s = 0), so y = exp(z - m) * inv = 0 there.
template <typename A>
LMK_HD A softmax_inv_sum(SoftmaxStats<A> st) {
  return st.m == -static_cast<A>(INFINITY) ? A(0) : A(1) / st.s;
}

// y_j of softmax from the final statistics and softmax_inv_sum().
template <typename A>
LMK_HD A softmax_output(A z, SoftmaxStats<A> st, A inv_sum) {
  return softmax_exp_shift(z, st.m) * inv_sum;
}

// y_j of log_softmax from the final statistics and log_sum = softmax_log(st.s):
// (z - m) - log s, and -inf for a fully masked row.
template <typename A>
LMK_HD A log_softmax_output(A z, SoftmaxStats<A> st, A log_sum) {
  return st.m == -static_cast<A>(INFINITY) ? -static_cast<A>(INFINITY) : (z - st.m) - log_sum;
}

}  // namespace lmk
