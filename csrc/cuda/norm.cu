// layer_norm / rms_norm over the rows of a (rows, cols) row-major tensor, each with an optional
// fused residual add, forward and backward. Torch-free: raw pointers, sizes and a stream; the
// contract (types T/S/A, formulas, rounding, the deterministic dw/db reduction) is lmk/norm.h.
//
// Algorithm (forward), per row:
//   pass 1  read x (and the residual); h = x + residual rounded to S (stored to h when there is
//           a residual); statistics in fp32 from h as stored:
//             cached rows   h stays in registers; shifted by the row's first element h0:
//                           dm = sum (h - h0) / cols, mean = h0 + dm, then var =
//                           sum ((h - h0) - dm)^2 / cols from the registers (exact two-pass);
//             looped rows   per-thread running moments (count, mean, M2): exact moments of each
//                           loaded pack merged with Chan's formula, merged over the row the
//                           same way (a second read of the row is saved);
//             rms           var = sum h^2 / cols (mean = 0, not stored).
//   pass 2  y = (h - mean) * rstd * w + b (cached rows: ((h - h0) - dm) * rstd * w + b, which
//           keeps the bits an fp32 mean of a large-mean row rounds away), rounded once (RNE) to
//           T, with rstd = 1 / sqrt(var + eps) (correctly rounded); mean (layer_norm) and rstd
//           stored per row. Looped rows read h again (from h with a residual, else from x).
// Backward, per row (g = dy * w, xhat = (h - mean) * rstd, c1 = sum g / cols (0 for rms),
// c2 = sum g * xhat / cols):
//   pass 1  read dy, h; sum g and sum g * xhat (cached rows keep g and xhat in registers), one
//           all-reduce of the pair;
//   pass 2  dh = rstd * (g - c1 - xhat * c2) (+ dh_out), rounded to S. Looped rows read dy and
//           h again.
// dw, db (only when wanted): norm_bwd_partial_kernel takes a tile of 64 columns x
// kNormRowsPerBlock (64) rows per CUDA block; each of its 8 thread rows sums 8 of the rows (ty,
// ty + 8, ...) in order, and the 8 sums are added in thread-row order: one fp32 partial per
// (row block, column) in the workspace (all dw partials, then all db partials).
// norm_bwd_finalize_kernel adds the partials of each column in row-block order. Fixed orders,
// no atomics: dw and db depend only on (rows, cols) and the data, bit for bit, on any GPU.
//
// Memory traffic (E = rows * cols elements; T, S: their sizes in bytes):
//   forward    E * (T + S + S + T) with a residual (read x, r; write h, y), E * 2T without;
//              looped rows read h (S, or T without a residual) once more, from L2 while the
//              rows in flight (2 per SM) fit in it.
//   backward   row kernel E * (T + S + S) (+ E * S to read dh_out); looped rows read dy and h
//              twice. dw/db: the partial kernel reads dy and h again, E * (T + S) (h is skipped
//              when only db is wanted), plus 8 bytes per (row block, column) written and read
//              back. That extra read buys a row kernel that is parallel over every row: a fused
//              kernel that keeps dw/db in registers must give each 64-row block to one CUDA
//              block, rows / 64 blocks, too few to fill a GPU at typical batch * sequence sizes.
//
// Launch shapes, the same for the forward and the backward row kernels. Vector path (cols a
// multiple of V = 16 / sizeof(T) and every data/weight/bias pointer 16-byte aligned; loads and
// stores of V elements: 16 bytes of T, two 16-byte accesses for an fp32 stream of 16-bit data):
//   cols <= 1024     one warp per row, 4 rows per 128-thread block, row cached (32 values per
//                    thread; backward: g and xhat, 2 x 32), warp-shuffle reductions;
//   cols <= 4096     one 256-thread block per row, 16 cached per thread, cub::BlockReduce;
//   cols <= 16384    one 512-thread block per row, 32 cached per thread;
//   cols  > 16384    one 1024-thread block per row, looped (nothing sized by cols).
// Otherwise (odd cols or misaligned pointers) one element per access, looped kernels only: one
// warp per row up to 1024 columns, a 256-thread block up to 4096, a 1024-thread block beyond.
// Cached arrays are indexed only with compile-time indices (fully unrolled loops), so they stay
// in registers. __launch_bounds__: cached kernels ask for 512 resident threads per SM (<= 128
// registers; each thread still has 4 to 8 16-byte loads in flight per pass), looped kernels for
// 1024 (<= 64). No kernel spills (checked by the gpu-report test). The grids have at most
// kMaxBlocks blocks and loop (grid-stride) over further rows or tiles; element offsets are
// 64-bit (rows * cols may exceed 2^31).
//
// Numerics: fp32 math and accumulation, IEEE (no --use_fast_math: denormals kept); the weights
// of Chan's merge use the fast division (__fdividef: counts, within 2 ulp); the per-row
// divisions by cols and the reciprocal square root are correctly rounded (__fdiv_rn,
// __frsqrt_rn; the looped backward's two divisions flush denormals, div_rn_ftz). NaN or inf in a
// row give NaN or inf in that row only (y, mean/rstd, dh); they do reach dw/db, which sum over
// rows, as in torch. eps is used as given (converted to fp32).
//
// Limits: fp64 data is not supported (cudaErrorNotSupported); the caller uses another backend.
// One block per long row means a few very long rows (e.g. 8 x 262144) cannot fill a big GPU; a
// split-row variant would be the next step. The finalize kernel adds rows / 64 partials per
// column one after another (the contract's order): for very many rows and few columns it is
// latency-bound. The looped forward's running count is fp32 (exact up to 2^24 columns).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <type_traits>

#include "lmk/cuda_acc.h"
#include "lmk/norm.h"
#include "lmk/norm_cuda.h"

namespace lmk {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpBlock = 128;   // threads per block of the warp-per-row kernels (4 rows)
constexpr int kMidBlock = 256;    // threads per row, cached 1024 < cols <= 4096 (and unaligned)
constexpr int kBigBlock = 512;    // threads per row, cached 4096 < cols <= 16384
constexpr int kLoopBlock = 1024;  // threads per row, looped kernels of long rows
constexpr int kWarpItems = 32;    // cached elements per thread, one warp per row
constexpr int kMidItems = 16;     // cached elements per thread, kMidBlock threads per row
constexpr int kBigItems = 32;     // cached elements per thread, kBigBlock threads per row
constexpr int64_t kWarpMaxCols = int64_t{kWarp} * kWarpItems;    // 1024
constexpr int64_t kMidMaxCols = int64_t{kMidBlock} * kMidItems;  // 4096
constexpr int64_t kBigMaxCols = int64_t{kBigBlock} * kBigItems;  // 16384
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; the kernels loop over further work
// Occupancy floors given to ptxas. Cached kernels: 512 resident threads per SM, so up to 128
// registers per thread for the cached row (each thread still has 4-8 16-byte loads in flight
// per pass, enough to cover memory latency). Looped kernels: 1024 threads, <= 64 registers.
constexpr int kCachedThreadsPerSM = 512;
constexpr int kLoopThreadsPerSM = 1024;

// dw/db partial kernel: a (kTileCols columns x kNormRowsPerBlock rows) tile per block of
// kWarp x kPartialRows threads; thread (tx, ty) owns columns tx and tx + 32 of the tile and
// rows ty, ty + kPartialRows, ... of the row block.
constexpr int kTileCols = 2 * kWarp;
constexpr int kPartialRows = 8;
constexpr int kPartialThreads = kWarp * kPartialRows;
constexpr int kRowsPerThread = static_cast<int>(kNormRowsPerBlock) / kPartialRows;
static_assert(kNormRowsPerBlock % kPartialRows == 0, "a row block splits over the thread rows");
constexpr int kFinalizeThreads = 256;

// ------------------------------------------------------------------ element access

// (to_acc / from_acc: lmk/cuda_acc.h)

// Elements per vector pack: 16 bytes of T.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// N consecutive elements moved together: one access of N * sizeof(T) bytes when that is at most
// 16, else 16-byte accesses (8 fp32 stream values beside 8 fp16 data values).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// The N elements at p (aligned to the pack) as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> in = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_acc(in.v[i]);
}

// v rounded to T (RNE), stored at p (aligned to the pack).
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&v)[N]) {
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) out.v[i] = from_acc<T>(v[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = out;
}

// weight / bias elements [j, j + N) (fp32), or `absent` when the vector is not given.
template <int N>
__device__ __forceinline__ void load_param(const float* p, int64_t j, float absent,
                                           float (&out)[N]) {
  if (p != nullptr) {
    load_floats<float, N>(p + j, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = absent;
  }
}

// ------------------------------------------------------------------ row reductions

// a / b correctly rounded, but denormal operands and results flush to 0: the IEEE division's
// denormal path costs registers that the 1024-thread looped backward (64 per thread) lacks.
__device__ __forceinline__ float div_rn_ftz(float a, float b) {
  float q;
  asm("div.rn.ftz.f32 %0, %1, %2;" : "=f"(q) : "f"(a), "f"(b));
  return q;
}

// Running (count, mean, M2 = sum of squared deviations from the mean) of a set of values.
struct Moments {
  float n, mean, m2;
};

// Chan, Golub & LeVeque's merge of the moments of two disjoint sets. An empty side returns the
// other one unchanged (so an idle thread never turns an inf mean into NaN through 0 * inf).
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float wb = __fdividef(b.n, n);  // counts: the fast division is within 2 ulp
  const float d = b.mean - a.mean;
  return Moments{n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}

struct MergeMoments {
  __device__ __forceinline__ Moments operator()(const Moments& a, const Moments& b) const {
    return merge(a, b);
  }
};

struct SumPair {
  __device__ __forceinline__ float2 operator()(const float2& a, const float2& b) const {
    return make_float2(a.x + b.x, a.y + b.y);
  }
};

// Reduce over the TPR threads that share a row, result on every one of them: for TPR == 32 a
// warp butterfly (fp32 + is commutative bit for bit, so every lane gets the same sum), or a tree
// to lane 0 plus a broadcast for the (non-commutative) moments merge; for TPR == BLOCK
// cub::BlockReduce (fixed order) plus a shared-memory broadcast.
template <int TPR, int BLOCK>
__device__ __forceinline__ float row_sum(float v) {
  static_assert(TPR == kWarp || TPR == BLOCK, "a row is one warp or one block");
  if constexpr (TPR == kWarp) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      v += __shfl_xor_sync(kFullWarp, v, offset);
    }
    return v;
  } else {
    using Reduce = cub::BlockReduce<float, BLOCK>;
    __shared__ typename Reduce::TempStorage tmp;
    __shared__ float result;
    v = Reduce(tmp).Sum(v);
    if (threadIdx.x == 0) result = v;
    __syncthreads();
    v = result;
    __syncthreads();  // tmp and result are reused by the next call
    return v;
  }
}

template <int TPR, int BLOCK>
__device__ __forceinline__ float2 row_sum(float2 v) {
  static_assert(TPR == kWarp || TPR == BLOCK, "a row is one warp or one block");
  if constexpr (TPR == kWarp) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      v.x += __shfl_xor_sync(kFullWarp, v.x, offset);
      v.y += __shfl_xor_sync(kFullWarp, v.y, offset);
    }
    return v;
  } else {
    using Reduce = cub::BlockReduce<float2, BLOCK>;
    __shared__ typename Reduce::TempStorage tmp;
    __shared__ float2 result;
    v = Reduce(tmp).Reduce(v, SumPair{});
    if (threadIdx.x == 0) result = v;
    __syncthreads();
    v = result;
    __syncthreads();
    return v;
  }
}

template <int TPR, int BLOCK>
__device__ __forceinline__ Moments row_moments(Moments v) {
  static_assert(TPR == kWarp || TPR == BLOCK, "a row is one warp or one block");
  if constexpr (TPR == kWarp) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      const Moments other{__shfl_down_sync(kFullWarp, v.n, offset),
                          __shfl_down_sync(kFullWarp, v.mean, offset),
                          __shfl_down_sync(kFullWarp, v.m2, offset)};
      v = merge(v, other);  // only lane 0's result is used
    }
    return Moments{__shfl_sync(kFullWarp, v.n, 0), __shfl_sync(kFullWarp, v.mean, 0),
                   __shfl_sync(kFullWarp, v.m2, 0)};
  } else {
    using Reduce = cub::BlockReduce<Moments, BLOCK>;
    __shared__ typename Reduce::TempStorage tmp;
    __shared__ Moments result;
    v = Reduce(tmp).Reduce(v, MergeMoments{});
    if (threadIdx.x == 0) result = v;
    __syncthreads();
    v = result;
    __syncthreads();
    return v;
  }
}

// Rows [first, rows) with step: the rows of the threads [s*TPR, (s+1)*TPR) of this block.
template <int TPR, int BLOCK>
struct RowMap {
  static constexpr int kRowsPerBlock = BLOCK / TPR;
  int lane;
  int64_t first, step;
  __device__ __forceinline__ RowMap()
      : lane(static_cast<int>(threadIdx.x) % TPR),
        first(static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR),
        step(static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {}
};

__device__ __forceinline__ float rstd_of(float var, float eps) { return __frsqrt_rn(var + eps); }

// ------------------------------------------------------------------ forward

struct FwdArgs {
  const void* x;         // (rows, cols) T
  const void* residual;  // (rows, cols) S, or null
  const float* weight;   // (cols), or null
  const float* bias;     // (cols), or null
  void* y;               // (rows, cols) T
  void* h;               // (rows, cols) S; non-null exactly when residual is
  float* mean;           // (rows), or null (rms)
  float* rstd;           // (rows)
  int64_t rows, cols;
  float eps;
  bool rms;
};

// h of the V elements at element offset `off`: x + residual rounded to S, stored to h, and
// returned as fp32 (the value as stored); without a residual, x itself.
template <typename T, typename S, int V>
__device__ __forceinline__ void make_h(const FwdArgs& a, int64_t off, float (&hv)[V]) {
  load_floats<T, V>(static_cast<const T*>(a.x) + off, hv);
  if (a.residual != nullptr) {
    float rv[V];
    load_floats<S, V>(static_cast<const S*>(a.residual) + off, rv);
#pragma unroll
    for (int i = 0; i < V; ++i) hv[i] = to_acc(from_acc<S>(hv[i] + rv[i]));
    store_floats<S, V>(static_cast<S*>(a.h) + off, hv);  // exact: hv holds values of S
  }
}

// h again (second pass of a looped row). Read through a plain pointer: this thread stored these
// very elements earlier in the kernel, so the read must not take the read-only (nc) path.
template <typename T, typename S, int V>
__device__ __forceinline__ void reload_h(const FwdArgs& a, int64_t off, float (&hv)[V]) {
  if (a.residual != nullptr) {
    load_floats<S, V>(static_cast<const S*>(a.h) + off, hv);
  } else {
    load_floats<T, V>(static_cast<const T*>(a.x) + off, hv);
  }
}

// y = (h - mean) * rstd * w + b rounded to T, for the V elements at element offset `off`
// (column j).
template <typename T, int V>
__device__ __forceinline__ void write_y(const FwdArgs& a, int64_t off, int64_t j,
                                        const float (&hv)[V], float shift, float dm, float rstd) {
  float w[V], b[V], y[V];
  load_param<V>(a.weight, j, 1.f, w);
  load_param<V>(a.bias, j, 0.f, b);
#pragma unroll
  for (int i = 0; i < V; ++i) y[i] = ((hv[i] - shift) - dm) * rstd * w[i] + b[i];
  store_floats<T, V>(static_cast<T*>(a.y) + off, y);
}

// The sum of f(h) over this thread's cached packs that lie inside the row (packs at columns
// (k * TPR + lane) * V, as the cached kernels lay them out).
template <int TPR, int NP, int V, typename F>
__device__ __forceinline__ float sum_cached(const float (&hv)[NP][V], int lane, int cols, F f) {
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < NP; ++k) {
    const int j = (k * TPR + lane) * V;
    if (j < cols) {
#pragma unroll
      for (int i = 0; i < V; ++i) acc += f(hv[k][i]);
    }
  }
  return acc;
}

// Rows of at most TPR * V * NP columns (V = kVec<T>, cols % V == 0, aligned pointers), cached
// in registers. Thread `lane` of a row owns the packs starting at columns (k * TPR + lane) * V,
// k < NP; all indices into the cache are compile-time constants.
template <typename T, typename S, int TPR, int BLOCK, int NP>
__global__ void __launch_bounds__(BLOCK, kCachedThreadsPerSM / BLOCK)
    norm_fwd_cached_kernel(const FwdArgs a) {
  constexpr int V = kVec<T>;
  const RowMap<TPR, BLOCK> map;
  const int cols = static_cast<int>(a.cols);  // <= kBigMaxCols
  const float n = static_cast<float>(cols);

  for (int64_t row = map.first; row < a.rows; row += map.step) {
    const int64_t base = row * a.cols;
    float hv[NP][V];

    // pass 1: h (stored with a residual)
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const int j = (k * TPR + map.lane) * V;
      if (j < cols) {
        make_h<T, S, V>(a, base + j, hv[k]);
      }
    }
    float mean = 0.f, shift = 0.f, dm = 0.f;
    float var;
    if (a.rms) {
      const float s = sum_cached<TPR>(hv, map.lane, cols, [](float h) { return h * h; });
      var = __fdiv_rn(row_sum<TPR, BLOCK>(s), n);
    } else {
      // layer norm, shifted by the row's first element h0 (on lane 0; the sum of it and zeros
      // is exact): dm = sum(h - h0) / cols, mean = h0 + dm, var = sum((h - h0) - dm)^2 / cols.
      // The centred values keep the bits that an fp32 mean of a large-mean row rounds away.
      shift = row_sum<TPR, BLOCK>(map.lane == 0 ? hv[0][0] : 0.f);
      const float d = sum_cached<TPR>(hv, map.lane, cols, [=](float h) { return h - shift; });
      dm = __fdiv_rn(row_sum<TPR, BLOCK>(d), n);
      mean = shift + dm;
      const float q = sum_cached<TPR>(hv, map.lane, cols, [=](float h) {
        const float c = (h - shift) - dm;
        return c * c;
      });
      var = __fdiv_rn(row_sum<TPR, BLOCK>(q), n);
    }
    const float rstd = rstd_of(var, a.eps);
    if (map.lane == 0) {
      a.rstd[row] = rstd;
      if (a.mean != nullptr) a.mean[row] = mean;
    }

    // pass 2: y
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const int j = (k * TPR + map.lane) * V;
      if (j < cols) write_y<T, V>(a, base + j, j, hv[k], shift, dm, rstd);
    }
  }
}

// Rows of any length (cols % V == 0, pointers aligned to V elements): statistics in one pass
// (running moments; rms: sum of squares), then a second pass that reads h again and writes y.
template <typename T, typename S, int V, int TPR, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kLoopThreadsPerSM / BLOCK)
    norm_fwd_looped_kernel(const FwdArgs a) {
  const RowMap<TPR, BLOCK> map;
  const int64_t start = static_cast<int64_t>(map.lane) * V;
  constexpr int64_t kStride = int64_t{TPR} * V;
  const float n = static_cast<float>(a.cols);

  for (int64_t row = map.first; row < a.rows; row += map.step) {
    const int64_t base = row * a.cols;

    // pass 1: h (stored with a residual) and its statistics
    Moments m{0.f, 0.f, 0.f};
    float sq = 0.f;
    for (int64_t j = start; j < a.cols; j += kStride) {
      float hv[V];
      make_h<T, S, V>(a, base + j, hv);
      if (a.rms) {
#pragma unroll
        for (int i = 0; i < V; ++i) sq += hv[i] * hv[i];
      } else {
        // exact two-pass moments of the pack, then one merge into the running moments
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) s += hv[i];
        const float pm = s * (1.f / V);  // V is a power of two: exact
        float q = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) q += (hv[i] - pm) * (hv[i] - pm);
        m = merge(m, Moments{static_cast<float>(V), pm, q});
      }
    }
    float mean = 0.f;
    float var;
    if (a.rms) {
      var = __fdiv_rn(row_sum<TPR, BLOCK>(sq), n);
    } else {
      m = row_moments<TPR, BLOCK>(m);
      mean = m.mean;
      var = __fdiv_rn(m.m2, n);
    }
    const float rstd = rstd_of(var, a.eps);
    if (map.lane == 0) {
      a.rstd[row] = rstd;
      if (a.mean != nullptr) a.mean[row] = mean;
    }

    // pass 2: y
    for (int64_t j = start; j < a.cols; j += kStride) {
      float hv[V];
      reload_h<T, S, V>(a, base + j, hv);
      write_y<T, V>(a, base + j, j, hv, mean, 0.f, rstd);
    }
  }
}

// ------------------------------------------------------------------ backward: dh

struct BwdArgs {
  const void* dy;       // (rows, cols) T
  const void* dh_out;   // (rows, cols) S, or null
  const void* h;        // (rows, cols) S
  const float* weight;  // (cols), or null
  const float* mean;    // (rows), or null (rms)
  const float* rstd;    // (rows)
  void* dh;             // (rows, cols) S
  int64_t rows, cols;
  bool rms;
};

// g = dy * w and xhat = (h - mean) * rstd of the V elements at element offset `off` (column j).
template <typename T, typename S, int V>
__device__ __forceinline__ void load_g_xhat(const BwdArgs& a, int64_t off, int64_t j, float mean,
                                            float rstd, float (&g)[V], float (&xh)[V]) {
  float w[V];
  load_floats<T, V>(static_cast<const T*>(a.dy) + off, g);
  load_floats<S, V>(static_cast<const S*>(a.h) + off, xh);
  load_param<V>(a.weight, j, 1.f, w);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    g[i] *= w[i];
    xh[i] = (xh[i] - mean) * rstd;
  }
}

// dh = rstd * (g - c1 - xhat * c2) (+ dh_out), rounded to S, for the V elements at `off`.
template <typename S, int V>
__device__ __forceinline__ void write_dh(const BwdArgs& a, int64_t off, const float (&g)[V],
                                         const float (&xh)[V], float rstd, float c1, float c2) {
  float d[V];
  if (a.dh_out != nullptr) {
    load_floats<S, V>(static_cast<const S*>(a.dh_out) + off, d);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) d[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) d[i] = rstd * (g[i] - c1 - xh[i] * c2) + d[i];
  store_floats<S, V>(static_cast<S*>(a.dh) + off, d);
}

// Rows of at most TPR * V * NP columns: g and xhat cached in registers; the same thread/row
// mapping and preconditions as norm_fwd_cached_kernel.
template <typename T, typename S, int TPR, int BLOCK, int NP>
__global__ void __launch_bounds__(BLOCK, kCachedThreadsPerSM / BLOCK)
    norm_bwd_cached_kernel(const BwdArgs a) {
  constexpr int V = kVec<T>;
  const RowMap<TPR, BLOCK> map;
  const int cols = static_cast<int>(a.cols);  // <= kBigMaxCols
  const float n = static_cast<float>(cols);

  for (int64_t row = map.first; row < a.rows; row += map.step) {
    const int64_t base = row * a.cols;
    const float mean = a.mean != nullptr ? a.mean[row] : 0.f;
    const float rstd = a.rstd[row];
    float g[NP][V], xh[NP][V];

    // pass 1: sum g, sum g * xhat
    float2 s = make_float2(0.f, 0.f);
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const int j = (k * TPR + map.lane) * V;
      if (j < cols) {
        load_g_xhat<T, S, V>(a, base + j, j, mean, rstd, g[k], xh[k]);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          s.x += g[k][i];
          s.y += g[k][i] * xh[k][i];
        }
      }
    }
    s = row_sum<TPR, BLOCK>(s);
    const float c1 = a.rms ? 0.f : div_rn_ftz(s.x, n);
    const float c2 = div_rn_ftz(s.y, n);

    // pass 2: dh
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const int j = (k * TPR + map.lane) * V;
      if (j < cols) write_dh<S, V>(a, base + j, g[k], xh[k], rstd, c1, c2);
    }
  }
}

// Rows of any length (preconditions of norm_fwd_looped_kernel); pass 2 reads dy, h and the
// weight again.
template <typename T, typename S, int V, int TPR, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kLoopThreadsPerSM / BLOCK)
    norm_bwd_looped_kernel(const BwdArgs a) {
  const RowMap<TPR, BLOCK> map;
  const int64_t start = static_cast<int64_t>(map.lane) * V;
  constexpr int64_t kStride = int64_t{TPR} * V;
  const float n = static_cast<float>(a.cols);

  for (int64_t row = map.first; row < a.rows; row += map.step) {
    const int64_t base = row * a.cols;
    const float mean = a.mean != nullptr ? a.mean[row] : 0.f;
    const float rstd = a.rstd[row];

    // pass 1: sum g, sum g * xhat
    float2 s = make_float2(0.f, 0.f);
    for (int64_t j = start; j < a.cols; j += kStride) {
      float g[V], xh[V];
      load_g_xhat<T, S, V>(a, base + j, j, mean, rstd, g, xh);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        s.x += g[i];
        s.y += g[i] * xh[i];
      }
    }
    s = row_sum<TPR, BLOCK>(s);
    const float c1 = a.rms ? 0.f : div_rn_ftz(s.x, n);
    const float c2 = div_rn_ftz(s.y, n);

    // pass 2: dh
    for (int64_t j = start; j < a.cols; j += kStride) {
      float g[V], xh[V];
      load_g_xhat<T, S, V>(a, base + j, j, mean, rstd, g, xh);
      write_dh<S, V>(a, base + j, g, xh, rstd, c1, c2);
    }
  }
}

// ------------------------------------------------------------------ backward: dw, db

struct PartialArgs {
  const void* dy;     // (rows, cols) T
  const void* h;      // (rows, cols) S
  const float* mean;  // (rows), or null (rms)
  const float* rstd;  // (rows)
  float* work;        // [2][nblk][cols]: the dw partials, then the db partials
  int64_t rows, cols, nblk, ntiles;
  bool need_dw;  // false: only db is wanted, h is not read
};

// Tiles t = blk * ntiles + tile, grid-stride. Thread (tx, ty) sums rows blk * 64 + ty + 8 * i
// (i = 0..7, in order) of columns tile * 64 + tx and tile * 64 + tx + 32; the first 64 threads
// then add the 8 thread-row sums of their column in ty order and write the (blk, column)
// partials. The order depends on nothing but (rows, cols).
template <typename T, typename S>
__global__ void __launch_bounds__(kPartialThreads) norm_bwd_partial_kernel(const PartialArgs a) {
  __shared__ float sdw[kPartialRows][kTileCols];
  __shared__ float sdb[kPartialRows][kTileCols];
  const int tx = static_cast<int>(threadIdx.x) % kWarp;
  const int ty = static_cast<int>(threadIdx.x) / kWarp;
  const T* dy = static_cast<const T*>(a.dy);
  const S* h = static_cast<const S*>(a.h);
  const int64_t total = a.nblk * a.ntiles;

  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int64_t blk = t / a.ntiles;
    const int64_t c0 = (t - blk * a.ntiles) * kTileCols;
    const int64_t r0 = blk * kNormRowsPerBlock;
    float dw[2] = {0.f, 0.f};
    float db[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t r = r0 + ty + int64_t{kPartialRows} * i;
      if (r < a.rows) {
        const float mean = a.mean != nullptr ? a.mean[r] : 0.f;
        const float rstd = a.rstd[r];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int64_t c = c0 + tx + int64_t{kWarp} * k;
          if (c < a.cols) {
            const int64_t off = r * a.cols + c;
            const float g = to_acc(dy[off]);
            db[k] += g;
            if (a.need_dw) dw[k] += g * ((to_acc(h[off]) - mean) * rstd);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      sdw[ty][tx + kWarp * k] = dw[k];
      sdb[ty][tx + kWarp * k] = db[k];
    }
    __syncthreads();
    if (threadIdx.x < kTileCols) {
      const int64_t c = c0 + threadIdx.x;
      if (c < a.cols) {
        float sw = 0.f, sb = 0.f;
#pragma unroll
        for (int y = 0; y < kPartialRows; ++y) {
          sw += sdw[y][threadIdx.x];
          sb += sdb[y][threadIdx.x];
        }
        a.work[blk * a.cols + c] = sw;
        a.work[(a.nblk + blk) * a.cols + c] = sb;
      }
    }
    __syncthreads();  // sdw and sdb are reused by the next tile
  }
}

// dw[c] = the dw partials of column c added in row-block order (db likewise); nblk == 0 gives
// zeros.
__global__ void __launch_bounds__(kFinalizeThreads)
    norm_bwd_finalize_kernel(const float* __restrict__ work, float* __restrict__ dw,
                             float* __restrict__ db, const int64_t cols, const int64_t nblk) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kFinalizeThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x; c < cols;
       c += step) {
    float sw = 0.f, sb = 0.f;
#pragma unroll 8  // the loads run ahead of the (ordered) chain of adds
    for (int64_t b = 0; b < nblk; ++b) {
      sw += work[b * cols + c];
      sb += work[(nblk + b) * cols + c];
    }
    if (dw != nullptr) dw[c] = sw;
    if (db != nullptr) db[c] = sb;
  }
}

// ------------------------------------------------------------------ launchers

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((work_items + per_block - 1) / per_block, kMaxBlocks)));
}

// One launch of a row kernel K with BLOCK threads of TPR threads per row.
template <int TPR, int BLOCK, typename Args>
cudaError_t launch_rows(void (*kernel)(Args), const Args& a, cudaStream_t stream) {
  kernel<<<grid_for(a.rows, BLOCK / TPR), BLOCK, 0, stream>>>(a);
  return cudaGetLastError();
}

// The shape for the row length and alignment: see the table at the top of the file.
template <typename T, typename S>
cudaError_t fwd_typed(const FwdArgs& a, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const bool vec = a.cols % V == 0 && aligned16(a.x) && aligned16(a.residual) &&
                   aligned16(a.weight) && aligned16(a.bias) && aligned16(a.y) && aligned16(a.h);
  if (vec) {
    if (a.cols <= kWarpMaxCols) {
      return launch_rows<kWarp, kWarpBlock>(
          norm_fwd_cached_kernel<T, S, kWarp, kWarpBlock, kWarpItems / V>, a, stream);
    }
    if (a.cols <= kMidMaxCols) {
      return launch_rows<kMidBlock, kMidBlock>(
          norm_fwd_cached_kernel<T, S, kMidBlock, kMidBlock, kMidItems / V>, a, stream);
    }
    if (a.cols <= kBigMaxCols) {
      return launch_rows<kBigBlock, kBigBlock>(
          norm_fwd_cached_kernel<T, S, kBigBlock, kBigBlock, kBigItems / V>, a, stream);
    }
    return launch_rows<kLoopBlock, kLoopBlock>(
        norm_fwd_looped_kernel<T, S, V, kLoopBlock, kLoopBlock>, a, stream);
  }
  if (a.cols <= kWarpMaxCols) {
    return launch_rows<kWarp, kWarpBlock>(norm_fwd_looped_kernel<T, S, 1, kWarp, kWarpBlock>, a,
                                          stream);
  }
  if (a.cols <= kMidMaxCols) {
    return launch_rows<kMidBlock, kMidBlock>(norm_fwd_looped_kernel<T, S, 1, kMidBlock, kMidBlock>,
                                             a, stream);
  }
  return launch_rows<kLoopBlock, kLoopBlock>(
      norm_fwd_looped_kernel<T, S, 1, kLoopBlock, kLoopBlock>, a, stream);
}

// S is T, or float for 16-bit T.
template <typename T>
cudaError_t fwd_stream(const NormFwdParams& p, const FwdArgs& a, cudaStream_t stream) {
  // Without a residual, S is never read or written: use the T == S kernels.
  if (p.stream_dtype == p.dtype || a.residual == nullptr) return fwd_typed<T, T>(a, stream);
  if constexpr (!std::is_same_v<T, float>) {
    if (p.stream_dtype == DType::F32) return fwd_typed<T, float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename S>
cudaError_t bwd_rows(const BwdArgs& a, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const bool vec = a.cols % V == 0 && aligned16(a.dy) && aligned16(a.dh_out) && aligned16(a.h) &&
                   aligned16(a.weight) && aligned16(a.dh);
  if (vec) {
    if (a.cols <= kWarpMaxCols) {
      return launch_rows<kWarp, kWarpBlock>(
          norm_bwd_cached_kernel<T, S, kWarp, kWarpBlock, kWarpItems / V>, a, stream);
    }
    if (a.cols <= kMidMaxCols) {
      return launch_rows<kMidBlock, kMidBlock>(
          norm_bwd_cached_kernel<T, S, kMidBlock, kMidBlock, kMidItems / V>, a, stream);
    }
    if (a.cols <= kBigMaxCols) {
      return launch_rows<kBigBlock, kBigBlock>(
          norm_bwd_cached_kernel<T, S, kBigBlock, kBigBlock, kBigItems / V>, a, stream);
    }
    return launch_rows<kLoopBlock, kLoopBlock>(
        norm_bwd_looped_kernel<T, S, V, kLoopBlock, kLoopBlock>, a, stream);
  }
  if (a.cols <= kWarpMaxCols) {
    return launch_rows<kWarp, kWarpBlock>(norm_bwd_looped_kernel<T, S, 1, kWarp, kWarpBlock>, a,
                                          stream);
  }
  if (a.cols <= kMidMaxCols) {
    return launch_rows<kMidBlock, kMidBlock>(norm_bwd_looped_kernel<T, S, 1, kMidBlock, kMidBlock>,
                                             a, stream);
  }
  return launch_rows<kLoopBlock, kLoopBlock>(
      norm_bwd_looped_kernel<T, S, 1, kLoopBlock, kLoopBlock>, a, stream);
}

// dh, then (when dw or db is wanted) the partial sums and their ordered totals.
template <typename T, typename S>
cudaError_t bwd_typed(const NormBwdParams& p, const BwdArgs& a, float* work, cudaStream_t stream) {
  if (a.rows > 0) {
    const cudaError_t err = bwd_rows<T, S>(a, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.dw == nullptr && p.db == nullptr) return cudaSuccess;

  const int64_t nblk = (a.rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock;
  if (nblk > 0) {
    PartialArgs pa{};
    pa.dy = a.dy;
    pa.h = a.h;
    pa.mean = a.mean;
    pa.rstd = a.rstd;
    pa.work = work;
    pa.rows = a.rows;
    pa.cols = a.cols;
    pa.nblk = nblk;
    pa.ntiles = (a.cols + kTileCols - 1) / kTileCols;
    pa.need_dw = p.dw != nullptr;
    norm_bwd_partial_kernel<T, S>
        <<<grid_for(nblk * pa.ntiles, 1), kPartialThreads, 0, stream>>>(pa);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  norm_bwd_finalize_kernel<<<grid_for(a.cols, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
      work, static_cast<float*>(p.dw), static_cast<float*>(p.db), a.cols, nblk);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_stream(const NormBwdParams& p, const BwdArgs& a, float* work, cudaStream_t stream) {
  if (p.stream_dtype == p.dtype) return bwd_typed<T, T>(p, a, work, stream);
  if constexpr (!std::is_same_v<T, float>) {
    if (p.stream_dtype == DType::F32) return bwd_typed<T, float>(p, a, work, stream);
  }
  return cudaErrorInvalidValue;
}

bool is_float_data(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16; }

// S must be T, or F32 when T is 16-bit.
bool valid_stream(DType t, DType s) {
  return s == t || (s == DType::F32 && (t == DType::F16 || t == DType::BF16));
}

}  // namespace

cudaError_t norm_fwd_cuda(const NormFwdParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F64 || p.stream_dtype == DType::F64) return cudaErrorNotSupported;
  if (!is_float_data(p.dtype) || !valid_stream(p.dtype, p.stream_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows < 0 || p.cols < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr || p.rstd == nullptr) return cudaErrorInvalidValue;
  if ((p.residual == nullptr) != (p.h == nullptr)) return cudaErrorInvalidValue;
  if (!p.rms && p.mean == nullptr) return cudaErrorInvalidValue;

  FwdArgs a{};
  a.x = p.x;
  a.residual = p.residual;
  a.weight = static_cast<const float*>(p.weight);
  a.bias = static_cast<const float*>(p.bias);
  a.y = p.y;
  a.h = p.h;
  a.mean = p.rms ? nullptr : static_cast<float*>(p.mean);
  a.rstd = static_cast<float*>(p.rstd);
  a.rows = p.rows;
  a.cols = p.cols;
  a.eps = static_cast<float>(p.eps);
  a.rms = p.rms;

  switch (p.dtype) {
    case DType::F32:
      return fwd_stream<float>(p, a, stream);
    case DType::F16:
      return fwd_stream<__half>(p, a, stream);
    case DType::BF16:
      return fwd_stream<__nv_bfloat16>(p, a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t norm_bwd_cuda(const NormBwdParams& p, float* workspace, cudaStream_t stream) {
  if (p.dtype == DType::F64 || p.stream_dtype == DType::F64) return cudaErrorNotSupported;
  if (!is_float_data(p.dtype) || !valid_stream(p.dtype, p.stream_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows < 0 || p.cols < 0) return cudaErrorInvalidValue;
  const bool want_params = p.dw != nullptr || p.db != nullptr;
  if (p.cols == 0 || (p.rows == 0 && !want_params)) return cudaSuccess;
  if (p.rows > 0) {
    if (p.dy == nullptr || p.h == nullptr || p.rstd == nullptr || p.dh == nullptr) {
      return cudaErrorInvalidValue;
    }
    if (!p.rms && p.mean == nullptr) return cudaErrorInvalidValue;
    if (want_params && workspace == nullptr) return cudaErrorInvalidValue;
  }

  BwdArgs a{};
  a.dy = p.dy;
  a.dh_out = p.dh_out;
  a.h = p.h;
  a.weight = static_cast<const float*>(p.weight);
  a.mean = p.rms ? nullptr : static_cast<const float*>(p.mean);
  a.rstd = static_cast<const float*>(p.rstd);
  a.dh = p.dh;
  a.rows = p.rows;
  a.cols = p.cols;
  a.rms = p.rms;

  switch (p.dtype) {
    case DType::F32:
      return bwd_stream<float>(p, a, workspace, stream);
    case DType::F16:
      return bwd_stream<__half>(p, a, workspace, stream);
    case DType::BF16:
      return bwd_stream<__nv_bfloat16>(p, a, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lmk
