// Entry point of the CUDA cross-entropy kernel (csrc/cuda/cross_entropy.cu): per-row loss and,
// optionally, the gradient of scale_r * loss_r, as the contract lmk/cross_entropy.h states.
// Shared by the kernel and the pybind11 module. Asynchronous on `stream`; the return value is the
// launch status (cudaGetLastError after the launch).
//
// Types: logits and grad are F32, F16 or BF16 (p.dtype); weight, scale and loss are fp32.
// Pointers are aligned to their elements; grad is either separate from the logits or equal to
// them with the same row stride (the in-place backward).
// rows == 0, or cols == 0 without a loss, launches nothing (cols == 0 with a loss writes zeros:
// every target is out of range, so every row is ignored); otherwise loss or grad is needed.
// cudaErrorNotSupported: fp64 data; cudaErrorInvalidValue: arguments outside the contract.
#pragma once
#include <cuda_runtime_api.h>

#include "lmk/cross_entropy.h"

namespace lmk {

cudaError_t cross_entropy_cuda(const CrossEntropyParams& p, cudaStream_t stream);

}  // namespace lmk
