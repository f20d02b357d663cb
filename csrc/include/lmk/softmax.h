// The softmax family's kernel contract, identical for every C++/CUDA backend.
//
// All tensors are row-major 2-D views (rows, cols), contiguous; the Python op layer moves the
// softmax dim last and flattens the rest into rows. Accumulation is fp32 (fp64 for fp64 data).
//
// forward, per row r and column j:
//   z_j = scale * x_j  (+ mask_j if the mask is float)              masked out: z_j = -inf
//   masked out when (bool mask and mask_j) or (causal and j > r % causal_rows)
//   y_j = exp(z_j - max z) / sum exp(z - max z)        (log: y_j = z_j - max z - log sum ...)
//   WITH a mask or causal: a row whose every z is -inf (fully masked) gives y = 0 (never NaN).
//   WITHOUT mask and causal: plain torch semantics, i.e. a row of all -inf gives NaN exactly as
//   torch.softmax / log_softmax do (-inf - -inf = NaN); no special case.
//   (the log variant is only exposed without a mask).
// backward (needs only y; masked positions have y = 0 and so get dx = 0):
//   softmax:     dx_j = scale * y_j * (dy_j - sum_k dy_k y_k)
//   log_softmax: dx_j = scale * (dy_j - exp(y_j) * sum_k dy_k)
#pragma once
#include "lmk/common.h"

namespace lmk {

struct SoftmaxMask {
  const void* ptr = nullptr;             // null: no mask
  DType dtype = DType::Bool;             // Bool (true = masked out) or F32 / the data's dtype
  const int64_t* row_offsets = nullptr;  // [rows] element offset of row r's mask row
  int64_t col_stride = 1;                // 0 (one value for the whole row) or 1
};

struct SoftmaxFwdParams {
  const void* x = nullptr;
  void* y = nullptr;
  DType dtype = DType::F32;  // of x and y
  int64_t rows = 0, cols = 0;
  double scale = 1.0;  // fp32 kernels round it to float once
  bool log = false;
  SoftmaxMask mask;
  bool causal = false;
  int64_t causal_rows = 1;  // length of the query axis: row r is query r % causal_rows
};

struct SoftmaxBwdParams {
  const void* y = nullptr;
  const void* dy = nullptr;
  void* dx = nullptr;
  DType dtype = DType::F32;  // of y, dy and dx
  int64_t rows = 0, cols = 0;
  double scale = 1.0;  // fp32 kernels round it to float once
  bool log = false;
};

}  // namespace lmk
