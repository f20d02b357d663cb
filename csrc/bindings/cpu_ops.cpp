// The only torch-facing C++ file: registers the CPU kernels as torch ops (namespace
// lmkernels_cpu), validates arguments once, fills the plain kernel parameter structs and calls
// the AVX2 or the baseline variant of each kernel, chosen once from at::get_cpu_capability()
// (which honours ATEN_CPU_CAPABILITY; AVX512 machines use the AVX2 variant).
//
// Also the Python extension module `lmkernels._C`: it has no Python-level content, importing it
// loads the library and runs the registrations below.
#include <ATen/MemoryOverlap.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>

#include "lmk/attention.h"
#include "lmk/cross_entropy.h"
#include "lmk/embedding.h"
#include "lmk/norm.h"
#include "lmk/rotary.h"
#include "lmk/softmax.h"

namespace lmk::cpu {
namespace DEFAULT {
void cross_entropy(const CrossEntropyParams& p);
void rotary(const RotaryParams& p);
int64_t embedding_fwd(const EmbeddingFwdParams& p);
void embedding_bwd(const EmbeddingBwdParams& p);
int64_t token_pos_fwd(const TokenPosFwdParams& p);
void softmax_fwd(const SoftmaxFwdParams& p);
void softmax_bwd(const SoftmaxBwdParams& p);
void norm_fwd(const NormFwdParams& p);
void norm_bwd(const NormBwdParams& p);
void attention_fwd(const AttnParams& p);
void attention_bwd(const AttnBwdParams& p);
}  // namespace DEFAULT
namespace AVX2 {
void cross_entropy(const CrossEntropyParams& p);
void rotary(const RotaryParams& p);
int64_t embedding_fwd(const EmbeddingFwdParams& p);
void embedding_bwd(const EmbeddingBwdParams& p);
int64_t token_pos_fwd(const TokenPosFwdParams& p);
void softmax_fwd(const SoftmaxFwdParams& p);
void softmax_bwd(const SoftmaxBwdParams& p);
void norm_fwd(const NormFwdParams& p);
void norm_bwd(const NormBwdParams& p);
void attention_fwd(const AttnParams& p);
void attention_bwd(const AttnBwdParams& p);
}  // namespace AVX2
}  // namespace lmk::cpu

namespace lmk {
namespace {

// ------------------------------------------------------------------ kernel variant

bool use_avx2() {
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap.rfind("AVX2", 0) == 0 || cap.rfind("AVX512", 0) == 0;
  }();
  return avx2;
}

std::string capability() { return use_avx2() ? "AVX2" : "DEFAULT"; }

// ------------------------------------------------------------------ argument checks

#define LMK_CHECK_CPU_2D(t, name)                                                                  \
  TORCH_CHECK((t).device().is_cpu(), "lmkernels_cpu: " name " must be a CPU tensor, got ",         \
              (t).device());                                                                       \
  TORCH_CHECK((t).dim() == 2, "lmkernels_cpu: " name " must be 2-D (rows, cols), got ", (t).dim(), \
              "-D");                                                                               \
  TORCH_CHECK((t).is_contiguous(), "lmkernels_cpu: " name " must be contiguous")

#define LMK_CHECK_LIKE(t, ref, name, ref_name)                                                    \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(),                                           \
              "lmkernels_cpu: " name " must have " ref_name "'s dtype ", (ref).scalar_type(),     \
              ", got ", (t).scalar_type());                                                       \
  TORCH_CHECK((t).sizes() == (ref).sizes(),                                                       \
              "lmkernels_cpu: " name " must have " ref_name "'s shape ", (ref).sizes(), ", got ", \
              (t).sizes())

DType data_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    case at::kDouble:
      return DType::F64;
    default:
      TORCH_CHECK(false, "lmkernels_cpu: ", name,
                  " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
}

// ------------------------------------------------------------------ ops

void softmax_fwd(const at::Tensor& x, const at::Tensor& y, double scale, bool log,
                 const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& mask_row_offsets, int64_t mask_col_stride,
                 bool causal, int64_t causal_rows) {
  LMK_CHECK_CPU_2D(x, "x");
  LMK_CHECK_CPU_2D(y, "y");
  LMK_CHECK_LIKE(y, x, "y", "x");
  SoftmaxFwdParams p;
  p.dtype = data_dtype(x, "x");
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.scale = scale;
  p.log = log;
  p.causal = causal;
  if (causal) {
    TORCH_CHECK(causal_rows >= 1, "lmkernels_cpu: causal_rows must be >= 1, got ", causal_rows);
    p.causal_rows = causal_rows;
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "lmkernels_cpu: mask must be a CPU tensor, got ", m.device());
    if (m.scalar_type() == at::kBool) {
      p.mask.dtype = DType::Bool;
    } else if (m.scalar_type() == at::kFloat) {
      p.mask.dtype = DType::F32;
    } else {
      TORCH_CHECK(m.scalar_type() == x.scalar_type(),
                  "lmkernels_cpu: mask must be bool, float32 or x's dtype ", x.scalar_type(),
                  ", got ", m.scalar_type());
      p.mask.dtype = p.dtype;
    }
    TORCH_CHECK(mask_row_offsets.has_value(),
                "lmkernels_cpu: mask_row_offsets is required with a mask");
    const at::Tensor& off = *mask_row_offsets;
    TORCH_CHECK(off.device().is_cpu(), "lmkernels_cpu: mask_row_offsets must be a CPU tensor");
    TORCH_CHECK(off.scalar_type() == at::kLong,
                "lmkernels_cpu: mask_row_offsets must be int64, got ", off.scalar_type());
    TORCH_CHECK(off.dim() == 1 && off.size(0) == p.rows && off.is_contiguous(),
                "lmkernels_cpu: mask_row_offsets must be a contiguous 1-D tensor of length rows = ",
                p.rows, ", got shape ", off.sizes());
    TORCH_CHECK(mask_col_stride == 0 || mask_col_stride == 1,
                "lmkernels_cpu: mask_col_stride must be 0 or 1, got ", mask_col_stride);
    // Every mask row must lie inside the mask's storage (the mask may be a broadcast view).
    const int64_t avail =
        static_cast<int64_t>(m.storage().nbytes() / m.itemsize()) - m.storage_offset();
    const int64_t span = p.cols > 0 ? (p.cols - 1) * mask_col_stride + 1 : 0;
    const int64_t* o = off.data_ptr<int64_t>();
    for (int64_t r = 0; r < p.rows && span > 0; ++r) {
      TORCH_CHECK(o[r] >= 0 && o[r] + span <= avail, "lmkernels_cpu: mask_row_offsets[", r,
                  "] = ", o[r], " puts a mask row outside the mask's storage (", avail,
                  " elements, row span ", span, ")");
    }
    p.mask.ptr = m.data_ptr();
    p.mask.row_offsets = o;
    p.mask.col_stride = mask_col_stride;
  }
  if (use_avx2()) {
    cpu::AVX2::softmax_fwd(p);
  } else {
    cpu::DEFAULT::softmax_fwd(p);
  }
}

void softmax_bwd(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& dx, double scale,
                 bool log) {
  LMK_CHECK_CPU_2D(y, "y");
  LMK_CHECK_CPU_2D(dy, "dy");
  LMK_CHECK_CPU_2D(dx, "dx");
  LMK_CHECK_LIKE(dy, y, "dy", "y");
  LMK_CHECK_LIKE(dx, y, "dx", "y");
  SoftmaxBwdParams p;
  p.dtype = data_dtype(y, "y");
  p.y = y.data_ptr();
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.rows = y.size(0);
  p.cols = y.size(1);
  p.scale = scale;
  p.log = log;
  if (use_avx2()) {
    cpu::AVX2::softmax_bwd(p);
  } else {
    cpu::DEFAULT::softmax_bwd(p);
  }
}

// ------------------------------------------------------------------ norm (lmk/norm.h)

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// An optional (cols,) or (rows,) vector of the accumulation type; its pointer or null.
const void* vec_arg(const std::optional<at::Tensor>& t, const char* name, int64_t len,
                    at::ScalarType acc, bool required = false) {
  TORCH_CHECK(t.has_value() || !required, "lmkernels_cpu: ", name, " is required here");
  if (!t.has_value()) return nullptr;
  const at::Tensor& v = *t;
  TORCH_CHECK(v.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(v.scalar_type() == acc, "lmkernels_cpu: ", name, " must be ", acc, ", got ",
              v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len && v.is_contiguous(), "lmkernels_cpu: ", name,
              " must be a contiguous 1-D tensor of length ", len, ", got shape ", v.sizes());
  return v.data_ptr();
}

// weight / bias: an optional contiguous (cols,) vector of the accumulation type, or (16-bit
// data) of the data's dtype, which is widened here into `owned` (exact), so the kernels always
// read fp32 and Python makes no conversion call. Returns the fp32 (or fp64) pointer or null.
const void* param_arg(const std::optional<at::Tensor>& t, const char* name, int64_t len,
                      const at::Tensor& x, std::unique_ptr<float[]>& owned) {
  const at::ScalarType acc = acc_type(x.scalar_type());
  if (!t.has_value() || t->scalar_type() == acc) return vec_arg(t, name, len, acc);
  const at::Tensor& v = *t;
  const at::ScalarType xt = x.scalar_type();
  const bool half = xt == at::kHalf || xt == at::kBFloat16;
  TORCH_CHECK(half && v.scalar_type() == xt, "lmkernels_cpu: ", name, " must be ", acc,
              half ? " or x's dtype " : "", half ? c10::toString(xt) : "", ", got ",
              v.scalar_type());
  TORCH_CHECK(v.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len && v.is_contiguous(), "lmkernels_cpu: ", name,
              " must be a contiguous 1-D tensor of length ", len, ", got shape ", v.sizes());
  owned.reset(new float[len]);
  if (xt == at::kHalf) {
    const auto* src = static_cast<const c10::Half*>(v.data_ptr());
    for (int64_t i = 0; i < len; ++i) owned[i] = static_cast<float>(src[i]);
  } else {
    const auto* src = static_cast<const c10::BFloat16*>(v.data_ptr());
    for (int64_t i = 0; i < len; ++i) owned[i] = static_cast<float>(src[i]);
  }
  return owned.get();
}

// The residual-stream dtype S of `t` for data dtype x: x's own, or float32 for 16-bit x.
DType stream_arg(const at::Tensor& t, const at::Tensor& x, const char* name) {
  LMK_CHECK_CPU_2D(t, "residual stream tensor");
  TORCH_CHECK(t.sizes() == x.sizes(), "lmkernels_cpu: ", name, " must have shape ", x.sizes(),
              ", got ", t.sizes());
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (half && t.scalar_type() == at::kFloat),
              "lmkernels_cpu: ", name, " must have dtype ", x.scalar_type(),
              half ? " or float32" : "", ", got ", t.scalar_type());
  return data_dtype(t, name);
}

void norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const at::Tensor& y, const std::optional<at::Tensor>& h,
              const std::optional<at::Tensor>& mean, const at::Tensor& rstd, double eps, bool rms) {
  LMK_CHECK_CPU_2D(x, "x");
  LMK_CHECK_CPU_2D(y, "y");
  LMK_CHECK_LIKE(y, x, "y", "x");
  NormFwdParams p;
  p.dtype = data_dtype(x, "x");
  p.stream_dtype = p.dtype;
  p.rows = x.size(0);
  p.cols = x.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());
  TORCH_CHECK(residual.has_value() == h.has_value(),
              "lmkernels_cpu: h must be given exactly when residual is");
  if (residual.has_value()) {
    p.stream_dtype = stream_arg(*residual, x, "residual");
    TORCH_CHECK(stream_arg(*h, x, "h") == p.stream_dtype,
                "lmkernels_cpu: h must have residual's dtype");
    p.residual = residual->data_ptr();
    p.h = h->data_ptr();
  }
  std::unique_ptr<float[]> w32, b32;
  p.weight = param_arg(weight, "weight", p.cols, x, w32);
  p.bias = param_arg(bias, "bias", p.cols, x, b32);
  p.mean = const_cast<void*>(vec_arg(mean, "mean", p.rows, acc, !rms));
  p.rstd = const_cast<void*>(vec_arg(rstd, "rstd", p.rows, acc, true));
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.eps = eps;
  p.rms = rms;
  if (use_avx2()) {
    cpu::AVX2::norm_fwd(p);
  } else {
    cpu::DEFAULT::norm_fwd(p);
  }
}

void norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh_out, const at::Tensor& h,
              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mean,
              const at::Tensor& rstd, const at::Tensor& dh, const std::optional<at::Tensor>& dw,
              const std::optional<at::Tensor>& db, bool rms) {
  LMK_CHECK_CPU_2D(dy, "dy");
  NormBwdParams p;
  p.dtype = data_dtype(dy, "dy");
  p.rows = dy.size(0);
  p.cols = dy.size(1);
  const at::ScalarType acc = acc_type(dy.scalar_type());
  p.stream_dtype = stream_arg(h, dy, "h");
  TORCH_CHECK(stream_arg(dh, dy, "dh") == p.stream_dtype, "lmkernels_cpu: dh must have h's dtype");
  if (dh_out.has_value()) {
    TORCH_CHECK(stream_arg(*dh_out, dy, "dh_out") == p.stream_dtype,
                "lmkernels_cpu: dh_out must have h's dtype");
    p.dh_out = dh_out->data_ptr();
  }
  std::unique_ptr<float[]> w32;
  p.weight = param_arg(weight, "weight", p.cols, dy, w32);
  p.mean = vec_arg(mean, "mean", p.rows, acc, !rms);
  p.rstd = vec_arg(rstd, "rstd", p.rows, acc, true);
  p.dw = const_cast<void*>(vec_arg(dw, "dw", p.cols, acc));
  p.db = const_cast<void*>(vec_arg(db, "db", p.cols, acc));
  p.dy = dy.data_ptr();
  p.h = h.data_ptr();
  p.dh = dh.data_ptr();
  p.rms = rms;
  if (use_avx2()) {
    cpu::AVX2::norm_bwd(p);
  } else {
    cpu::DEFAULT::norm_bwd(p);
  }
}

// ------------------------------------------------------------------ embedding (lmk/embedding.h)

// idx: a contiguous 1-D int32 / int64 tensor; returns whether it is int64.
bool index_arg(const at::Tensor& idx, const char* name = "idx") {
  TORCH_CHECK(idx.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
              "lmkernels_cpu: ", name, " must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous(), "lmkernels_cpu: ", name,
              " must be contiguous 1-D");
  return idx.scalar_type() == at::kLong;
}

int64_t index_at(const at::Tensor& idx, int64_t t) {
  return idx.scalar_type() == at::kLong ? idx.data_ptr<int64_t>()[t] : idx.data_ptr<int32_t>()[t];
}

void embedding_fwd(const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& out) {
  TORCH_CHECK(weight.device().is_cpu(), "lmkernels_cpu: weight must be a CPU tensor");
  TORCH_CHECK(weight.dim() == 2 && (weight.size(1) <= 1 || weight.stride(1) == 1),
              "lmkernels_cpu: weight must be 2-D with contiguous rows");
  LMK_CHECK_CPU_2D(out, "out");
  TORCH_CHECK(out.scalar_type() == weight.scalar_type(),
              "lmkernels_cpu: out must have weight's dtype");
  EmbeddingFwdParams p;
  p.dtype = data_dtype(weight, "weight");
  p.idx64 = index_arg(idx);
  p.n = idx.size(0);
  p.dim = weight.size(1);
  p.num_embeddings = weight.size(0);
  p.weight_stride = weight.stride(0);
  TORCH_CHECK(out.size(0) == p.n && out.size(1) == p.dim, "lmkernels_cpu: out must have shape (",
              p.n, ", ", p.dim, "), got ", out.sizes());
  p.weight = weight.data_ptr();
  p.idx = idx.data_ptr();
  p.out = out.data_ptr();
  const int64_t bad = use_avx2() ? cpu::AVX2::embedding_fwd(p) : cpu::DEFAULT::embedding_fwd(p);
  TORCH_CHECK_INDEX(bad < 0, "index ", bad < 0 ? 0 : index_at(idx, bad), " (at position ", bad,
                    " of the flattened input) is out of range for an embedding of ",
                    p.num_embeddings, " rows");
}

// A (rows, dim) table of `like`'s dtype with contiguous rows.
void table_arg(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == dim && (dim <= 1 || t.stride(1) == 1),
              "lmkernels_cpu: ", name, " must be 2-D with ", dim, " contiguous columns, got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lmkernels_cpu: ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

void token_pos_fwd(const at::Tensor& tok_weight, const at::Tensor& ids,
                   const std::optional<at::Tensor>& pos_weight, const at::Tensor& pos,
                   const std::optional<at::Tensor>& inv_freq, double scale, const at::Tensor& out) {
  LMK_CHECK_CPU_2D(out, "out");
  const int64_t dim = out.size(1);
  table_arg(tok_weight, "tok_weight", out, dim);
  TokenPosFwdParams p;
  p.dtype = data_dtype(out, "out");
  p.ids64 = index_arg(ids, "ids");
  p.pos64 = index_arg(pos, "pos");
  TORCH_CHECK(p.ids64 == p.pos64, "lmkernels_cpu: ids and pos must share an index dtype");
  p.n = ids.size(0);
  TORCH_CHECK(pos.size(0) == p.n && out.size(0) == p.n,
              "lmkernels_cpu: ids, pos and out must have the same number of rows");
  p.dim = dim;
  p.num_embeddings = tok_weight.size(0);
  p.tok_stride = tok_weight.stride(0);
  TORCH_CHECK(pos_weight.has_value() != inv_freq.has_value(),
              "lmkernels_cpu: give exactly one of pos_weight and inv_freq");
  if (pos_weight) {
    table_arg(*pos_weight, "pos_weight", out, dim);
    p.pos_weight = pos_weight->data_ptr();
    p.num_positions = pos_weight->size(0);
    p.pos_stride = pos_weight->stride(0);
  } else {
    TORCH_CHECK(inv_freq->device().is_cpu() && inv_freq->scalar_type() == at::kDouble &&
                    inv_freq->dim() == 1 && inv_freq->is_contiguous() &&
                    inv_freq->size(0) == (dim + 1) / 2,
                "lmkernels_cpu: inv_freq must be a contiguous float64 vector of ", (dim + 1) / 2,
                " values");
    p.inv_freq = inv_freq->data_ptr<double>();
    p.num_positions = kSinusoidPositions;
  }
  p.tok_weight = tok_weight.data_ptr();
  p.ids = ids.data_ptr();
  p.pos = pos.data_ptr();
  p.scale = scale;
  p.out = out.data_ptr();
  const int64_t bad = use_avx2() ? cpu::AVX2::token_pos_fwd(p) : cpu::DEFAULT::token_pos_fwd(p);
  TORCH_CHECK_INDEX(bad < 0 || bad >= p.n, "index ", bad < 0 ? 0 : index_at(ids, bad),
                    " (at position ", bad,
                    " of the flattened input) is out of range for an "
                    "embedding of ",
                    p.num_embeddings, " rows");
  if (bad >= 0 && p.pos_weight) {
    TORCH_CHECK_INDEX(false, "position ", index_at(pos, bad - p.n), " (element ", bad - p.n,
                      " of the flattened positions) is out of range for a positional table of ",
                      p.num_positions, " rows");
  }
  TORCH_CHECK_INDEX(bad < 0, "position ", bad < 0 ? 0 : index_at(pos, bad - p.n), " (element ",
                    bad - p.n,
                    " of the flattened positions) is out of range for the sinusoidal "
                    "encoding's range [0, 2^31)");
}

void embedding_bwd(const at::Tensor& dy, const at::Tensor& idx, const at::Tensor& dw,
                   int64_t padding_idx, bool scale_grad_by_freq, double grad_scale) {
  LMK_CHECK_CPU_2D(dy, "dy");
  LMK_CHECK_CPU_2D(dw, "dw");
  TORCH_CHECK(dw.scalar_type() == dy.scalar_type(), "lmkernels_cpu: dw must have dy's dtype");
  EmbeddingBwdParams p;
  p.dtype = data_dtype(dy, "dy");
  p.idx64 = index_arg(idx);
  p.n = idx.size(0);
  p.dim = dy.size(1);
  p.num_embeddings = dw.size(0);
  TORCH_CHECK(dy.size(0) == p.n, "lmkernels_cpu: dy must have one row per index");
  TORCH_CHECK(dw.size(1) == p.dim, "lmkernels_cpu: dw must have dy's columns");
  TORCH_CHECK(padding_idx >= -1 && padding_idx < p.num_embeddings,
              "lmkernels_cpu: padding_idx must be -1 or a row of dw, got ", padding_idx);
  // The forward checked the indices; a backward called on its own checks them again here.
  for (int64_t t = 0; t < p.n; ++t) {
    const int64_t v = index_at(idx, t);
    TORCH_CHECK_INDEX(v >= 0 && v < p.num_embeddings, "index ", v, " (at position ", t,
                      ") is out of range for an embedding of ", p.num_embeddings, " rows");
  }
  p.dy = dy.data_ptr();
  p.idx = idx.data_ptr();
  p.dw = dw.data_ptr();
  p.padding_idx = padding_idx;
  p.scale_grad_by_freq = scale_grad_by_freq;
  p.grad_scale = grad_scale;
  if (use_avx2()) {
    cpu::AVX2::embedding_bwd(p);
  } else {
    cpu::DEFAULT::embedding_bwd(p);
  }
}

// ------------------------------------------------------------------ rotary (lmk/rotary.h)

// cos / sin: their storage pointer (element offsets per row come separately), checked against
// the offsets' range so no row reads outside the tensor's storage.
const void* rotary_table(const at::Tensor& t, const at::Tensor& off, const char* name,
                         const at::Tensor& x, int64_t d) {
  TORCH_CHECK(t.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor");
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || (half && t.scalar_type() == at::kFloat),
              "lmkernels_cpu: ", name, " must have x's dtype", half ? " or float32" : "", ", got ",
              t.scalar_type());
  TORCH_CHECK(off.device().is_cpu() && off.scalar_type() == at::kLong && off.dim() == 1 &&
                  off.is_contiguous() && off.size(0) == x.size(0),
              "lmkernels_cpu: ", name, " offsets must be a contiguous int64 vector of x's rows");
  const int64_t span = t.storage().nbytes() / t.element_size() - t.storage_offset();
  if (off.numel() > 0) {
    const auto [lo, hi] =
        std::minmax_element(off.data_ptr<int64_t>(), off.data_ptr<int64_t>() + off.numel());
    TORCH_CHECK(*lo >= 0 && *hi + d <= span, "lmkernels_cpu: ", name,
                " offsets reach outside its storage");
  }
  return t.data_ptr();
}

void rotary(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos,
            const at::Tensor& sin, const at::Tensor& cos_off, const at::Tensor& sin_off,
            bool interleaved, bool backward) {
  LMK_CHECK_CPU_2D(x, "x");
  LMK_CHECK_CPU_2D(out, "out");
  LMK_CHECK_LIKE(out, x, "out", "x");
  RotaryParams p;
  p.dtype = data_dtype(x, "x");
  p.rows = x.size(0);
  p.d = x.size(1);
  TORCH_CHECK(p.d % 2 == 0, "lmkernels_cpu: x's last dim must be even, got ", p.d);
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(),
              "lmkernels_cpu: cos and sin must share a dtype");
  p.cos = rotary_table(cos, cos_off, "cos", x, p.d);
  p.sin = rotary_table(sin, sin_off, "sin", x, p.d);
  p.cs_dtype = data_dtype(cos, "cos");
  p.cos_off = cos_off.data_ptr<int64_t>();
  p.sin_off = sin_off.data_ptr<int64_t>();
  p.x = x.data_ptr();
  p.out = out.data_ptr();
  p.interleaved = interleaved;
  p.backward = backward;
  if (use_avx2()) {
    cpu::AVX2::rotary(p);
  } else {
    cpu::DEFAULT::rotary(p);
  }
}

// ------------------------------------------------------------------ attention (lmk/attention.h)

// A 4-D CPU tensor with a contiguous last dim (any other strides).
void attn_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, "lmkernels_cpu: ", name, " must be 4-D (B, H, L, D), got ", t.dim(),
              "-D");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "lmkernels_cpu: ", name,
              " must have a contiguous last dim, got strides ", t.strides());
}

// t is 4-D with ref's dtype and the given shape.
void attn_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
               at::IntArrayRef shape) {
  attn_4d(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "lmkernels_cpu: ", name,
              " must have q's dtype ", ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "lmkernels_cpu: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// An output the kernels write: no element may alias another (e.g. an expanded view).
void attn_output(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "lmkernels_cpu: ", name,
              " must not overlap itself (an expanded view?), got strides ", t.strides());
}

// Row offsets of a varlen batch: contiguous int32 (nseq + 1), 0, non-decreasing, ending at
// total; max_len must be at least the longest sequence. Returns the pointer.
const int32_t* cu_arg(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len,
                      const char* max_name) {
  TORCH_CHECK(cu.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "lmkernels_cpu: ", name, " must be int32, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1 && cu.is_contiguous(), "lmkernels_cpu: ", name,
              " must be a contiguous 1-D tensor of nseq + 1 >= 1 offsets, got shape ", cu.sizes());
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0, "lmkernels_cpu: ", name, "[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < cu.size(0); ++i) {
    TORCH_CHECK(c[i] >= c[i - 1], "lmkernels_cpu: ", name, " must be non-decreasing, got ",
                c[i - 1], " then ", c[i], " at ", i);
    longest = std::max<int64_t>(longest, c[i] - c[i - 1]);
  }
  TORCH_CHECK(c[cu.size(0) - 1] == total, "lmkernels_cpu: ", name,
              " must end at the packed length ", total, ", got ", c[cu.size(0) - 1]);
  TORCH_CHECK(max_len >= longest, "lmkernels_cpu: ", max_name,
              " must be at least the longest sequence (", longest, "), got ", max_len);
  return c;
}

// Checks q, k, v, out, lse, mask and the options and fills p (out may be the backward's input).
void attn_params(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask, const at::Tensor& out,
                 const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
                 bool bottom_right, const std::optional<at::Tensor>& cu_q,
                 const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, int64_t seed,
                 int64_t drop_threshold, double drop_scale) {
  attn_4d(q, "q");
  p.dtype = data_dtype(q, "q");
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  attn_4d(k, "k");
  TORCH_CHECK(k.size(0) == B && k.size(3) == E, "lmkernels_cpu: k must have shape (", B,
              ", Hk, S, ", E, ") for q of shape ", q.sizes(), ", got ", k.sizes());
  const int64_t Hk = k.size(1), S = k.size(2);
  attn_like(k, "k", q, k.sizes());
  TORCH_CHECK(Hk >= 1 && Hq % Hk == 0, "lmkernels_cpu: q's heads (", Hq,
              ") must be a multiple of k's heads (", Hk, ")");
  attn_4d(v, "v");
  const int64_t Ev = v.size(3);
  attn_like(v, "v", q, {B, Hk, S, Ev});
  attn_like(out, "out", q, {B, Hq, L, Ev});
  attn_output(out, "out");
  const at::ScalarType acc = acc_type(q.scalar_type());
  TORCH_CHECK(lse.device().is_cpu(), "lmkernels_cpu: lse must be a CPU tensor");
  TORCH_CHECK(lse.scalar_type() == acc, "lmkernels_cpu: lse must be ", acc, ", got ",
              lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == L &&
                  lse.is_contiguous(),
              "lmkernels_cpu: lse must be a contiguous (", B, ", ", Hq, ", ", L, ") tensor, got ",
              lse.sizes());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.lse = lse.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2);
  p.B = B, p.Hq = Hq, p.Hk = Hk, p.L = L, p.S = S, p.E = E, p.Ev = Ev;
  p.scale = scale;
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = window_right < 0 ? -1 : window_right;
  p.bottom_right = bottom_right;
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(),
              "lmkernels_cpu: cu_q and cu_k must be given together");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(!cu_q.has_value(), "lmkernels_cpu: mask is not supported with cu_q / cu_k");
    TORCH_CHECK(m.device().is_cpu(), "lmkernels_cpu: mask must be a CPU tensor");
    const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
    const at::ScalarType mt = m.scalar_type();
    TORCH_CHECK_TYPE(mt == at::kBool || mt == q.scalar_type() || (half && mt == at::kFloat),
                     "lmkernels_cpu: mask must be bool, q's dtype ", q.scalar_type(),
                     half ? " or float32" : "", ", got ", mt);
    TORCH_CHECK(m.dim() == 4 && m.sizes() == at::IntArrayRef({B, Hq, L, S}),
                "lmkernels_cpu: mask must have shape (", B, ", ", Hq, ", ", L, ", ", S, "), got ",
                m.sizes());
    p.mask = m.data_ptr();
    p.mask_dtype = mt == at::kBool ? DType::Bool : mt == at::kFloat ? DType::F32 : p.dtype;
    p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_sl = m.stride(2), p.m_ss = m.stride(3);
  }
  if (cu_q.has_value()) {
    TORCH_CHECK(B == 1, "lmkernels_cpu: a varlen batch (cu_q / cu_k) must have B == 1, got ", B);
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), "lmkernels_cpu: cu_q has ", cu_q->numel(),
                " offsets but cu_k has ", cu_k->numel());
    p.cu_q = cu_arg(*cu_q, "cu_q", L, max_q, "max_q");
    p.cu_k = cu_arg(*cu_k, "cu_k", S, max_k, "max_k");
    p.B = cu_q->numel() - 1;
    p.L = max_q;
    p.S = max_k;
  }
  // dropout (lmk/philox.h): the seed's 64 bits arrive as an int64 bit pattern
  TORCH_CHECK_VALUE(drop_threshold >= 0 && drop_threshold <= int64_t{0xFFFFFFFF},
                    "lmkernels_cpu: drop_threshold must be in [0, 2^32 - 1], got ", drop_threshold);
  TORCH_CHECK_VALUE(drop_threshold == 0 || (std::isfinite(drop_scale) && drop_scale >= 1.0),
                    "lmkernels_cpu: drop_scale must be finite and >= 1, got ", drop_scale);
  p.seed = static_cast<uint64_t>(seed);
  p.drop_threshold = static_cast<uint32_t>(drop_threshold);
  p.drop_scale = drop_threshold == 0 ? 1.0 : drop_scale;
}

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, const at::Tensor& out,
                   const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
                   bool bottom_right, const std::optional<at::Tensor>& cu_q,
                   const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                   int64_t seed, int64_t drop_threshold, double drop_scale) {
  AttnParams p;
  attn_params(p, q, k, v, mask, out, lse, scale, window_left, window_right, bottom_right, cu_q,
              cu_k, max_q, max_k, seed, drop_threshold, drop_scale);
  if (use_avx2()) {
    cpu::AVX2::attention_fwd(p);
  } else {
    cpu::DEFAULT::attention_fwd(p);
  }
}

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const std::optional<at::Tensor>& mask, const at::Tensor& dq,
                   const at::Tensor& dk, const at::Tensor& dv, double scale, int64_t window_left,
                   int64_t window_right, bool bottom_right, const std::optional<at::Tensor>& cu_q,
                   const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                   int64_t seed, int64_t drop_threshold, double drop_scale) {
  AttnBwdParams p;
  attn_params(p.fwd, q, k, v, mask, out, lse, scale, window_left, window_right, bottom_right, cu_q,
              cu_k, max_q, max_k, seed, drop_threshold, drop_scale);
  attn_like(dout, "dout", q, out.sizes());
  attn_like(dq, "dq", q, q.sizes());
  attn_like(dk, "dk", q, k.sizes());
  attn_like(dv, "dv", q, v.sizes());
  attn_output(dq, "dq");
  attn_output(dk, "dk");
  attn_output(dv, "dv");
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sl = dout.stride(2);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_sb = dq.stride(0), p.dq_sh = dq.stride(1), p.dq_sl = dq.stride(2);
  p.dk_sb = dk.stride(0), p.dk_sh = dk.stride(1), p.dk_sl = dk.stride(2);
  p.dv_sb = dv.stride(0), p.dv_sh = dv.stride(1), p.dv_sl = dv.stride(2);
  if (use_avx2()) {
    cpu::AVX2::attention_bwd(p);
  } else {
    cpu::DEFAULT::attention_bwd(p);
  }
}

// ------------------------------------------------------------------ cross_entropy
// (lmk/cross_entropy.h)

// A 2-D (rows, cols) CPU tensor whose classes are contiguous (any row stride >= cols).
void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "lmkernels_cpu: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 2, "lmkernels_cpu: ", name, " must be 2-D (rows, cols), got ", t.dim(),
              "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "lmkernels_cpu: ", name,
              " must have unit stride along the classes, got ", t.stride(1));
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), "lmkernels_cpu: ", name,
              " must not overlap itself (row stride ", t.stride(0), " < cols ", t.size(1), ")");
}

void cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& loss, const std::optional<at::Tensor>& grad,
                   int64_t ignore_index, double label_smoothing, double softcap, double z_loss) {
  check_rows(logits, "logits");
  CrossEntropyParams p;
  p.dtype = data_dtype(logits, "logits");
  p.rows = logits.size(0);
  p.cols = logits.size(1);
  p.logits = logits.data_ptr();
  p.logits_row_stride = logits.stride(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == p.rows && target.is_contiguous(),
              "lmkernels_cpu: target must be a contiguous 1-D int64 CPU tensor of length rows = ",
              p.rows, ", got ", target.scalar_type(), " ", target.sizes());
  p.target = target.const_data_ptr<int64_t>();
  p.weight = vec_arg(weight, "weight", p.cols, acc);
  if (scale.has_value()) {
    const at::Tensor& v = *scale;
    TORCH_CHECK(v.dim() <= 1, "lmkernels_cpu: scale must be 0-D or 1-D, got ", v.dim(), "-D");
    p.scale = vec_arg(v.dim() == 0 ? v.reshape({1}) : v, "scale", v.dim() == 0 ? 1 : p.rows, acc);
    p.scale_stride = v.dim() == 0 ? 0 : 1;
  }
  p.loss = const_cast<void*>(vec_arg(loss, "loss", p.rows, acc));
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    check_rows(g, "grad");
    LMK_CHECK_LIKE(g, logits, "grad", "logits");
    const bool same = g.data_ptr() == logits.data_ptr() && g.strides() == logits.strides();
    TORCH_CHECK(same || at::get_overlap_status(g, logits) == at::MemOverlapStatus::No,
                "lmkernels_cpu: grad must be the logits tensor itself or not overlap it");
    p.grad = g.data_ptr();
    p.grad_row_stride = g.stride(0);
  }
  TORCH_CHECK(p.loss != nullptr || p.grad != nullptr,
              "lmkernels_cpu: cross_entropy needs loss or grad (or both)");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "lmkernels_cpu: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "lmkernels_cpu: softcap must be >= 0, got ",
              softcap);
  TORCH_CHECK(z_loss >= 0 && std::isfinite(z_loss), "lmkernels_cpu: z_loss must be >= 0, got ",
              z_loss);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.softcap = softcap;
  p.z_loss = z_loss;
  if (use_avx2()) {
    cpu::AVX2::cross_entropy(p);
  } else {
    cpu::DEFAULT::cross_entropy(p);
  }
}
}  // namespace
}  // namespace lmk

TORCH_LIBRARY(lmkernels_cpu, m) {
  m.def(
      "rotary(Tensor x, Tensor(a!) out, Tensor cos, Tensor sin, Tensor cos_off, Tensor sin_off, "
      "bool interleaved, bool backward) -> ()");
  m.def("embedding_fwd(Tensor weight, Tensor idx, Tensor(a!) out) -> ()");
  m.def(
      "embedding_bwd(Tensor dy, Tensor idx, Tensor(a!) dw, int padding_idx, "
      "bool scale_grad_by_freq, float grad_scale) -> ()");
  m.def(
      "token_pos_fwd(Tensor tok_weight, Tensor ids, Tensor? pos_weight, Tensor pos, "
      "Tensor? inv_freq, float scale, Tensor(a!) out) -> ()");
  m.def(
      "softmax_fwd(Tensor x, Tensor(a!) y, float scale, bool log, Tensor? mask, "
      "Tensor? mask_row_offsets, int mask_col_stride, bool causal, int causal_rows) -> ()");
  m.def("softmax_bwd(Tensor y, Tensor dy, Tensor(a!) dx, float scale, bool log) -> ()");
  m.def(
      "norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!) y, "
      "Tensor(b!)? h, Tensor(c!)? mean, Tensor(d!) rstd, float eps, bool rms) -> ()");
  m.def(
      "norm_bwd(Tensor dy, Tensor? dh_out, Tensor h, Tensor? weight, Tensor? mean, Tensor rstd, "
      "Tensor(a!) dh, Tensor(b!)? dw, Tensor(c!)? db, bool rms) -> ()");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor(a!) out, Tensor(b!) lse, "
      "float scale, int window_left, int window_right, bool bottom_right, Tensor? cu_q, "
      "Tensor? cu_k, int max_q, int max_k, int seed=0, int drop_threshold=0, "
      "float drop_scale=1.0) -> ()");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, float scale, int window_left, "
      "int window_right, bool bottom_right, Tensor? cu_q, Tensor? cu_k, int max_q, int max_k, "
      "int seed=0, int drop_threshold=0, float drop_scale=1.0) -> ()");
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? weight, Tensor? scale, "
      "Tensor(a!)? loss, Tensor(b!)? grad, int ignore_index, float label_smoothing, "
      "float softcap, float z_loss) -> ()");
  m.def("capability() -> str", &lmk::capability);
}

TORCH_LIBRARY_IMPL(lmkernels_cpu, CPU, m) {
  m.impl("rotary", &lmk::rotary);
  m.impl("embedding_fwd", &lmk::embedding_fwd);
  m.impl("embedding_bwd", &lmk::embedding_bwd);
  m.impl("token_pos_fwd", &lmk::token_pos_fwd);
  m.impl("softmax_fwd", &lmk::softmax_fwd);
  m.impl("softmax_bwd", &lmk::softmax_bwd);
  m.impl("norm_fwd", &lmk::norm_fwd);
  m.impl("norm_bwd", &lmk::norm_bwd);
  m.impl("attention_fwd", &lmk::attention_fwd);
  m.impl("attention_bwd", &lmk::attention_bwd);
  m.impl("cross_entropy", &lmk::cross_entropy);
}

// Importable as `lmkernels._C` (an empty module; loading it registers the ops above).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
