// Rotary position embedding: the contract every backend implements.
//
// x is seen as (rows, d) with d even; row r multiplies element-wise with the rows of cos and sin
// that start at element offsets cos_off[r] and sin_off[r] (so cos / sin may be broadcast over
// any dims of x, e.g. the heads). With h = d / 2, forward, NeoX / Hugging Face "rotate_half":
//   out[j]     = x[j] * cos[j]         - x[j + h] * sin[j]          (j < h)
//   out[j + h] = x[j + h] * cos[j + h] + x[j] * sin[j + h]
// interleaved (GPT-J "rotate_every_two"), for pairs (2i, 2i + 1):
//   out[2i]     = x[2i] * cos[2i]         - x[2i + 1] * sin[2i]
//   out[2i + 1] = x[2i + 1] * cos[2i + 1] + x[2i] * sin[2i + 1]
// The backward (the gradient for x) is the transposed map applied to dy:
//   dx[j]     = dy[j] * cos[j]         + dy[j + h] * sin[j + h]
//   dx[j + h] = dy[j + h] * cos[j + h] - dy[j] * sin[j]
// (interleaved likewise with (2i, 2i + 1)). Math in fp32 (fp64 for fp64), rounded once to the
// output type T; x, out of type T, cos and sin of type T or (16-bit T) fp32. out may be x (in
// place): each pair is read before it is written.
#pragma once
#include <cstdint>

#include "lmk/common.h"

namespace lmk {

struct RotaryParams {
  DType dtype = DType::F32;     // T of x and out
  DType cs_dtype = DType::F32;  // of cos and sin: T, or F32
  const void* x = nullptr;      // (rows, d) contiguous
  void* out = nullptr;          // (rows, d) contiguous, may equal x
  const void* cos = nullptr;    // rows at cos_off[r], unit column stride
  const void* sin = nullptr;
  const int64_t* cos_off = nullptr;  // (rows) element offsets
  const int64_t* sin_off = nullptr;
  int64_t rows = 0, d = 0;
  bool interleaved = false;
  bool backward = false;  // apply the transposed map (the gradient for x)
};

}  // namespace lmk
