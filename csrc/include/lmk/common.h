// Shared, torch-free definitions used by the CPU and the CUDA kernels.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LMK_HD __host__ __device__ __forceinline__
#else
#define LMK_HD inline
#endif

namespace lmk {

// Element type of a kernel argument. The values are part of the CUDA module's Python ABI
// (lmkernels/ops/_dtypes.py keeps the same table).
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, Bool = 4 };

// Bytes per element of a DType.
LMK_HD constexpr int64_t dtype_size(DType t) {
  return t == DType::F64 ? 8 : t == DType::F32 ? 4 : t == DType::Bool ? 1 : 2;
}

}  // namespace lmk
