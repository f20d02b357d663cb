// Rotary position embedding forward and backward (contract: lmk/rotary.h; entry point:
// lmk/rotary_cuda.h). Torch-free: raw pointers, sizes and a stream.
//
// rotary_kernel<T, C, INTERLEAVED, BACKWARD>: one thread per rotated pair, grid-stride over the
// rows * d / 2 pairs of the (rows, d) view (64-bit indices and offsets). Pair p of row r is the
// columns (p, p + h) (rotate_half, h = d / 2) or (2p, 2p + 1) (interleaved); the thread reads
// both elements of x and the four table entries (cos / sin at both columns, from the row's
// cos_off[r] / sin_off[r]), computes in A = fp32 (fp64 for fp64) and writes both outputs,
// rounded once (RNE) to T. Consecutive threads take consecutive pairs, so each warp's loads and
// stores of x, out and the tables are coalesced runs. Every element of out is written by the
// thread that read the same element of x, after the read: out may be x (in place).
// The tables (type C: T, or fp32 for 16-bit T) are read through the read-only cache; x is not
// (it may alias out). The products may fuse into FMAs (nvcc's default; within the tests'
// tolerances); denormals are kept (no --use_fast_math).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lmk/cuda_acc.h"
#include "lmk/rotary.h"
#include "lmk/rotary_cuda.h"

namespace lmk {
namespace {

constexpr int kBlock = 256;              // threads per block
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; the kernel loops over further pairs

struct Args {
  const void* x;
  void* out;
  const void* cos;
  const void* sin;
  const int64_t* cos_off;
  const int64_t* sin_off;
  int64_t rows, d, h;  // h = d / 2: pairs per row
};

template <typename T, typename C, bool INTERLEAVED, bool BACKWARD>
__global__ void __launch_bounds__(kBlock) rotary_kernel(const Args a) {
  using A = AccT<T>;
  const T* x = static_cast<const T*>(a.x);  // may alias out: no __restrict__
  T* out = static_cast<T*>(a.out);
  const C* __restrict__ cs = static_cast<const C*>(a.cos);
  const C* __restrict__ sn = static_cast<const C*>(a.sin);
  const int64_t h = a.h;
  const int64_t total = a.rows * h;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < total; i += step) {
    const int64_t r = i / h;
    const int64_t p = i - r * h;
    const int64_t j0 = INTERLEAVED ? 2 * p : p;       // the pair's first column
    const int64_t j1 = INTERLEAVED ? j0 + 1 : p + h;  // and its second
    const C* c = cs + __ldg(a.cos_off + r);
    const C* s = sn + __ldg(a.sin_off + r);
    const int64_t base = r * a.d;
    const A u = to_acc(x[base + j0]), v = to_acc(x[base + j1]);
    const A c0 = to_acc(__ldg(c + j0)), c1 = to_acc(__ldg(c + j1));
    const A s0 = to_acc(__ldg(s + j0)), s1 = to_acc(__ldg(s + j1));
    A lo, hi;
    if constexpr (BACKWARD) {  // dx[j0] = u c0 + v s1, dx[j1] = v c1 - u s0
      lo = u * c0 + v * s1;
      hi = v * c1 - u * s0;
    } else {  // out[j0] = u c0 - v s0, out[j1] = v c1 + u s1
      lo = u * c0 - v * s0;
      hi = v * c1 + u * s1;
    }
    out[base + j0] = from_acc<T>(lo);
    out[base + j1] = from_acc<T>(hi);
  }
}

template <typename T, typename C>
cudaError_t launch(const Args& a, bool interleaved, bool backward, cudaStream_t stream) {
  const int64_t total = a.rows * a.h;
  const unsigned grid = static_cast<unsigned>(
      std::max<int64_t>(1, std::min((total + kBlock - 1) / kBlock, kMaxBlocks)));
  if (interleaved) {
    if (backward) {
      rotary_kernel<T, C, true, true><<<grid, kBlock, 0, stream>>>(a);
    } else {
      rotary_kernel<T, C, true, false><<<grid, kBlock, 0, stream>>>(a);
    }
  } else {
    if (backward) {
      rotary_kernel<T, C, false, true><<<grid, kBlock, 0, stream>>>(a);
    } else {
      rotary_kernel<T, C, false, false><<<grid, kBlock, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

// 16-bit T: tables of T or fp32.
template <typename T>
cudaError_t launch16(const Args& a, DType cs, DType t, bool il, bool bw, cudaStream_t stream) {
  if (cs == t) return launch<T, T>(a, il, bw, stream);
  if (cs == DType::F32) return launch<T, float>(a, il, bw, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t rotary_cuda(const RotaryParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.d < 0 || p.d % 2 != 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  if (p.x == nullptr || p.out == nullptr || p.cos == nullptr || p.sin == nullptr ||
      p.cos_off == nullptr || p.sin_off == nullptr) {
    return cudaErrorInvalidValue;
  }
  Args a{};
  a.x = p.x;
  a.out = p.out;
  a.cos = p.cos;
  a.sin = p.sin;
  a.cos_off = p.cos_off;
  a.sin_off = p.sin_off;
  a.rows = p.rows;
  a.d = p.d;
  a.h = p.d / 2;
  const bool il = p.interleaved, bw = p.backward;
  switch (p.dtype) {
    case DType::F32:
      if (p.cs_dtype != DType::F32) return cudaErrorInvalidValue;
      return launch<float, float>(a, il, bw, stream);
    case DType::F64:
      if (p.cs_dtype != DType::F64) return cudaErrorInvalidValue;
      return launch<double, double>(a, il, bw, stream);
    case DType::F16:
      return launch16<__half>(a, p.cs_dtype, p.dtype, il, bw, stream);
    case DType::BF16:
      return launch16<__nv_bfloat16>(a, p.cs_dtype, p.dtype, il, bw, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lmk
