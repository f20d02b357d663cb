// Entry point of the CUDA rotary kernel (csrc/cuda/rotary.cu), shared by the kernel and the
// pybind11 module; the contract is lmk/rotary.h. Asynchronous on `stream`; the return value is
// the status of the launch (cudaGetLastError after it).
//
// Types: x / out F32, F16, BF16 (fp32 math) or F64 (fp64 math); cos / sin of x's dtype, or F32
// for 16-bit x. cos_off / sin_off: (rows) device int64 element offsets. out may equal x.
// rows == 0 or d == 0: nothing is launched. cudaErrorInvalidValue: arguments outside the
// contract (a negative size, an odd d, a dtype pair not listed, a null pointer).
#pragma once
#include <cuda_runtime_api.h>

#include "lmk/rotary.h"

namespace lmk {

cudaError_t rotary_cuda(const RotaryParams& p, cudaStream_t stream);

}  // namespace lmk
