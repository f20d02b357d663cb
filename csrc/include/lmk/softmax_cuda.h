// Entry points of the CUDA softmax kernels (csrc/cuda/softmax.cu), shared by the kernels and the
// pybind11 module. Asynchronous on `stream`; the return value is the launch status
// (cudaGetLastError after the launch). rows == 0 or cols == 0 launches nothing.
// cudaErrorNotSupported: fp64 data; cudaErrorInvalidValue: arguments outside the contract.
#pragma once
#include <cuda_runtime_api.h>

#include "lmk/softmax.h"

namespace lmk {

cudaError_t softmax_fwd_cuda(const SoftmaxFwdParams& p, cudaStream_t stream);
cudaError_t softmax_bwd_cuda(const SoftmaxBwdParams& p, cudaStream_t stream);

}  // namespace lmk
