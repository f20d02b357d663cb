// The normalisation family's kernel contract (layer_norm, rms_norm, and both with a fused
// residual add), identical for every backend (C++, CUDA, Triton, reference).
//
// All tensors are row-major and contiguous: data is a (rows, cols) matrix whose rows are the
// normalised groups (the Python layer flattens normalized_shape into cols). Types:
//   T  the data type of x, y, dy (f32, f16, bf16, f64)
//   S  the residual-stream type of residual, h and dh: T, or f32 when T is 16-bit
//   A  the accumulation type (f64 for f64 data, else f32) of weight, bias, mean, rstd, dw, db.
// Launchers hand the kernels weight and bias in A (a vector of cols elements): the CPU binding
// widens 16-bit ones itself, the Python launchers of the other backends convert them.
//
// forward, per row r:
//   h_j    = x_j + residual_j, rounded to S and stored to h     (with a residual; else h = x)
//   mean   = sum_j h_j / cols                                   (layer_norm; rms: mean = 0)
//   var    = sum_j (h_j - mean)^2 / cols                        (rms: sum_j h_j^2 / cols)
//   rstd   = 1 / sqrt(var + eps)                                (stored, A)
//   xhat_j = (h_j - mean) * rstd
//   y_j    = xhat_j * w_j + b_j  in A, rounded once to T        (w = 1, b = 0 when absent)
// mean is stored only for layer_norm. All of it is computed in A from the values as stored
// (h after its rounding to S), so the fused op equals the unfused `h = x + r; norm(h)`.
// eps is used as given (torch does not reject eps <= 0: a zero-variance row then gives
// inf/NaN, as in torch). NaN/inf in a row propagate to that row only.
//
// backward, per row (g_j = dy_j * w_j in A; c1 = sum_j g_j / cols for layer_norm, 0 for rms;
// c2 = sum_j g_j xhat_j / cols):
//   dh_j = rstd * (g_j - c1 - xhat_j * c2)  (+ dh_out_j, the gradient of the returned h)
//   dh is written in S; the gradient of x is dh (rounded to T by the caller if S != T) and the
//   gradient of the residual is dh.
//   dw_j = sum_r dy_rj * xhat_rj,  db_j = sum_r dy_rj           (written in A)
// dw and db are reduced deterministically: fixed blocks of rows (independent of the thread or
// SM count) each write an A partial sum, and the partials are added in block order. Repeated
// backward passes are bitwise identical. No atomics.
#pragma once
#include "lmk/common.h"

namespace lmk {

struct NormFwdParams {
  const void* x = nullptr;          // (rows, cols) T
  const void* residual = nullptr;   // (rows, cols) S, or null
  const void* weight = nullptr;     // (cols) A, or null
  const void* bias = nullptr;       // (cols) A, or null
  void* y = nullptr;                // (rows, cols) T
  void* h = nullptr;                // (rows, cols) S; non-null exactly when residual is
  void* mean = nullptr;             // (rows) A; null for rms
  void* rstd = nullptr;             // (rows) A
  DType dtype = DType::F32;         // T
  DType stream_dtype = DType::F32;  // S
  int64_t rows = 0, cols = 0;
  double eps = 1e-5;
  bool rms = false;
};

struct NormBwdParams {
  const void* dy = nullptr;         // (rows, cols) T
  const void* dh_out = nullptr;     // (rows, cols) S, or null
  const void* h = nullptr;          // (rows, cols) S: the normalised input (x itself w/o residual)
  const void* weight = nullptr;     // (cols) A, or null
  const void* mean = nullptr;       // (rows) A; null for rms
  const void* rstd = nullptr;       // (rows) A
  void* dh = nullptr;               // (rows, cols) S
  void* dw = nullptr;               // (cols) A, or null (not needed)
  void* db = nullptr;               // (cols) A, or null (not needed)
  DType dtype = DType::F32;         // T (of dy)
  DType stream_dtype = DType::F32;  // S (of dh_out, h, dh)
  int64_t rows = 0, cols = 0;
  bool rms = false;
};

// Rows per dw/db partial block. Part of the contract: the reduction order, and so the bits of
// dw and db, depend only on (rows, cols), never on the thread count or the device.
constexpr int64_t kNormRowsPerBlock = 64;

}  // namespace lmk
