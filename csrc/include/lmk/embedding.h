// Embedding lookup and its weight gradient: the contract every backend implements.
//
// Forward: out[t, :] = weight[idx[t], :] for t < n, a plain copy in the weight's dtype T
// (f32, f16, bf16, f64). Indices are int32 or int64 and are checked first: any idx[t] outside
// [0, num_embeddings) makes the call write nothing and report the first such t.
//
// Backward (deterministic): dw[v, :] = scale_v * sum over t with idx[t] == v, in increasing t,
// of dy[t, :], accumulated in A (f32; f64 for f64 data) and rounded once to T, where
// scale_v = 1 / count(v) (rounded to A) with scale_grad_by_freq, else 1. Rows never looked up, and
// the row padding_idx (when >= 0), are zeros. The order of the additions depends only on idx, so
// the result is bitwise the same on every call and for any thread count. Indices are those the
// forward checked.
#pragma once
#include <cstdint>

#include "lmk/common.h"

namespace lmk {

struct EmbeddingFwdParams {
  DType dtype = DType::F32;      // T of weight and out
  const void* weight = nullptr;  // (num_embeddings, dim), rows weight_stride elements apart
  const void* idx = nullptr;     // (n) int32 or int64
  bool idx64 = true;
  void* out = nullptr;  // (n, dim) contiguous
  int64_t n = 0, dim = 0, num_embeddings = 0, weight_stride = 0;
};

struct EmbeddingBwdParams {
  DType dtype = DType::F32;   // T of dy and dw
  const void* dy = nullptr;   // (n, dim) contiguous
  const void* idx = nullptr;  // (n) int32 or int64, all in [0, num_embeddings)
  bool idx64 = true;
  void* dw = nullptr;  // (num_embeddings, dim) contiguous
  int64_t n = 0, dim = 0, num_embeddings = 0;
  int64_t padding_idx = -1;  // a row that gets no gradient, or -1
  bool scale_grad_by_freq = false;
};

}  // namespace lmk
