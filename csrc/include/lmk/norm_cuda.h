// Entry points of the CUDA normalisation kernels (csrc/cuda/norm.cu): layer_norm / rms_norm with
// an optional fused residual add, forward and backward, as the contract lmk/norm.h states. Shared
// by the kernels and the pybind11 module. Asynchronous on `stream`; the return value is the
// status of the launches (the first error of cudaGetLastError after each launch).
//
// Types: T (dtype) is F32, F16 or BF16; S (stream_dtype) is T, or F32 when T is 16-bit;
// weight, bias, mean, rstd, dw, db and the workspace are fp32.
// cudaErrorNotSupported: fp64 data; cudaErrorInvalidValue: arguments outside the contract.
//
// forward: cols == 0 or rows == 0 launches nothing.
// backward: cols == 0 launches nothing; rows == 0 with dw or db given writes zeros to them (the
// sum over no rows). `workspace` holds 2 * ceil(rows / kNormRowsPerBlock) * cols fp32 values
// (norm_bwd_workspace_elems); it is needed only when dw or db is given.
#pragma once
#include <cuda_runtime_api.h>

#include "lmk/norm.h"

namespace lmk {

// Elements (fp32) of the backward workspace: the dw and db partial sums of every
// kNormRowsPerBlock-row block.
constexpr int64_t norm_bwd_workspace_elems(int64_t rows, int64_t cols) {
  return 2 * ((rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock) * cols;
}

cudaError_t norm_fwd_cuda(const NormFwdParams& p, cudaStream_t stream);
cudaError_t norm_bwd_cuda(const NormBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace lmk
