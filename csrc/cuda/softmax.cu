// Softmax / log_softmax over the last dim of a (rows, cols) row-major tensor: forward with an
// optional bool or additive mask and a causal mask, and backward. Torch-free: raw pointers,
// sizes and a stream; the contract (semantics, masks, fully masked rows) is lmk/softmax.h.
//
// Algorithm (forward), per row:
//   pass 1  read x (and the mask), form z = scale * x (+ float mask; -inf where masked out) and
//           keep per-thread online statistics (max m, sum s of exp(z - m)), lmk/online_softmax.h:
//           per loaded vector, its max and sum, then one combine() into the running pair. The
//           threads' pairs are merged by a warp butterfly (short rows) or cub::BlockReduce.
//   pass 2  read x again, recompute z and write y = exp(z - m) / s  (log: (z - m) - log s).
// Backward, per row (both variants need only y and dy):
//   pass 1  read y, dy; c = sum dy*y (softmax) or sum dy (log_softmax), reduced as above
//   pass 2  read y, dy again; dx = scale*y*(dy - c)  or  dx = scale*(dy - exp(y)*c).
//
// Memory traffic: forward reads x twice and writes y once (3 * rows * cols * sizeof(T) bytes,
// plus the mask twice when there is one); backward reads y and dy twice and writes dx once
// (5 * rows * cols * sizeof(T)). The second read of a short row mostly hits L1/L2. No register
// array is sized by cols: any row length runs with the same registers and no spills.
//
// Launch shapes:
//   cols <= 1024   one warp per row, 4 rows per 128-thread block, warp-shuffle reductions;
//   cols  > 1024   one 512-thread block per row, cub::BlockReduce.
// __launch_bounds__ asks for 1024 resident threads per SM (<= 64 registers per thread); the
// backward loops are unrolled twice only, which keeps every variant free of spills.
// The 1-D grid has at most kMaxBlocks blocks and loops over further rows (grid-stride), so any
// row count works; all offsets are 64-bit (rows * cols may exceed 2^31).
// Loads and stores are 16-byte vectors (4 x fp32, 8 x fp16/bf16) when the data pointers are
// 16-byte aligned and cols is a multiple of the vector width; otherwise one element at a time.
// Mask values are read one element at a time (row r's mask row starts at mask_row_offsets[r],
// column stride 0 or 1).
//
// Numerics: fp32 math and accumulation for fp32/fp16/bf16 data; outputs rounded to nearest.
// exp / log are the IEEE expf / logf (the module is built without --use_fast_math: its MUFU
// approximations put the fp32 gradients beyond twice torch's error, seen on an H100).
// NaN in a row makes the whole row NaN; with a mask or causal a fully masked row gives 0
// (log: -inf); without them an all -inf row gives NaN, as torch does.
//
// Limits: fp64 data is not supported (cudaErrorNotSupported); the caller handles it elsewhere.
// One block per row means a handful of very long rows (e.g. 8 x 262144) cannot fill a big GPU;
// a split-row variant would be the next step. Reductions run in a fixed order: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "lmk/cuda_acc.h"
#include "lmk/online_softmax.h"
#include "lmk/softmax.h"
#include "lmk/softmax_cuda.h"

namespace lmk {
namespace {

constexpr int64_t kWarpMaxCols = 1024;   // rows up to this length: one warp per row
constexpr int kWarpBlock = 128;          // threads per block in the warp-per-row kernel
constexpr int kRowBlock = 512;           // threads per block in the block-per-row kernel
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; the kernels loop over further rows
constexpr unsigned kFullWarp = 0xffffffffu;
// Occupancy floor given to ptxas (caps registers at 64 per thread): enough warps in flight to
// cover memory latency, and an explicit budget instead of ptxas's own occupancy guess.
constexpr int kMinThreadsPerSM = 1024;

// ------------------------------------------------------------------ element access

// (to_acc / from_acc: lmk/cuda_acc.h)

// N consecutive elements moved as one load/store (N * sizeof(T) is 16 bytes or one element).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// ------------------------------------------------------------------ row reductions

// All-reduce over the TPR threads that share a row: a warp butterfly for TPR == 32, otherwise
// (TPR == BLOCK) cub::BlockReduce plus a shared-memory broadcast. Every thread gets the result.
struct CombineStats {
  __device__ __forceinline__ SoftmaxStats<float> operator()(const SoftmaxStats<float>& a,
                                                            const SoftmaxStats<float>& b) const {
    return softmax_combine(a, b);
  }
};

template <int TPR, int BLOCK>
__device__ __forceinline__ SoftmaxStats<float> row_allreduce(SoftmaxStats<float> v) {
  static_assert(TPR == 32 || TPR == BLOCK, "a row is one warp or one block");
  if constexpr (TPR == 32) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const SoftmaxStats<float> other{__shfl_xor_sync(kFullWarp, v.m, offset),
                                      __shfl_xor_sync(kFullWarp, v.s, offset)};
      v = softmax_combine(v, other);
    }
    return v;
  } else {
    using Reduce = cub::BlockReduce<SoftmaxStats<float>, BLOCK>;
    __shared__ typename Reduce::TempStorage tmp;
    __shared__ SoftmaxStats<float> result;
    v = Reduce(tmp).Reduce(v, CombineStats{});
    if (threadIdx.x == 0) result = v;
    __syncthreads();
    v = result;
    __syncthreads();  // tmp and result are reused by the next row
    return v;
  }
}

template <int TPR, int BLOCK>
__device__ __forceinline__ float row_allreduce(float v) {
  static_assert(TPR == 32 || TPR == BLOCK, "a row is one warp or one block");
  if constexpr (TPR == 32) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullWarp, v, offset);
    return v;
  } else {
    using Reduce = cub::BlockReduce<float, BLOCK>;
    __shared__ typename Reduce::TempStorage tmp;
    __shared__ float result;
    v = Reduce(tmp).Sum(v);
    if (threadIdx.x == 0) result = v;
    __syncthreads();
    v = result;
    __syncthreads();  // tmp and result are reused by the next row
    return v;
  }
}

// ------------------------------------------------------------------ forward

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskData = 3 };

struct FwdArgs {
  int64_t rows, cols;
  float scale;
  bool log;
  int mask_kind;                    // MaskKind; kMaskData: the mask has the data's dtype
  const void* mask;                 // element 0 of the mask storage (null: no mask)
  const int64_t* mask_row_offsets;  // [rows] element offset of row r's mask row
  int64_t mask_col_stride;          // 0 or 1
  int64_t mask_elem_size;           // bytes per mask element
  int64_t causal_rows;              // 0: not causal; else row r sees columns j <= r % causal_rows
  bool zero_empty;                  // mask or causal: a row with no finite z gives 0, not NaN
};

// z_j of the contract: scale * x_j (+ float mask), -inf where masked out.
template <typename T>
__device__ __forceinline__ float logit(float x, int64_t j, const FwdArgs& a, const void* mrow,
                                       int64_t last_col) {
  if (j > last_col) return -INFINITY;
  const float z = a.scale * x;
  const int64_t k = j * a.mask_col_stride;
  switch (a.mask_kind) {
    case kMaskBool:
      return static_cast<const uint8_t*>(mrow)[k] ? -INFINITY : z;
    case kMaskF32:
      return z + static_cast<const float*>(mrow)[k];
    case kMaskData:
      return z + to_acc(static_cast<const T*>(mrow)[k]);
    default:
      return z;
  }
}

// x, y: [rows, cols]. Threads [s*TPR, (s+1)*TPR) of a block share a row; rows are visited
// grid-stride. VEC elements per load/store.
template <typename T, int VEC, int TPR, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kMinThreadsPerSM / BLOCK)
    softmax_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const FwdArgs a) {
  constexpr int kRowsPerBlock = BLOCK / TPR;
  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;

  for (int64_t row = first; row < a.rows; row += step) {
    const T* xr = x + row * a.cols;
    T* yr = y + row * a.cols;
    const int64_t last_col = a.causal_rows > 0 ? row % a.causal_rows : a.cols;
    const void* mrow = nullptr;
    if (a.mask_kind != kMaskNone) {
      mrow = static_cast<const char*>(a.mask) + a.mask_row_offsets[row] * a.mask_elem_size;
    }

    // pass 1: online (max, sum) of this thread's elements, then of the row
    SoftmaxStats<float> st = softmax_stats_empty<float>();
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < a.cols; j += TPR * VEC) {
      const Pack<T, VEC> in = load_pack<T, VEC>(xr + j);
      float z[VEC];
      float vmax = -INFINITY;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        z[i] = logit<T>(to_acc(in.v[i]), j + i, a, mrow, last_col);
        vmax = softmax_max(vmax, z[i]);
      }
      float vsum = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) vsum += softmax_exp_shift(z[i], vmax);
      st = softmax_combine(st, SoftmaxStats<float>{vmax, vsum});
    }
    st = row_allreduce<TPR, BLOCK>(st);
    if (!a.zero_empty && st.m == -INFINITY) {
      // No mask and no causal: an all -inf row is NaN, as in torch (-inf - -inf).
      st = SoftmaxStats<float>{NAN, NAN};
    }
    const float inv_sum = softmax_inv_sum(st);
    const float log_sum = softmax_log(st.s);

    // pass 2: normalise
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < a.cols; j += TPR * VEC) {
      const Pack<T, VEC> in = load_pack<T, VEC>(xr + j);
      Pack<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float z = logit<T>(to_acc(in.v[i]), j + i, a, mrow, last_col);
        out.v[i] = from_acc<T>(a.log ? log_softmax_output(z, st, log_sum)
                                     : softmax_output(z, st, inv_sum));
      }
      store_pack<T, VEC>(yr + j, out);
    }
  }
}

// ------------------------------------------------------------------ backward

// y, dy, dx: [rows, cols]; same row/thread mapping as the forward kernel.
template <typename T, int VEC, int TPR, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kMinThreadsPerSM / BLOCK)
    softmax_bwd_kernel(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                       const int64_t rows, const int64_t cols, const float scale,
                       const bool log_softmax) {
  constexpr int kRowsPerBlock = BLOCK / TPR;
  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;

  for (int64_t row = first; row < rows; row += step) {
    const T* yr = y + row * cols;
    const T* dyr = dy + row * cols;
    T* dxr = dx + row * cols;

    // pass 1: c = sum dy*y (softmax) or sum dy (log_softmax)
    float c = 0.f;
#pragma unroll 2  // bounded unrolling: 4 vector loads in flight, no spills
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < cols; j += TPR * VEC) {
      const Pack<T, VEC> yv = load_pack<T, VEC>(yr + j);
      const Pack<T, VEC> gv = load_pack<T, VEC>(dyr + j);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float g = to_acc(gv.v[i]);
        c += log_softmax ? g : g * to_acc(yv.v[i]);
      }
    }
    c = row_allreduce<TPR, BLOCK>(c);

    // pass 2: dx
#pragma unroll 2
    for (int64_t j = static_cast<int64_t>(lane) * VEC; j < cols; j += TPR * VEC) {
      const Pack<T, VEC> yv = load_pack<T, VEC>(yr + j);
      const Pack<T, VEC> gv = load_pack<T, VEC>(dyr + j);
      Pack<T, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float yi = to_acc(yv.v[i]);
        const float g = to_acc(gv.v[i]);
        out.v[i] =
            from_acc<T>(log_softmax ? scale * (g - softmax_exp(yi) * c) : scale * yi * (g - c));
      }
      store_pack<T, VEC>(dxr + j, out);
    }
  }
}

// ------------------------------------------------------------------ launchers

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t rows, int rows_per_block) {
  return static_cast<unsigned>(std::min((rows + rows_per_block - 1) / rows_per_block, kMaxBlocks));
}

template <typename T, int VEC, int TPR, int BLOCK>
cudaError_t launch_fwd(const SoftmaxFwdParams& p, const FwdArgs& a, cudaStream_t stream) {
  softmax_fwd_kernel<T, VEC, TPR, BLOCK><<<grid_for(p.rows, BLOCK / TPR), BLOCK, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<T*>(p.y), a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fwd(const SoftmaxFwdParams& p, const FwdArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = aligned16(p.x) && aligned16(p.y) && p.cols % V == 0;
  if (p.cols <= kWarpMaxCols) {
    return vec ? launch_fwd<T, V, 32, kWarpBlock>(p, a, stream)
               : launch_fwd<T, 1, 32, kWarpBlock>(p, a, stream);
  }
  return vec ? launch_fwd<T, V, kRowBlock, kRowBlock>(p, a, stream)
             : launch_fwd<T, 1, kRowBlock, kRowBlock>(p, a, stream);
}

template <typename T, int VEC, int TPR, int BLOCK>
cudaError_t launch_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  softmax_bwd_kernel<T, VEC, TPR, BLOCK><<<grid_for(p.rows, BLOCK / TPR), BLOCK, 0, stream>>>(
      static_cast<const T*>(p.y), static_cast<const T*>(p.dy), static_cast<T*>(p.dx), p.rows,
      p.cols, static_cast<float>(p.scale), p.log);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_bwd(const SoftmaxBwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = aligned16(p.y) && aligned16(p.dy) && aligned16(p.dx) && p.cols % V == 0;
  if (p.cols <= kWarpMaxCols) {
    return vec ? launch_bwd<T, V, 32, kWarpBlock>(p, stream)
               : launch_bwd<T, 1, 32, kWarpBlock>(p, stream);
  }
  return vec ? launch_bwd<T, V, kRowBlock, kRowBlock>(p, stream)
             : launch_bwd<T, 1, kRowBlock, kRowBlock>(p, stream);
}

bool is_float_data(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

}  // namespace

cudaError_t softmax_fwd_cuda(const SoftmaxFwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F64) return cudaErrorNotSupported;
  if (!is_float_data(p.dtype) || p.rows < 0 || p.cols < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr) return cudaErrorInvalidValue;

  FwdArgs a{};
  a.rows = p.rows;
  a.cols = p.cols;
  a.scale = static_cast<float>(p.scale);
  a.log = p.log;
  a.mask_kind = kMaskNone;
  a.zero_empty = p.mask.ptr != nullptr || p.causal;
  if (p.mask.ptr != nullptr) {
    if (p.mask.row_offsets == nullptr) return cudaErrorInvalidValue;
    if (p.mask.col_stride != 0 && p.mask.col_stride != 1) return cudaErrorInvalidValue;
    if (p.mask.dtype == DType::Bool) {
      a.mask_kind = kMaskBool;
    } else if (p.mask.dtype == DType::F32) {
      a.mask_kind = kMaskF32;
    } else if (p.mask.dtype == p.dtype) {
      a.mask_kind = kMaskData;
    } else {
      return cudaErrorInvalidValue;
    }
    a.mask = p.mask.ptr;
    a.mask_row_offsets = p.mask.row_offsets;
    a.mask_col_stride = p.mask.col_stride;
    a.mask_elem_size = dtype_size(p.mask.dtype);
  }
  a.causal_rows = 0;
  if (p.causal) {
    if (p.causal_rows < 1) return cudaErrorInvalidValue;
    a.causal_rows = p.causal_rows;
  }

  switch (p.dtype) {
    case DType::F32:
      return dispatch_fwd<float>(p, a, stream);
    case DType::F16:
      return dispatch_fwd<__half>(p, a, stream);
    case DType::BF16:
      return dispatch_fwd<__nv_bfloat16>(p, a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t softmax_bwd_cuda(const SoftmaxBwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F64) return cudaErrorNotSupported;
  if (!is_float_data(p.dtype) || p.rows < 0 || p.cols < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.y == nullptr || p.dy == nullptr || p.dx == nullptr) return cudaErrorInvalidValue;

  switch (p.dtype) {
    case DType::F32:
      return dispatch_bwd<float>(p, stream);
    case DType::F16:
      return dispatch_bwd<__half>(p, stream);
    case DType::BF16:
      return dispatch_bwd<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lmk
