// The cross-entropy kernel contract, identical for every C++/CUDA backend (and the Triton one).
//
// One call handles rows of logits, one row per prediction, and writes per row the loss and,
// when asked, the gradient of (scale_r * loss_r) with respect to the row, in the same pass over
// the logits. The Python op layer moves the class dim last, validates the targets (every target
// is ignore_index or in [0, cols)), reduces the row losses and picks the scale (1 / the 'mean'
// denominator, 1 for 'sum', grad_output per row for 'none').
//
// Per row r, t = target[r], A the accumulator (float; double for F64 data):
//   ignored (t == ignore_index, or any t outside [0, cols)): loss = 0, gradient row = 0; no
//     logit of the row is read for it (an out-of-range t is never dereferenced).
//   z_c  = softcap > 0 ? softcap * tanh(x_c / softcap) : x_c
//   lse  = log sum_c exp(z_c)                  (max-shifted; NaN in the row -> NaN loss / grad)
//   W    = sum_c w_c,  S = sum_c w_c z_c       (w = weight, or all ones without one)
//   loss = (1 - eps) w_t (lse - z_t) + (eps / cols) (W lse - S) + z_loss lse^2
//          (the eps term is left out when eps = 0, so a -inf logit does not make it 0 * inf)
//   p_c  = exp(z_c - lse)
//   dloss / dz_c = p_c ((1 - eps) w_t + eps W / cols + 2 z_loss lse)
//                  - (1 - eps) w_t [c == t] - eps w_c / cols
//     at the target computed with its terms apart,
//     (1 - eps) w_t (p_t - 1) + (eps / cols) (W p_t - w_t) + 2 z_loss lse p_t, so that nothing
//     cancels when p_t is near 1 (a confident prediction, or a single class)
//   grad_c = scale_r * dloss / dz_c * (softcap > 0 ? 1 - (z_c / softcap)^2 : 1), rounded once
//     to the data type; scale_r = scale[r * scale_stride] (null scale: 1).
// This is torch.nn.functional.cross_entropy's per-sample loss with class weights and label
// smoothing (eps), plus the z-loss (z_loss lse^2, PaLM) and the logit soft-cap (Gemma 2).
//
// The gradient may alias the logits (same pointer and row stride: the in-place backward): every
// logit of a row is read before its gradient is written, element by element.
#pragma once
#include "lmk/common.h"

namespace lmk {

struct CrossEntropyParams {
  const void* logits = nullptr;  // (rows, cols), element (r, c) at r * logits_row_stride + c
  DType dtype = DType::F32;      // of logits and grad
  int64_t rows = 0, cols = 0;
  int64_t logits_row_stride = 0;
  const int64_t* target = nullptr;  // [rows]
  const void* weight = nullptr;     // [cols] of A, or null: all ones
  int64_t ignore_index = -100;
  double label_smoothing = 0.0, softcap = 0.0, z_loss = 0.0;  // rounded to A once
  const void* scale = nullptr;  // A, read at r * scale_stride; null: 1
  int64_t scale_stride = 0;
  void* loss = nullptr;  // [rows] of A, or null: not written
  void* grad = nullptr;  // (rows, cols) of dtype, or null: not written
  int64_t grad_row_stride = 0;
};

}  // namespace lmk
