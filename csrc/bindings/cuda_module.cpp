// lmkernels._cuda: the pybind11 module of the CUDA kernels. No torch headers: tensors arrive as
// data pointers (tensor.data_ptr()), dtypes as lmk::DType codes, the stream as the integer value
// of its cudaStream_t. The Python op layer (lmkernels/ops/) checks devices, shapes and
// contiguity; this layer checks what it can see (sizes, codes, null pointers) and raises
// ValueError naming the argument, and turns a CUDA error into RuntimeError naming the op.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "lmk/attention.h"
#include "lmk/attention_cuda.h"
#include "lmk/cross_entropy.h"
#include "lmk/cross_entropy_cuda.h"
#include "lmk/embedding.h"
#include "lmk/embedding_cuda.h"
#include "lmk/norm.h"
#include "lmk/norm_cuda.h"
#include "lmk/rotary.h"
#include "lmk/rotary_cuda.h"
#include "lmk/softmax.h"
#include "lmk/softmax_cuda.h"

#ifndef LMK_CUDA_ARCHS
#define LMK_CUDA_ARCHS ""  // comma-separated, e.g. "80,90"; set by CMakeLists.txt
#endif

namespace py = pybind11;

namespace {

// ValueError "lmkernels._cuda.<op>: <arg>: <what>".
[[noreturn]] void value_error(const char* op, const std::string& arg, const std::string& what) {
  throw py::value_error(std::string("lmkernels._cuda.") + op + ": " + arg + ": " + what);
}

void check_nonnegative(const char* op, const char* arg, int64_t v) {
  if (v < 0) value_error(op, arg, "expected >= 0, got " + std::to_string(v));
}

void check_pointer(const char* op, const char* arg, uint64_t p) {
  if (p == 0) value_error(op, arg, "null data pointer for a non-empty tensor");
}

// Data dtype of a kernel: F32, F16 or BF16.
lmk::DType data_dtype(const char* op, int64_t code) {
  switch (code) {
    case static_cast<int64_t>(lmk::DType::F32):
    case static_cast<int64_t>(lmk::DType::F16):
    case static_cast<int64_t>(lmk::DType::BF16):
      return static_cast<lmk::DType>(code);
    case static_cast<int64_t>(lmk::DType::F64):
      value_error(op, "dtype", "F64 (3) is not supported by the CUDA kernels (F32/F16/BF16)");
    default:
      value_error(op, "dtype",
                  "expected a DType code F32=0, F16=1 or BF16=2, got " + std::to_string(code));
  }
}

void check_cuda(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return;
  std::ostringstream msg;
  msg << "lmkernels._cuda." << op << ": " << cudaGetErrorName(err) << " ("
      << cudaGetErrorString(err) << ")";
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice) {
    msg << "; no usable NVIDIA GPU/driver on this machine";
  }
  throw std::runtime_error(msg.str());
}

cudaStream_t as_stream(uint64_t s) { return reinterpret_cast<cudaStream_t>(s); }

void softmax_fwd(uint64_t x, uint64_t y, int64_t dtype, int64_t rows, int64_t cols, double scale,
                 bool log, uint64_t mask, int64_t mask_dtype, uint64_t mask_row_offsets,
                 int64_t mask_col_stride, bool causal, int64_t causal_rows, uint64_t stream) {
  const char* op = "softmax_fwd";
  lmk::SoftmaxFwdParams p;
  p.dtype = data_dtype(op, dtype);
  check_nonnegative(op, "rows", rows);
  check_nonnegative(op, "cols", cols);
  if (mask_col_stride != 0 && mask_col_stride != 1) {
    value_error(op, "mask_col_stride", "expected 0 or 1, got " + std::to_string(mask_col_stride));
  }
  if (causal && causal_rows < 1) {
    value_error(op, "causal_rows",
                "expected >= 1 with causal=True, got " + std::to_string(causal_rows));
  }
  if (mask != 0) {
    const bool ok = mask_dtype == static_cast<int64_t>(lmk::DType::Bool) ||
                    mask_dtype == static_cast<int64_t>(lmk::DType::F32) || mask_dtype == dtype;
    if (!ok) {
      value_error(op, "mask_dtype",
                  "expected Bool=4, F32=0 or the data dtype (" + std::to_string(dtype) + "), got " +
                      std::to_string(mask_dtype));
    }
  }
  if (rows == 0 || cols == 0) return;  // nothing to launch
  check_pointer(op, "x", x);
  check_pointer(op, "y", y);
  if (mask != 0) check_pointer(op, "mask_row_offsets", mask_row_offsets);

  p.x = reinterpret_cast<const void*>(x);
  p.y = reinterpret_cast<void*>(y);
  p.rows = rows;
  p.cols = cols;
  p.scale = scale;
  p.log = log;
  if (mask != 0) {
    p.mask.ptr = reinterpret_cast<const void*>(mask);
    p.mask.dtype = static_cast<lmk::DType>(mask_dtype);
    p.mask.row_offsets = reinterpret_cast<const int64_t*>(mask_row_offsets);
    p.mask.col_stride = mask_col_stride;
  }
  p.causal = causal;
  p.causal_rows = causal ? causal_rows : 1;
  check_cuda(lmk::softmax_fwd_cuda(p, as_stream(stream)), op);
}

void softmax_bwd(uint64_t y, uint64_t dy, uint64_t dx, int64_t dtype, int64_t rows, int64_t cols,
                 double scale, bool log, uint64_t stream) {
  const char* op = "softmax_bwd";
  lmk::SoftmaxBwdParams p;
  p.dtype = data_dtype(op, dtype);
  check_nonnegative(op, "rows", rows);
  check_nonnegative(op, "cols", cols);
  if (rows == 0 || cols == 0) return;
  check_pointer(op, "y", y);
  check_pointer(op, "dy", dy);
  check_pointer(op, "dx", dx);
  p.y = reinterpret_cast<const void*>(y);
  p.dy = reinterpret_cast<const void*>(dy);
  p.dx = reinterpret_cast<void*>(dx);
  p.rows = rows;
  p.cols = cols;
  p.scale = scale;
  p.log = log;
  check_cuda(lmk::softmax_bwd_cuda(p, as_stream(stream)), op);
}

// Residual-stream dtype S of a norm kernel: the data dtype T, or F32 when T is 16-bit.
lmk::DType stream_dtype_of(const char* op, lmk::DType data, int64_t code) {
  const bool sixteen = data == lmk::DType::F16 || data == lmk::DType::BF16;
  if (code == static_cast<int64_t>(data) ||
      (sixteen && code == static_cast<int64_t>(lmk::DType::F32))) {
    return static_cast<lmk::DType>(code);
  }
  value_error(op, "stream_dtype",
              "expected the data dtype (" + std::to_string(static_cast<int64_t>(data)) + ")" +
                  (sixteen ? std::string(" or F32 (0)") : std::string()) + ", got " +
                  std::to_string(code));
}

void norm_fwd(uint64_t x, uint64_t residual, uint64_t weight, uint64_t bias, uint64_t y, uint64_t h,
              uint64_t mean, uint64_t rstd, int64_t dtype, int64_t stream_dtype, int64_t rows,
              int64_t cols, double eps, bool rms, uint64_t stream) {
  const char* op = "norm_fwd";
  lmk::NormFwdParams p;
  p.dtype = data_dtype(op, dtype);
  p.stream_dtype = stream_dtype_of(op, p.dtype, stream_dtype);
  check_nonnegative(op, "rows", rows);
  check_nonnegative(op, "cols", cols);
  if ((residual == 0) != (h == 0)) {
    value_error(op, "h",
                residual == 0 ? "given without a residual (expected 0)"
                              : "null data pointer: h is required with a residual");
  }
  if (rms && mean != 0) value_error(op, "mean", "must be 0 (absent) for rms_norm");
  if (rows == 0 || cols == 0) return;  // nothing to launch
  check_pointer(op, "x", x);
  check_pointer(op, "y", y);
  check_pointer(op, "rstd", rstd);
  if (!rms) check_pointer(op, "mean", mean);

  p.x = reinterpret_cast<const void*>(x);
  p.residual = reinterpret_cast<const void*>(residual);
  p.weight = reinterpret_cast<const void*>(weight);
  p.bias = reinterpret_cast<const void*>(bias);
  p.y = reinterpret_cast<void*>(y);
  p.h = reinterpret_cast<void*>(h);
  p.mean = reinterpret_cast<void*>(mean);
  p.rstd = reinterpret_cast<void*>(rstd);
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.rms = rms;
  check_cuda(lmk::norm_fwd_cuda(p, as_stream(stream)), op);
}

void norm_bwd(uint64_t dy, uint64_t dh_out, uint64_t h, uint64_t weight, uint64_t mean,
              uint64_t rstd, uint64_t dh, uint64_t dw, uint64_t db, uint64_t workspace,
              int64_t dtype, int64_t stream_dtype, int64_t rows, int64_t cols, bool rms,
              uint64_t stream) {
  const char* op = "norm_bwd";
  lmk::NormBwdParams p;
  p.dtype = data_dtype(op, dtype);
  p.stream_dtype = stream_dtype_of(op, p.dtype, stream_dtype);
  check_nonnegative(op, "rows", rows);
  check_nonnegative(op, "cols", cols);
  if (rms && mean != 0) value_error(op, "mean", "must be 0 (absent) for rms_norm");
  const bool want_params = dw != 0 || db != 0;
  // cols == 0: nothing to compute; rows == 0: only dw/db (zeros) when they are wanted
  if (cols == 0 || (rows == 0 && !want_params)) return;
  if (rows > 0) {
    check_pointer(op, "dy", dy);
    check_pointer(op, "h", h);
    check_pointer(op, "rstd", rstd);
    check_pointer(op, "dh", dh);
    if (!rms) check_pointer(op, "mean", mean);
    if (want_params && workspace == 0) {
      value_error(op, "workspace",
                  "null data pointer: 2 * ceil(rows / " + std::to_string(lmk::kNormRowsPerBlock) +
                      ") * cols fp32 elements are needed for dw/db");
    }
  }

  p.dy = reinterpret_cast<const void*>(dy);
  p.dh_out = reinterpret_cast<const void*>(dh_out);
  p.h = reinterpret_cast<const void*>(h);
  p.weight = reinterpret_cast<const void*>(weight);
  p.mean = reinterpret_cast<const void*>(mean);
  p.rstd = reinterpret_cast<const void*>(rstd);
  p.dh = reinterpret_cast<void*>(dh);
  p.dw = reinterpret_cast<void*>(dw);
  p.db = reinterpret_cast<void*>(db);
  p.rows = rows;
  p.cols = cols;
  p.rms = rms;
  check_cuda(lmk::norm_bwd_cuda(p, reinterpret_cast<float*>(workspace), as_stream(stream)), op);
}

// Data dtype of the embedding kernels: F32, F16, BF16 or F64 (a copy and an fp64 sum).
lmk::DType embedding_dtype(const char* op, int64_t code) {
  switch (code) {
    case static_cast<int64_t>(lmk::DType::F32):
    case static_cast<int64_t>(lmk::DType::F16):
    case static_cast<int64_t>(lmk::DType::BF16):
    case static_cast<int64_t>(lmk::DType::F64):
      return static_cast<lmk::DType>(code);
    default:
      value_error(
          op, "dtype",
          "expected a DType code F32=0, F16=1, BF16=2 or F64=3, got " + std::to_string(code));
  }
}

void check_aligned(const char* op, const char* arg, uint64_t p, int64_t bytes) {
  if (p % static_cast<uint64_t>(bytes) != 0) {
    value_error(op, arg,
                "data pointer not aligned to its " + std::to_string(bytes) + "-byte elements");
  }
}

void embedding_check(uint64_t idx, uint64_t status, bool idx64, int64_t n, int64_t num_embeddings,
                     uint64_t stream) {
  const char* op = "embedding_check";
  check_nonnegative(op, "n", n);
  check_nonnegative(op, "num_embeddings", num_embeddings);
  if (n == 0) return;
  check_pointer(op, "idx", idx);
  check_pointer(op, "status", status);
  check_cuda(lmk::embedding_check_cuda(reinterpret_cast<const void*>(idx), idx64, n, num_embeddings,
                                       reinterpret_cast<int64_t*>(status), as_stream(stream)),
             op);
}

void embedding_fwd(uint64_t weight, uint64_t idx, uint64_t out, uint64_t status, int64_t dtype,
                   bool idx64, int64_t n, int64_t dim, int64_t num_embeddings,
                   int64_t weight_stride, uint64_t stream) {
  const char* op = "embedding_fwd";
  lmk::EmbeddingFwdParams p;
  p.dtype = embedding_dtype(op, dtype);
  check_nonnegative(op, "n", n);
  check_nonnegative(op, "dim", dim);
  check_nonnegative(op, "num_embeddings", num_embeddings);
  check_nonnegative(op, "weight_stride", weight_stride);
  if (n == 0) return;  // nothing to check or copy; status is not written
  check_pointer(op, "idx", idx);
  check_pointer(op, "status", status);
  if (dim > 0 && num_embeddings > 0) {
    check_pointer(op, "weight", weight);
    check_pointer(op, "out", out);
    check_aligned(op, "weight", weight, lmk::dtype_size(p.dtype));
    check_aligned(op, "out", out, lmk::dtype_size(p.dtype));
  }
  p.weight = reinterpret_cast<const void*>(weight);
  p.idx = reinterpret_cast<const void*>(idx);
  p.idx64 = idx64;
  p.out = reinterpret_cast<void*>(out);
  p.n = n;
  p.dim = dim;
  p.num_embeddings = num_embeddings;
  p.weight_stride = weight_stride;
  check_cuda(lmk::embedding_fwd_cuda(p, reinterpret_cast<int64_t*>(status), as_stream(stream)), op);
}

void embedding_bwd(uint64_t dy, uint64_t dw, uint64_t order, uint64_t seg_offsets,
                   uint64_t seg_rows, uint64_t seg_scale, int64_t dtype, int64_t nseg, int64_t n,
                   int64_t dim, int64_t num_embeddings, int64_t padding_idx, uint64_t stream) {
  const char* op = "embedding_bwd";
  lmk::EmbeddingBwdSortedParams p;
  p.dtype = embedding_dtype(op, dtype);
  check_nonnegative(op, "nseg", nseg);
  check_nonnegative(op, "n", n);
  check_nonnegative(op, "dim", dim);
  check_nonnegative(op, "num_embeddings", num_embeddings);
  if (nseg > n) {
    value_error(
        op, "nseg",
        "more segments (" + std::to_string(nseg) + ") than tokens (" + std::to_string(n) + ")");
  }
  if (padding_idx < -1 || padding_idx >= num_embeddings) {
    value_error(op, "padding_idx",
                "expected -1 (none) or a row in [0, " + std::to_string(num_embeddings) + "), got " +
                    std::to_string(padding_idx));
  }
  if (nseg == 0 || dim == 0) return;  // nothing to write (the caller zeroed dw)
  check_pointer(op, "dy", dy);
  check_pointer(op, "dw", dw);
  check_pointer(op, "order", order);
  check_pointer(op, "seg_offsets", seg_offsets);
  check_pointer(op, "seg_rows", seg_rows);
  check_aligned(op, "dy", dy, lmk::dtype_size(p.dtype));
  check_aligned(op, "dw", dw, lmk::dtype_size(p.dtype));
  p.dy = reinterpret_cast<const void*>(dy);
  p.dw = reinterpret_cast<void*>(dw);
  p.order = reinterpret_cast<const int64_t*>(order);
  p.seg_offsets = reinterpret_cast<const int64_t*>(seg_offsets);
  p.seg_rows = reinterpret_cast<const int64_t*>(seg_rows);
  p.seg_scale = reinterpret_cast<const void*>(seg_scale);
  p.nseg = nseg;
  p.n = n;
  p.dim = dim;
  p.num_embeddings = num_embeddings;
  p.padding_idx = padding_idx;
  check_cuda(lmk::embedding_bwd_cuda(p, as_stream(stream)), op);
}

// A table's row stride: >= dim when the table has rows past the first (a single row's stride
// is never used).
void check_row_stride(const char* op, const char* arg, int64_t stride, int64_t rows, int64_t dim) {
  if (rows > 1 && stride < dim) {
    value_error(op, arg,
                "expected >= dim (" + std::to_string(dim) + ") for a table of " +
                    std::to_string(rows) + " rows, got " + std::to_string(stride));
  }
}

void token_pos_fwd(uint64_t tok_weight, uint64_t ids, uint64_t pos_weight, uint64_t pos,
                   uint64_t inv_freq, uint64_t out, uint64_t status, int64_t dtype, bool ids64,
                   bool pos64, int64_t n, int64_t dim, int64_t num_embeddings, int64_t tok_stride,
                   int64_t num_positions, int64_t pos_stride, double scale, uint64_t stream) {
  const char* op = "token_pos_fwd";
  lmk::TokenPosFwdParams p;
  p.dtype = embedding_dtype(op, dtype);
  check_nonnegative(op, "n", n);
  check_nonnegative(op, "dim", dim);
  check_nonnegative(op, "num_embeddings", num_embeddings);
  check_nonnegative(op, "tok_stride", tok_stride);
  check_nonnegative(op, "num_positions", num_positions);
  check_nonnegative(op, "pos_stride", pos_stride);
  const bool learned = pos_weight != 0;
  if (learned && inv_freq != 0) {
    value_error(op, "inv_freq", "must be 0 (absent) with a learned pos_weight");
  }
  if (!learned && inv_freq == 0) {
    value_error(op, "pos_weight",
                "exactly one of pos_weight (a learned table) and inv_freq (the sinusoid) must be "
                "non-zero, got neither");
  }
  check_row_stride(op, "tok_stride", tok_stride, num_embeddings, dim);
  if (learned) {
    check_row_stride(op, "pos_stride", pos_stride, num_positions, dim);
  } else if (num_positions > lmk::kSinusoidPositions) {
    value_error(op, "num_positions",
                "expected <= 2^31 for the sinusoid, got " + std::to_string(num_positions));
  }
  if (n == 0) return;  // nothing to check or write; status is not written
  check_pointer(op, "ids", ids);
  check_pointer(op, "pos", pos);
  check_pointer(op, "status", status);
  if (dim > 0 && num_embeddings > 0 && num_positions > 0) {
    const int64_t esize = lmk::dtype_size(p.dtype);
    check_pointer(op, "tok_weight", tok_weight);
    check_pointer(op, "out", out);
    check_aligned(op, "tok_weight", tok_weight, esize);
    check_aligned(op, "out", out, esize);
    if (learned) {
      check_aligned(op, "pos_weight", pos_weight, esize);
    } else {
      check_aligned(op, "inv_freq", inv_freq, 8);
    }
  }
  p.tok_weight = reinterpret_cast<const void*>(tok_weight);
  p.ids = reinterpret_cast<const void*>(ids);
  p.ids64 = ids64;
  p.pos_weight = reinterpret_cast<const void*>(pos_weight);
  p.pos = reinterpret_cast<const void*>(pos);
  p.pos64 = pos64;
  p.inv_freq = reinterpret_cast<const double*>(inv_freq);
  p.scale = scale;
  p.out = reinterpret_cast<void*>(out);
  p.n = n;
  p.dim = dim;
  p.num_embeddings = num_embeddings;
  p.tok_stride = tok_stride;
  p.num_positions = num_positions;
  p.pos_stride = pos_stride;
  check_cuda(lmk::token_pos_fwd_cuda(p, reinterpret_cast<int64_t*>(status), as_stream(stream)), op);
}

void rotary(uint64_t x, uint64_t out, uint64_t cos, uint64_t sin, uint64_t cos_off,
            uint64_t sin_off, int64_t dtype, int64_t cs_dtype, int64_t rows, int64_t d,
            bool interleaved, bool backward, uint64_t stream) {
  const char* op = "rotary";
  lmk::RotaryParams p;
  p.dtype = embedding_dtype(op, dtype);  // F32, F16, BF16 or F64
  const bool sixteen = p.dtype == lmk::DType::F16 || p.dtype == lmk::DType::BF16;
  if (cs_dtype != dtype && !(sixteen && cs_dtype == static_cast<int64_t>(lmk::DType::F32))) {
    value_error(op, "cs_dtype",
                "expected the data dtype (" + std::to_string(dtype) + ")" +
                    (sixteen ? std::string(" or F32 (0)") : std::string()) + ", got " +
                    std::to_string(cs_dtype));
  }
  p.cs_dtype = static_cast<lmk::DType>(cs_dtype);
  check_nonnegative(op, "rows", rows);
  check_nonnegative(op, "d", d);
  if (d % 2 != 0) value_error(op, "d", "expected an even size, got " + std::to_string(d));
  if (rows == 0 || d == 0) return;  // nothing to launch
  check_pointer(op, "x", x);
  check_pointer(op, "out", out);
  check_pointer(op, "cos", cos);
  check_pointer(op, "sin", sin);
  check_pointer(op, "cos_off", cos_off);
  check_pointer(op, "sin_off", sin_off);
  const int64_t esize = lmk::dtype_size(p.dtype), csize = lmk::dtype_size(p.cs_dtype);
  check_aligned(op, "x", x, esize);
  check_aligned(op, "out", out, esize);
  check_aligned(op, "cos", cos, csize);
  check_aligned(op, "sin", sin, csize);
  check_aligned(op, "cos_off", cos_off, 8);
  check_aligned(op, "sin_off", sin_off, 8);
  p.x = reinterpret_cast<const void*>(x);
  p.out = reinterpret_cast<void*>(out);
  p.cos = reinterpret_cast<const void*>(cos);
  p.sin = reinterpret_cast<const void*>(sin);
  p.cos_off = reinterpret_cast<const int64_t*>(cos_off);
  p.sin_off = reinterpret_cast<const int64_t*>(sin_off);
  p.rows = rows;
  p.d = d;
  p.interleaved = interleaved;
  p.backward = backward;
  check_cuda(lmk::rotary_cuda(p, as_stream(stream)), op);
}

// ------------------------------------------------------------------ attention

// Element strides of a 4-D view: n values (batch, head, sequence; the mask adds its key stride).
std::vector<int64_t> attn_strides(const char* op, const char* arg, const std::vector<int64_t>& s,
                                  size_t n) {
  if (s.size() != n) {
    value_error(
        op, arg,
        "expected " + std::to_string(n) + " element strides, got " + std::to_string(s.size()));
  }
  for (int64_t v : s) {
    if (v < 0) value_error(op, arg, "expected strides >= 0, got " + std::to_string(v));
  }
  return s;
}

// The checks shared by attention_fwd and attention_bwd, filling p's shapes and options. Returns
// false when there is nothing to launch (B, Hq or, for the forward, L is zero).
bool attn_common(const char* op, lmk::AttnParams& p, int64_t dtype, uint64_t mask,
                 int64_t mask_dtype, const std::vector<int64_t>& mask_strides, int64_t B,
                 int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t E, int64_t Ev, double scale,
                 int64_t window_left, int64_t window_right, bool bottom_right, uint64_t cu_q,
                 uint64_t cu_k, uint64_t seed, int64_t drop_threshold, double drop_scale) {
  p.dtype = data_dtype(op, dtype);
  check_nonnegative(op, "B", B);
  check_nonnegative(op, "Hq", Hq);
  check_nonnegative(op, "Hk", Hk);
  check_nonnegative(op, "L", L);
  check_nonnegative(op, "S", S);
  check_nonnegative(op, "E", E);
  check_nonnegative(op, "Ev", Ev);
  const std::string max_dim = std::to_string(lmk::kAttnMaxHeadDim);
  if (E > lmk::kAttnMaxHeadDim) {
    value_error(op, "E",
                "expected <= " + max_dim + " (the CUDA kernels' largest head dim), got " +
                    std::to_string(E));
  }
  if (Ev > lmk::kAttnMaxHeadDim) {
    value_error(op, "Ev",
                "expected <= " + max_dim + " (the CUDA kernels' largest head dim), got " +
                    std::to_string(Ev));
  }
  if (Hq > 0 && (Hk < 1 || Hq % Hk != 0)) {
    value_error(op, "Hk",
                "expected a divisor of Hq (" + std::to_string(Hq) + "), got " + std::to_string(Hk));
  }
  if (B > INT32_MAX || Hq > INT32_MAX) {
    value_error(op, B > INT32_MAX ? "B" : "Hq", "expected < 2^31");
  }
  if (window_left < -1) {
    value_error(op, "window_left",
                "expected >= -1 (-1: unbounded), got " + std::to_string(window_left));
  }
  if (window_right < -1) {
    value_error(op, "window_right",
                "expected >= -1 (-1: unbounded), got " + std::to_string(window_right));
  }
  if ((cu_q == 0) != (cu_k == 0)) {
    value_error(op, cu_q == 0 ? "cu_q" : "cu_k",
                "cu_q and cu_k are given together (varlen) or not at all");
  }
  if (cu_q != 0) {
    check_aligned(op, "cu_q", cu_q, 4);
    check_aligned(op, "cu_k", cu_k, 4);
  }
  const auto ms = attn_strides(op, "mask_strides", mask_strides, 4);
  if (mask != 0) {
    if (cu_q != 0) value_error(op, "mask", "a mask is only supported for dense batches (cu_q = 0)");
    // bool, additive of the data dtype, or additive fp32 (on 16-bit data: added unrounded)
    const bool ok = mask_dtype == static_cast<int64_t>(lmk::DType::Bool) || mask_dtype == dtype ||
                    mask_dtype == static_cast<int64_t>(lmk::DType::F32);
    if (!ok) {
      value_error(op, "mask_dtype",
                  "the mask's dtype must be Bool=4, the data dtype (" + std::to_string(dtype) +
                      ") or F32=0, got " + std::to_string(mask_dtype));
    }
    p.mask_dtype = static_cast<lmk::DType>(mask_dtype);
    check_aligned(op, "mask", mask, lmk::dtype_size(p.mask_dtype));
    p.mask = reinterpret_cast<const void*>(mask);
    p.m_sb = ms[0], p.m_sh = ms[1], p.m_sl = ms[2], p.m_ss = ms[3];
  }
  p.B = B, p.Hq = Hq, p.Hk = Hk, p.L = L, p.S = S, p.E = E, p.Ev = Ev;
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  p.bottom_right = bottom_right;
  p.cu_q = reinterpret_cast<const int32_t*>(cu_q);
  p.cu_k = reinterpret_cast<const int32_t*>(cu_k);
  if (drop_threshold < 0 || drop_threshold > int64_t{0xFFFFFFFF}) {
    value_error(op, "drop_threshold",
                "expected 0 (no dropout) .. 2^32 - 1, got " + std::to_string(drop_threshold));
  }
  if (drop_threshold > 0 && !(std::isfinite(drop_scale) && drop_scale >= 1.0)) {
    value_error(op, "drop_scale",
                "expected 2^32 / (2^32 - drop_threshold) >= 1, got " + std::to_string(drop_scale));
  }
  p.seed = seed;
  p.drop_threshold = static_cast<uint32_t>(drop_threshold);
  p.drop_scale = drop_threshold > 0 ? drop_scale : 1.0;
  return B > 0 && Hq > 0;
}

// A data tensor's pointer: non-null and aligned when it has elements.
void attn_pointer(const char* op, const char* arg, uint64_t ptr, bool needed, lmk::DType dtype) {
  if (!needed) return;
  check_pointer(op, arg, ptr);
  check_aligned(op, arg, ptr, lmk::dtype_size(dtype));
}

void attention_fwd(uint64_t q, uint64_t k, uint64_t v, uint64_t out, uint64_t lse, uint64_t mask,
                   int64_t dtype, int64_t mask_dtype, const std::vector<int64_t>& q_strides,
                   const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides,
                   const std::vector<int64_t>& out_strides,
                   const std::vector<int64_t>& mask_strides, int64_t B, int64_t Hq, int64_t Hk,
                   int64_t L, int64_t S, int64_t E, int64_t Ev, double scale, int64_t window_left,
                   int64_t window_right, bool bottom_right, uint64_t cu_q, uint64_t cu_k,
                   uint64_t seed, int64_t drop_threshold, double drop_scale, uint64_t stream) {
  const char* op = "attention_fwd";
  lmk::AttnParams p;
  const auto qs = attn_strides(op, "q_strides", q_strides, 3);
  const auto ks = attn_strides(op, "k_strides", k_strides, 3);
  const auto vs = attn_strides(op, "v_strides", v_strides, 3);
  const auto os = attn_strides(op, "out_strides", out_strides, 3);
  if (!attn_common(op, p, dtype, mask, mask_dtype, mask_strides, B, Hq, Hk, L, S, E, Ev, scale,
                   window_left, window_right, bottom_right, cu_q, cu_k, seed, drop_threshold,
                   drop_scale) ||
      L == 0) {
    return;  // nothing to launch
  }
  attn_pointer(op, "q", q, E > 0, p.dtype);
  attn_pointer(op, "k", k, E > 0 && S > 0, p.dtype);
  attn_pointer(op, "v", v, Ev > 0 && S > 0, p.dtype);
  attn_pointer(op, "out", out, Ev > 0, p.dtype);
  attn_pointer(op, "lse", lse, true, lmk::DType::F32);
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(out);
  p.lse = reinterpret_cast<void*>(lse);
  p.q_sb = qs[0], p.q_sh = qs[1], p.q_sl = qs[2];
  p.k_sb = ks[0], p.k_sh = ks[1], p.k_sl = ks[2];
  p.v_sb = vs[0], p.v_sh = vs[1], p.v_sl = vs[2];
  p.o_sb = os[0], p.o_sh = os[1], p.o_sl = os[2];
  check_cuda(lmk::attention_fwd_cuda(p, as_stream(stream)), op);
}

void attention_bwd(uint64_t dout, uint64_t q, uint64_t k, uint64_t v, uint64_t out, uint64_t lse,
                   uint64_t mask, uint64_t dq, uint64_t dk, uint64_t dv, uint64_t workspace,
                   int64_t dtype, int64_t mask_dtype, const std::vector<int64_t>& dout_strides,
                   const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                   const std::vector<int64_t>& v_strides, const std::vector<int64_t>& out_strides,
                   const std::vector<int64_t>& dq_strides, const std::vector<int64_t>& dk_strides,
                   const std::vector<int64_t>& dv_strides, const std::vector<int64_t>& mask_strides,
                   int64_t B, int64_t Hq, int64_t Hk, int64_t L, int64_t S, int64_t E, int64_t Ev,
                   double scale, int64_t window_left, int64_t window_right, bool bottom_right,
                   uint64_t cu_q, uint64_t cu_k, uint64_t seed, int64_t drop_threshold,
                   double drop_scale, uint64_t stream) {
  const char* op = "attention_bwd";
  lmk::AttnBwdParams p;
  lmk::AttnParams& f = p.fwd;
  const auto dos = attn_strides(op, "dout_strides", dout_strides, 3);
  const auto qs = attn_strides(op, "q_strides", q_strides, 3);
  const auto ks = attn_strides(op, "k_strides", k_strides, 3);
  const auto vs = attn_strides(op, "v_strides", v_strides, 3);
  const auto os = attn_strides(op, "out_strides", out_strides, 3);
  const auto dqs = attn_strides(op, "dq_strides", dq_strides, 3);
  const auto dks = attn_strides(op, "dk_strides", dk_strides, 3);
  const auto dvs = attn_strides(op, "dv_strides", dv_strides, 3);
  if (!attn_common(op, f, dtype, mask, mask_dtype, mask_strides, B, Hq, Hk, L, S, E, Ev, scale,
                   window_left, window_right, bottom_right, cu_q, cu_k, seed, drop_threshold,
                   drop_scale) ||
      (L == 0 && S == 0)) {
    return;  // nothing to launch
  }
  const bool rows = L > 0, keys = S > 0;
  attn_pointer(op, "dout", dout, rows && Ev > 0, f.dtype);
  attn_pointer(op, "q", q, rows && E > 0, f.dtype);
  attn_pointer(op, "k", k, keys && E > 0, f.dtype);
  attn_pointer(op, "v", v, keys && Ev > 0, f.dtype);
  attn_pointer(op, "out", out, rows && Ev > 0, f.dtype);
  attn_pointer(op, "lse", lse, rows, lmk::DType::F32);
  attn_pointer(op, "dq", dq, rows && E > 0, f.dtype);
  attn_pointer(op, "dk", dk, keys && E > 0, f.dtype);
  attn_pointer(op, "dv", dv, keys && Ev > 0, f.dtype);
  if (rows) {
    check_pointer(op, "workspace", workspace);
    check_aligned(op, "workspace", workspace, 4);
  }
  f.q = reinterpret_cast<const void*>(q);
  f.k = reinterpret_cast<const void*>(k);
  f.v = reinterpret_cast<const void*>(v);
  f.o = reinterpret_cast<void*>(out);
  f.lse = reinterpret_cast<void*>(lse);
  f.q_sb = qs[0], f.q_sh = qs[1], f.q_sl = qs[2];
  f.k_sb = ks[0], f.k_sh = ks[1], f.k_sl = ks[2];
  f.v_sb = vs[0], f.v_sh = vs[1], f.v_sl = vs[2];
  f.o_sb = os[0], f.o_sh = os[1], f.o_sl = os[2];
  p.dout = reinterpret_cast<const void*>(dout);
  p.do_sb = dos[0], p.do_sh = dos[1], p.do_sl = dos[2];
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.dq_sb = dqs[0], p.dq_sh = dqs[1], p.dq_sl = dqs[2];
  p.dk_sb = dks[0], p.dk_sh = dks[1], p.dk_sl = dks[2];
  p.dv_sb = dvs[0], p.dv_sh = dvs[1], p.dv_sl = dvs[2];
  check_cuda(lmk::attention_bwd_cuda(p, reinterpret_cast<float*>(workspace), as_stream(stream)),
             op);
}

// A double for an error message: 6 significant digits ("1.5", "1e-09", "nan", "-inf").
std::string fmt(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

void cross_entropy(uint64_t logits, uint64_t target, uint64_t weight, uint64_t scale, uint64_t loss,
                   uint64_t grad, int64_t dtype, int64_t rows, int64_t cols,
                   int64_t logits_row_stride, int64_t grad_row_stride, int64_t scale_stride,
                   int64_t ignore_index, double label_smoothing, double softcap, double z_loss,
                   uint64_t stream) {
  const char* op = "cross_entropy";
  lmk::CrossEntropyParams p;
  p.dtype = data_dtype(op, dtype);
  check_nonnegative(op, "rows", rows);
  check_nonnegative(op, "cols", cols);
  if (rows > 1 && logits_row_stride < cols) {
    value_error(op, "logits_row_stride",
                "expected >= cols (" + std::to_string(cols) + ") for " + std::to_string(rows) +
                    " rows, got " + std::to_string(logits_row_stride));
  }
  if (grad != 0 && rows > 1 && grad_row_stride < cols) {
    value_error(op, "grad_row_stride",
                "expected >= cols (" + std::to_string(cols) + ") for " + std::to_string(rows) +
                    " rows, got " + std::to_string(grad_row_stride));
  }
  if (grad != 0 && grad == logits && rows > 1 && grad_row_stride != logits_row_stride) {
    value_error(op, "grad_row_stride",
                "an in-place gradient (grad == logits) needs logits_row_stride (" +
                    std::to_string(logits_row_stride) + "), got " +
                    std::to_string(grad_row_stride));
  }
  if (scale_stride != 0 && scale_stride != 1) {
    value_error(op, "scale_stride",
                "expected 0 (one scale) or 1 (one per row), got " + std::to_string(scale_stride));
  }
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0)) {
    value_error(op, "label_smoothing", "expected a value in [0, 1], got " + fmt(label_smoothing));
  }
  if (!(softcap >= 0.0) || !std::isfinite(softcap)) {
    value_error(op, "softcap", "expected a finite value >= 0 (0: none), got " + fmt(softcap));
  }
  if (!(z_loss >= 0.0) || !std::isfinite(z_loss)) {
    value_error(op, "z_loss", "expected a finite value >= 0, got " + fmt(z_loss));
  }
  if (loss == 0 && grad == 0 && rows > 0 && cols > 0) {
    value_error(op, "loss", "both loss and grad are null: at least one output is needed");
  }
  if (rows == 0) return;  // nothing to launch
  const int64_t esize = lmk::dtype_size(p.dtype);
  check_pointer(op, "target", target);
  check_aligned(op, "target", target, 8);
  if (cols > 0) {
    check_pointer(op, "logits", logits);
    check_aligned(op, "logits", logits, esize);
    if (grad != 0) check_aligned(op, "grad", grad, esize);
  }
  check_aligned(op, "weight", weight, 4);
  check_aligned(op, "scale", scale, 4);
  check_aligned(op, "loss", loss, 4);

  p.logits = reinterpret_cast<const void*>(logits);
  p.rows = rows;
  p.cols = cols;
  p.logits_row_stride = logits_row_stride;
  p.target = reinterpret_cast<const int64_t*>(target);
  p.weight = reinterpret_cast<const void*>(weight);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.softcap = softcap;
  p.z_loss = z_loss;
  p.scale = reinterpret_cast<const void*>(scale);
  p.scale_stride = scale_stride;
  p.loss = reinterpret_cast<void*>(loss);
  p.grad = reinterpret_cast<void*>(grad);
  p.grad_row_stride = grad_row_stride;
  check_cuda(lmk::cross_entropy_cuda(p, as_stream(stream)), op);
}

// What this module was built for. Never raises and never needs a GPU.
py::dict build_info() {
  std::vector<std::string> archs;
  std::string list = LMK_CUDA_ARCHS;
  std::string item;
  std::istringstream in(list);
  while (std::getline(in, item, ',')) {
    if (!item.empty()) archs.push_back("sm_" + item);
  }
  py::dict d;
  d["archs"] = archs;
  d["ptx_arch"] = archs.empty() ? std::string() : "compute_" + archs.back().substr(3);
  d["cuda_version"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  cudaGetLastError();            // do not leave an error behind for the next launch to report
  d["driver_version"] = driver;  // 0: no driver
  d["cudart"] = "static";
  d["dtypes"] = std::vector<std::string>{"F32", "F16", "BF16"};
  d["ops"] = std::vector<std::string>{"softmax_fwd",   "softmax_bwd",     "norm_fwd",
                                      "norm_bwd",      "embedding_check", "embedding_fwd",
                                      "embedding_bwd", "token_pos_fwd",   "rotary",
                                      "attention_fwd", "attention_bwd",   "cross_entropy"};
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lmkernels CUDA kernels (torch-free; pointers, sizes and streams as ints)";

  m.def("softmax_fwd", &softmax_fwd, py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("scale"), py::arg("log"), py::arg("mask"), py::arg("mask_dtype"),
        py::arg("mask_row_offsets"), py::arg("mask_col_stride"), py::arg("causal"),
        py::arg("causal_rows"), py::arg("stream"),
        "y[rows, cols] = softmax (log: log_softmax) of scale * x (+ float mask) over cols.\n"
        "x, y: contiguous device pointers of the given lmk::DType (F32=0, F16=1, BF16=2).\n"
        "mask: 0 for none, else a device pointer; row r's mask row starts at element\n"
        "mask_row_offsets[r] (a device int64 array of length rows), column stride 0 or 1;\n"
        "mask_dtype Bool=4 (true = masked out), F32=0 or the data dtype (added after\n"
        "scaling). causal: column j of row r is masked when j > r % causal_rows.\n"
        "A fully masked row gives 0 (log: -inf). Asynchronous on `stream` (cudaStream_t).");
  m.def("softmax_bwd", &softmax_bwd, py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("scale"), py::arg("log"), py::arg("stream"),
        "dx = scale * y * (dy - sum(dy * y))  or, for log,  dx = scale * (dy - exp(y) * sum(dy)),\n"
        "per row of contiguous [rows, cols] device tensors. Asynchronous on `stream`.");
  m.def("norm_fwd", &norm_fwd, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("y"), py::arg("h"), py::arg("mean"), py::arg("rstd"),
        py::arg("dtype"), py::arg("stream_dtype"), py::arg("rows"), py::arg("cols"), py::arg("eps"),
        py::arg("rms"), py::arg("stream"),
        "layer_norm (rms: rms_norm) of each row of contiguous [rows, cols] device tensors, with\n"
        "an optional fused residual add (csrc/include/lmk/norm.h): h = x + residual rounded to\n"
        "stream_dtype, y = (h - mean) * rstd * weight + bias rounded to dtype.\n"
        "x, y: dtype (F32=0, F16=1, BF16=2); residual, h: stream_dtype (the dtype, or F32 for\n"
        "16-bit data); weight, bias (cols), mean, rstd (rows): fp32. residual/h (together),\n"
        "weight, bias: 0 when absent; mean: 0 for rms. Asynchronous on `stream`.");
  m.def("norm_bwd", &norm_bwd, py::arg("dy"), py::arg("dh_out"), py::arg("h"), py::arg("weight"),
        py::arg("mean"), py::arg("rstd"), py::arg("dh"), py::arg("dw"), py::arg("db"),
        py::arg("workspace"), py::arg("dtype"), py::arg("stream_dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("rms"), py::arg("stream"),
        "Gradients of norm_fwd from the saved h, mean, rstd: dh (stream_dtype, + dh_out when\n"
        "given), and the fp32 dw, db (0: not wanted), reduced deterministically through the fp32\n"
        "workspace of 2 * ceil(rows / 64) * cols elements. dy: dtype. Asynchronous on `stream`.");
  m.def("embedding_check", &embedding_check, py::arg("idx"), py::arg("status"), py::arg("idx64"),
        py::arg("n"), py::arg("num_embeddings"), py::arg("stream"),
        "status (a device int64) <- the first position t of the n indices (int64 when idx64,\n"
        "else int32) with idx[t] outside [0, num_embeddings), or -1. n == 0 does nothing.\n"
        "Asynchronous on `stream`: read status after synchronising.");
  m.def("embedding_fwd", &embedding_fwd, py::arg("weight"), py::arg("idx"), py::arg("out"),
        py::arg("status"), py::arg("dtype"), py::arg("idx64"), py::arg("n"), py::arg("dim"),
        py::arg("num_embeddings"), py::arg("weight_stride"), py::arg("stream"),
        "The index check of embedding_check into status, then out[t, :] = weight[idx[t], :]\n"
        "(out (n, dim) contiguous; weight rows weight_stride elements apart; dtype F32=0,\n"
        "F16=1, BF16=2, F64=3) unless an index was bad, in which case nothing is written and\n"
        "no bad row is read. dim == 0: the check only. Asynchronous on `stream`.");
  m.def("embedding_bwd", &embedding_bwd, py::arg("dy"), py::arg("dw"), py::arg("order"),
        py::arg("seg_offsets"), py::arg("seg_rows"), py::arg("seg_scale"), py::arg("dtype"),
        py::arg("nseg"), py::arg("n"), py::arg("dim"), py::arg("num_embeddings"),
        py::arg("padding_idx"), py::arg("stream"),
        "Deterministic embedding gradient from tokens sorted stably by row: for each of the nseg\n"
        "segments s, dw[seg_rows[s], :] = seg_scale[s] * (the dy rows of the tokens\n"
        "order[seg_offsets[s] .. seg_offsets[s + 1]) added in that order in fp32 (fp64 for\n"
        "F64)), rounded once to dtype; seg_scale (fp32, fp64 for F64) 0 = no scaling. The row\n"
        "padding_idx (-1: none) is skipped. dw must be zeroed by the caller; dy (n, dim) and\n"
        "dw (num_embeddings, dim) contiguous; order, seg_offsets, seg_rows int64.\n"
        "Asynchronous on `stream`.");
  m.def("token_pos_fwd", &token_pos_fwd, py::arg("tok_weight"), py::arg("ids"),
        py::arg("pos_weight"), py::arg("pos"), py::arg("inv_freq"), py::arg("out"),
        py::arg("status"), py::arg("dtype"), py::arg("ids64"), py::arg("pos64"), py::arg("n"),
        py::arg("dim"), py::arg("num_embeddings"), py::arg("tok_stride"), py::arg("num_positions"),
        py::arg("pos_stride"), py::arg("scale"), py::arg("stream"),
        "The fused token + positional embedding (lmk/embedding.h). First the check of the n ids\n"
        "(int64 when ids64, else int32) against [0, num_embeddings) and the n positions (pos64)\n"
        "against [0, num_positions): status (a device int64) <- the first bad t of ids, or\n"
        "(every id good) n + the first bad t of pos, or -1. Then, unless an index was bad (then\n"
        "nothing is written), out[t, :] = scale * tok_weight[ids[t], :] + P[pos[t], :] in fp32\n"
        "(fp64 for F64), rounded once to dtype (F32=0, F16=1, BF16=2, F64=3); out (n, dim)\n"
        "contiguous; table rows tok_stride / pos_stride elements apart. P: the learned table\n"
        "pos_weight (inv_freq 0), or the sinusoid (pos_weight 0; inv_freq a device array of\n"
        "ceil(dim / 2) fp64 frequencies; num_positions <= 2^31): sin in even columns, cos in odd\n"
        "ones. n == 0 does nothing; dim == 0: the check only. Asynchronous on `stream`.");
  m.def(
      "rotary", &rotary, py::arg("x"), py::arg("out"), py::arg("cos"), py::arg("sin"),
      py::arg("cos_off"), py::arg("sin_off"), py::arg("dtype"), py::arg("cs_dtype"),
      py::arg("rows"), py::arg("d"), py::arg("interleaved"), py::arg("backward"), py::arg("stream"),
      "Rotary position embedding of contiguous (rows, d) device tensors (lmk/rotary.h), d even:\n"
      "out = x * cos + rot(x) * sin (rot: rotate_half, or rotate_every_two when interleaved),\n"
      "or with backward its transpose dx = dy * cos - rot(dy * sin). Row r reads cos / sin at\n"
      "element offsets cos_off[r] / sin_off[r] (device int64 arrays of length rows), unit column\n"
      "stride. dtype F32=0, F16=1, BF16=2, F64=3 (x, out); cs_dtype (cos, sin): dtype, or F32\n"
      "for 16-bit data. fp32 math (fp64 for F64), rounded once. out may equal x.\n"
      "Asynchronous on `stream`.");
  m.def(
      "attention_fwd", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
      py::arg("lse"), py::arg("mask"), py::arg("dtype"), py::arg("mask_dtype"),
      py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
      py::arg("mask_strides"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("L"),
      py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("scale"), py::arg("window_left"),
      py::arg("window_right"), py::arg("bottom_right"), py::arg("cu_q"), py::arg("cu_k"),
      py::arg("seed"), py::arg("drop_threshold"), py::arg("drop_scale"), py::arg("stream"),
      "Flash attention forward (lmk/attention.h): out (B, Hq, L, Ev) and lse (B, Hq, L) fp32\n"
      "contiguous from q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev): device pointers of\n"
      "dtype F32=0, F16=1 or BF16=2, each with (batch, head, sequence) element strides and a\n"
      "contiguous last dim; E, Ev <= 256; Hq a multiple of Hk (GQA). mask: 0 or a (B, Hq, L, S)\n"
      "view (4 strides, 0 for broadcast dims) of Bool=4 (false = -inf), the data dtype or F32=0\n"
      "(added to the scaled scores; F32 on 16-bit data unrounded). window_left / window_right: -1 "
      "unbounded (causal:\n"
      "window_right = 0), around the diagonal i (+ S_b - L_b with bottom_right). cu_q / cu_k:\n"
      "0, or device int32 offsets (B + 1 each) of a packed varlen batch (then L / S are the\n"
      "longest lengths, lse is (1, Hq, total_q), no mask). Dropout (lmk/philox.h): seed (uint64),\n"
      "drop_threshold (0 = none .. 2^32 - 1), drop_scale = 2^32 / (2^32 - drop_threshold);\n"
      "varlen counters use the packed positions. Rows without keys: zeros and lse = -inf.\n"
      "Asynchronous on `stream`.");
  m.def("attention_bwd", &attention_bwd, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("mask"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("workspace"), py::arg("dtype"), py::arg("mask_dtype"),
        py::arg("dout_strides"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("out_strides"), py::arg("dq_strides"), py::arg("dk_strides"), py::arg("dv_strides"),
        py::arg("mask_strides"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("L"),
        py::arg("S"), py::arg("E"), py::arg("Ev"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("bottom_right"), py::arg("cu_q"), py::arg("cu_k"),
        py::arg("seed"), py::arg("drop_threshold"), py::arg("drop_scale"), py::arg("stream"),
        "Flash attention backward (lmk/attention.h): dq, dk, dv (their own strides) from dout,\n"
        "the forward's inputs and its out and lse; arguments as attention_fwd. workspace: fp32\n"
        "device memory laid out like lse (B * Hq * L elements; varlen Hq * total_q).\n"
        "Deterministic (no atomics). Asynchronous on `stream`.");
  m.def("cross_entropy", &cross_entropy, py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("scale"), py::arg("loss"), py::arg("grad"), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("logits_row_stride"), py::arg("grad_row_stride"),
        py::arg("scale_stride"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("softcap"), py::arg("z_loss"), py::arg("stream"),
        "Cross entropy per row of (rows, cols) logits (lmk/cross_entropy.h): loss[r] (fp32) and,\n"
        "when grad is given, the gradient of scale_r * loss[r] rounded once to dtype. With\n"
        "z = softcap * tanh(x / softcap) (softcap 0: z = x), t = target[r] (int64), w = weight\n"
        "(fp32, cols; 0: ones), eps = label_smoothing:\n"
        "loss = (1 - eps) w_t (lse - z_t) + eps / cols (sum w lse - sum w z) + z_loss lse^2.\n"
        "A row whose target is ignore_index or outside [0, cols) is ignored (loss 0, gradient 0,\n"
        "no logit read). logits, grad: dtype F32=0, F16=1 or BF16=2, rows logits_row_stride /\n"
        "grad_row_stride elements apart, unit column stride; grad may equal logits (in place,\n"
        "same stride). scale: 0 (1), or fp32 read at r * scale_stride (0: one value, 1: per row).\n"
        "loss or grad may be 0 (not written), not both. Asynchronous on `stream`.");
  m.def("build_info", &build_info,
        "dict: archs (machine code), ptx_arch, cuda_version (CUDART_VERSION), driver_version\n"
        "(0 = no driver), cudart, dtypes, ops.");
}
