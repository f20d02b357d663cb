// Cross entropy over the rows of a (rows, cols) logits matrix: per row the loss and, when asked,
// the gradient of scale_r * loss_r, in one kernel. Torch-free: raw pointers, sizes, strides and a
// stream; the contract (formulas, weights, label smoothing, soft-cap, z-loss, ignored rows) is
// lmk/cross_entropy.h.
//
// Algorithm: one thread block per row (rows visited grid-stride), two passes over the row.
//   pass 1  read x once: z = softcap(x); per thread the online (max m, sum s of exp(z - m)),
//           lmk/online_softmax.h, with one rescale per new maximum (not per element), and, with
//           label smoothing only, the sums S = sum w_c z_c and W = sum w_c. They are reduced over
//           the block (a warp butterfly, then one warp over the warps' partials, in a fixed
//           order). Thread 0 reads x_t, w_t and scale_r at the start of the row (only for a valid
//           target), forms lse = m + log s, the loss and the gradient's coefficients, and
//           broadcasts them through shared memory.
//   pass 2  (only with a gradient) read x again, recompute z and p = exp(z - lse), and write
//           grad_c = scale_r * (p_c coef - eps w_c / cols - [c == t] (1 - eps) w_t) * dz/dx,
//           rounded once to the data type. Each element is read and written by the same
//           thread, after the block's barrier that ends pass 1: grad may alias the logits.
//   An ignored row (t == ignore_index or t outside [0, cols)) reads no logit: loss 0 and a zero
//   gradient row.
//
// Memory traffic per valid row: the loss alone reads cols * sizeof(T); with the gradient the row
// is read twice and written once (3 * cols * sizeof(T)). The second read hits L2 while the rows
// in flight fit: one or two rows per SM, e.g. 132 x 2 x 64 KB for 32k bf16 columns (17 MB), but
// 256k-column rows (512 KB each) exceed the 50 MB L2 of an H100 and are read twice from memory.
// The fp32 weight is streamed only with label smoothing (the eps terms need w_c); otherwise just
// w_t is read.
//
// Vectorisation: each row is cut at its first and last 16-byte boundaries; the middle moves as
// 16-byte vectors (4 x fp32, 8 x fp16/bf16), and the fewer than 2 * 8 elements outside it (row
// starts off a boundary whenever the row stride is not a multiple of the vector, e.g. 50257
// columns) one at a time by the block's first threads. So every row, aligned or not, streams as
// vectors. The gradient row is written with vector stores when it sits at the same offset from a
// 16-byte boundary as the logits row (in place, or both contiguous), element by element
// otherwise. Each thread loads two vectors before using either (written out: in pass 2 the
// compiler may not move a load above a gradient store that could alias it). Weights are read
// one element at a time (fp32, L1/L2-resident).
//
// Launch: the block size grows with cols, 128 (cols <= 2048), 256 (<= 8192), 512 (<= 65536),
// 1024 threads beyond: about 8 to 250 elements per thread and pass (62 for 32000 columns, 125
// for 128256; untuned: no GPU has run it yet). __launch_bounds__ asks for 1024 resident
// threads per SM (<= 64 registers per thread). The 1-D grid has at most kMaxBlocks blocks and
// loops over further rows, so any row count works; all offsets are 64-bit.
//
// Numerics: fp32 math and accumulation for fp32/fp16/bf16 data (the module is built without
// --use_fast_math: IEEE expf / logf / tanhf). The soft-cap is cap * tanhf(x * (1 / cap)) and its
// derivative 1 - tanh^2. NaN in a valid row makes its loss and gradient NaN; without a soft-cap a
// +inf logit does too (exp(inf - inf)), as in the reference. -inf logits are fine (p = 0 there);
// with label smoothing they make S = -inf and the loss +inf, as in torch. The eps term is left
// out at eps = 0 (the contract), so S and W are then neither formed nor read.
//
// Device primitives (barrier, shuffle, shared declarations, launch) sit in one block below; a host
// test harness may define LMK_CE_EMULATE and provide them to run the kernel on a CPU
// (tests/test_cuda_cross_entropy.py).
//
// Limits: fp64 data is not supported (cudaErrorNotSupported). One block per row: a handful of very
// long rows cannot fill a big GPU (a split-row variant would be the next step). Deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lmk/cross_entropy.h"
#include "lmk/cross_entropy_cuda.h"
#include "lmk/cuda_acc.h"
#include "lmk/online_softmax.h"

#ifndef LMK_CE_MAX_BLOCKS
#define LMK_CE_MAX_BLOCKS (int64_t{1} << 20)  // grid cap; the kernel loops over further rows
#endif

namespace lmk {
namespace {

// ------------------------------------------------------------------ device primitives

#ifndef LMK_CE_EMULATE
__device__ __forceinline__ void block_sync() { __syncthreads(); }

__device__ __forceinline__ float shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

// a * b rounded, never contracted into a later add: the soft-capped logit is formed in each pass
// and apart for the target; a contraction in one place only would make them differ (lse - z_t).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }

#define LMK_CE_SHARED __shared__

#define LMK_CE_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif  // LMK_CE_EMULATE

// ------------------------------------------------------------------ constants and arguments

constexpr int64_t kMaxBlocks = LMK_CE_MAX_BLOCKS;
constexpr int kWarp = 32;
// Occupancy floor given to ptxas (caps registers at 64 per thread): enough warps in flight to
// cover memory latency, and the same register budget for every block size.
constexpr int kMinThreadsPerSM = 1024;

// Everything the kernel needs, by value.
struct Args {
  const void* logits;     // (rows, cols) of T, row r at element r * x_stride; may alias grad
  void* grad;             // (rows, cols) of T, row r at element r * g_stride; null: not written
  const int64_t* target;  // [rows]
  const float* weight;    // [cols], or null: all ones
  const float* scale;     // read at r * scale_stride, or null: 1
  float* loss;            // [rows], or null: not written
  int64_t rows, cols, x_stride, g_stride, scale_stride, ignore_index;
  float eps, one_minus_eps, eps_over_cols;  // label smoothing, 1 - eps, eps / cols
  float cap, inv_cap;                       // soft-cap (0: none) and 1 / cap
  float z_loss;
  bool smooth;  // eps > 0: form S (and W) in pass 1, add the eps terms
  bool wread;   // stream the weight in both passes: a weight and eps > 0
};

// N consecutive elements moved as one 16-byte load/store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One row cut at its 16-byte boundaries: `head` elements before the first boundary, then `nvec`
// vectors of V elements, then the tail; `extra` = head + tail elements go one at a time
// (extra < 2 V <= 16, fewer than any block's threads). Element e < extra is column
// extra_col(e).
template <typename T>
struct RowSplit {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  int64_t head, nvec;
  int extra;

  __device__ __forceinline__ RowSplit(const T* row, int64_t cols) {
    const int64_t off = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16 / sizeof(T));
    head = std::min<int64_t>(cols, (V - off) % V);
    nvec = (cols - head) / V;
    extra = static_cast<int>(cols - nvec * V);
  }
  __device__ __forceinline__ int64_t extra_col(int e) const { return e < head ? e : e + nvec * V; }
};

// ------------------------------------------------------------------ row statistics

// Per-thread, then per-row, statistics of pass 1.
struct Part {
  float m;  // running max of z (-inf: nothing seen)
  float s;  // sum of exp(z - m)
  float S;  // sum of w_c z_c (label smoothing only)
  float W;  // sum of w_c (label smoothing with a weight only)
};

__device__ __forceinline__ Part part_empty() { return {-INFINITY, 0.f, 0.f, 0.f}; }

__device__ __forceinline__ Part part_combine(const Part& a, const Part& b) {
  const SoftmaxStats<float> st = softmax_combine(SoftmaxStats<float>{a.m, a.s}, {b.m, b.s});
  return {st.m, st.s, a.S + b.S, a.W + b.W};
}

// Adds N values z to the online (m, s): the sum is rescaled once when the maximum grows (a NaN
// maximum compares unequal, so it always reaches s), then each exp(z - m) is added. With
// m = -inf every z so far is -inf and adds 0 (softmax_exp_shift's rule); otherwise exp(z - m) is
// already 0 for z = -inf, so the -inf test is made once per pack, not per element.
template <int N>
__device__ __forceinline__ void push_values(Part& p, const float (&z)[N]) {
  float vmax = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) vmax = softmax_max(vmax, z[i]);
  const float m = softmax_max(p.m, vmax);
  if (m != p.m) p.s *= softmax_exp_shift(p.m, m);
  p.m = m;
  if (m != -INFINITY) {
#pragma unroll
    for (int i = 0; i < N; ++i) p.s += softmax_exp(z[i] - m);
  }
}

// z = softcap(x) of N elements, and dz/dx = 1 - tanh^2 (1 without a soft-cap). The soft-cap
// test is made once per pack: per element it stays a branch (ptxas does not unswitch the loops).
template <typename T, int N>
__device__ __forceinline__ void softcap_z(const Pack<T, N>& in, const Args& a, float (&z)[N],
                                          float (&dz)[N]) {
  if (a.cap > 0.f) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float th = tanhf(to_acc(in.v[i]) * a.inv_cap);
      z[i] = mul_rn(a.cap, th);
      dz[i] = 1.f - th * th;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      z[i] = to_acc(in.v[i]);
      dz[i] = 1.f;
    }
  }
}

// Pass 1 for the N elements of a pack at columns c0 ..: (m, s), and S, W with label smoothing.
template <typename T, int N>
__device__ __forceinline__ void accumulate(Part& st, const Pack<T, N>& in, int64_t c0,
                                           const Args& a) {
  float z[N], dz[N];
  softcap_z(in, a, z, dz);
  push_values(st, z);
  if (a.wread) {
    const float* w = a.weight + c0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      st.S += w[i] * z[i];
      st.W += w[i];
    }
  } else if (a.smooth) {
#pragma unroll
    for (int i = 0; i < N; ++i) st.S += z[i];
  }
}

__device__ __forceinline__ Part warp_reduce(Part v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const Part o{shfl_xor(v.m, offset), shfl_xor(v.s, offset), shfl_xor(v.S, offset),
                 shfl_xor(v.W, offset)};
    v = part_combine(v, o);
  }
  return v;
}

// The row's statistics in thread 0 (other threads: partial values). One barrier between the
// warps' partials being written and warp 0 reading them; the caller's broadcast barrier keeps
// the next row's writes after those reads.
template <int BLOCK>
__device__ __forceinline__ Part block_reduce(Part v) {
  constexpr int kWarps = BLOCK / kWarp;
  LMK_CE_SHARED Part partial[kWarps];
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  v = warp_reduce(v);
  if (lane == 0) partial[warp] = v;
  block_sync();
  if (warp == 0) {
    v = lane < kWarps ? partial[lane] : part_empty();
    v = warp_reduce(v);
  }
  return v;
}

// What pass 2 needs, formed by thread 0: grad_c = (p_c k1 - kw w_c) * dz/dx for c != t, and
// for the target ((p_t - 1) kt + (p_t W - w_t) kw + p_t kz) * dz/dx: the terms apart, so that
// nothing cancels when p_t is near 1 (a confident prediction; one class).
struct Coef {
  float lse;
  float k1;     // scale_r * ((1 - eps) w_t + eps W / cols + 2 z_loss lse)
  float kw;     // scale_r * eps / cols
  float kt;     // scale_r * (1 - eps) w_t
  float kz;     // scale_r * 2 z_loss lse
  float big_w;  // W
};

// ------------------------------------------------------------------ kernel

// Pass 2 for the N elements of a pack at columns c0 ..: the gradient, rounded to T.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> grad_pack(const Pack<T, N>& in, int64_t c0, int64_t t,
                                                const Coef& k, const Args& a) {
  float z[N], dz[N], p[N], w[N];
  softcap_z(in, a, z, dz);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    p[i] = softmax_exp(z[i] - k.lse);
    w[i] = a.wread ? a.weight[c0 + i] : 1.f;
  }
  const int64_t at = t - c0;  // the target's place in the pack, if it is there
  Pack<T, N> out;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float g = p[i] * k.k1 - k.kw * w[i];
    if (i == at) g = (p[i] - 1.f) * k.kt + (p[i] * k.big_w - w[i]) * k.kw + p[i] * k.kz;
    out.v[i] = from_acc<T>(g * dz[i]);  // (* 1 without a soft-cap: exact)
  }
  return out;
}

// Pack j of a gradient row's vector part: one 16-byte store, or one per element when the row
// is not at the logits row's offset from a 16-byte boundary.
template <typename T, int N>
__device__ __forceinline__ void store_grad(T* gh, int64_t j, const Pack<T, N>& out, bool vec) {
  if (vec) {
    reinterpret_cast<Pack<T, N>*>(gh)[j] = out;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) gh[j * N + i] = out.v[i];
  }
}

// Zeros over one gradient row (an ignored target).
template <typename T, int BLOCK>
__device__ __forceinline__ void zero_row(T* gr, int64_t cols) {
  constexpr int V = RowSplit<T>::V;
  const RowSplit<T> sp(gr, cols);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid < sp.extra) gr[sp.extra_col(tid)] = from_acc<T>(0.f);
  Pack<T, V> zero;
#pragma unroll
  for (int i = 0; i < V; ++i) zero.v[i] = from_acc<T>(0.f);
  auto* gv = reinterpret_cast<Pack<T, V>*>(gr + sp.head);
  for (int64_t k = tid; k < sp.nvec; k += BLOCK) gv[k] = zero;
}

// One block per row, grid-stride over the rows (see the header comment).
template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kMinThreadsPerSM / BLOCK)
    cross_entropy_kernel(const Args a) {
  constexpr int V = RowSplit<T>::V;
  using P = Pack<T, V>;
  LMK_CE_SHARED Coef shared_coef;
  const int tid = static_cast<int>(threadIdx.x);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t t = a.target[row];
    T* gr = a.grad == nullptr ? nullptr : static_cast<T*>(a.grad) + row * a.g_stride;
    if (t == a.ignore_index || t < 0 || t >= a.cols) {  // ignored: no logit is read
      if (tid == 0 && a.loss != nullptr) a.loss[row] = 0.f;
      if (gr != nullptr) zero_row<T, BLOCK>(gr, a.cols);
      continue;
    }
    const T* xr = static_cast<const T*>(a.logits) + row * a.x_stride;
    const RowSplit<T> sp(xr, a.cols);
    const P* xv = reinterpret_cast<const P*>(xr + sp.head);
    float zt = 0.f, wt = 1.f, sc = 1.f;
    if (tid == 0) {
      float z[1], dz[1];
      softcap_z(Pack<T, 1>{{xr[t]}}, a, z, dz);
      zt = z[0];
      if (a.weight != nullptr) wt = a.weight[t];
      if (a.scale != nullptr) sc = a.scale[row * a.scale_stride];
    }

    // pass 1: online (max, sum exp), S and W of this thread's elements, then of the row; two
    // 16-byte loads are issued before either pack is used
    Part st = part_empty();
    if (tid < sp.extra) {
      const int64_t c = sp.extra_col(tid);
      accumulate(st, Pack<T, 1>{{xr[c]}}, c, a);
    }
    for (int64_t j = tid; j < sp.nvec; j += 2 * BLOCK) {
      const bool two = j + BLOCK < sp.nvec;
      const P in0 = xv[j];
      P in1;
      if (two) in1 = xv[j + BLOCK];
      accumulate(st, in0, sp.head + j * V, a);
      if (two) accumulate(st, in1, sp.head + (j + BLOCK) * V, a);
    }
    st = block_reduce<BLOCK>(st);

    if (tid == 0) {
      const float lse = st.m + softmax_log(st.s);
      const float cols = static_cast<float>(a.cols);
      const float big_w = a.wread ? st.W : cols;
      if (a.loss != nullptr) {
        float loss = a.one_minus_eps * wt * (lse - zt) + a.z_loss * lse * lse;
        if (a.smooth) loss += a.eps_over_cols * (big_w * lse - st.S);
        a.loss[row] = loss;
      }
      const float coef = a.one_minus_eps * wt + a.eps * big_w / cols + 2.f * a.z_loss * lse;
      shared_coef = Coef{lse,
                         sc * coef,
                         sc * a.eps_over_cols,
                         sc * (a.one_minus_eps * wt),
                         sc * 2.f * a.z_loss * lse,
                         big_w};
    }
    block_sync();  // shared_coef ready; every thread's pass-1 reads of the row are done
    if (gr == nullptr) continue;
    const Coef k = shared_coef;

    // pass 2: the gradient, each element written by the thread that reads it (both packs are
    // read before either is written)
    if (tid < sp.extra) {
      const int64_t c = sp.extra_col(tid);
      gr[c] = grad_pack(Pack<T, 1>{{xr[c]}}, c, t, k, a).v[0];
    }
    const uintptr_t phase = reinterpret_cast<uintptr_t>(gr) - reinterpret_cast<uintptr_t>(xr);
    const bool vec_store = phase % 16 == 0;  // grad row as far from a 16-byte boundary as xr
    T* gh = gr + sp.head;
    for (int64_t j = tid; j < sp.nvec; j += 2 * BLOCK) {
      const bool two = j + BLOCK < sp.nvec;
      const P in0 = xv[j];
      P in1;
      if (two) in1 = xv[j + BLOCK];
      store_grad(gh, j, grad_pack(in0, sp.head + j * V, t, k, a), vec_store);
      if (two)
        store_grad(gh, j + BLOCK, grad_pack(in1, sp.head + (j + BLOCK) * V, t, k, a), vec_store);
    }
  }
}

// ------------------------------------------------------------------ launchers

template <typename T, int BLOCK>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min(a.rows, kMaxBlocks));
  LMK_CE_LAUNCH((cross_entropy_kernel<T, BLOCK>), grid, BLOCK, stream, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const Args& a, cudaStream_t stream) {
  if (a.cols <= 2048) return launch<T, 128>(a, stream);
  if (a.cols <= 8192) return launch<T, 256>(a, stream);
  if (a.cols <= 65536) return launch<T, 512>(a, stream);
  return launch<T, 1024>(a, stream);
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

cudaError_t cross_entropy_cuda(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.dtype == DType::F64) return cudaErrorNotSupported;
  const bool float_data = p.dtype == DType::F32 || p.dtype == DType::F16 || p.dtype == DType::BF16;
  if (!float_data || p.rows < 0 || p.cols < 0) return cudaErrorInvalidValue;
  if (p.scale_stride != 0 && p.scale_stride != 1) return cudaErrorInvalidValue;
  if (!(p.label_smoothing >= 0.0 && p.label_smoothing <= 1.0) ||
      !(p.softcap >= 0.0 && p.softcap < INFINITY) || !(p.z_loss >= 0.0 && p.z_loss < INFINITY)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0 || (p.cols == 0 && p.loss == nullptr)) return cudaSuccess;
  if (p.loss == nullptr && p.grad == nullptr) return cudaErrorInvalidValue;
  const int64_t esize = dtype_size(p.dtype);
  if (p.target == nullptr || !aligned(p.target, 8)) return cudaErrorInvalidValue;
  if (p.cols > 0 && (p.logits == nullptr || !aligned(p.logits, esize))) {
    return cudaErrorInvalidValue;
  }
  if (p.rows > 1 && p.logits_row_stride < p.cols) return cudaErrorInvalidValue;
  if (p.grad != nullptr &&
      (!aligned(p.grad, esize) || (p.rows > 1 && p.grad_row_stride < p.cols))) {
    return cudaErrorInvalidValue;
  }

  Args a{};
  a.logits = p.logits;
  a.grad = p.cols > 0 ? p.grad : nullptr;
  a.target = p.target;
  a.weight = static_cast<const float*>(p.weight);
  a.scale = static_cast<const float*>(p.scale);
  a.loss = static_cast<float*>(p.loss);
  a.rows = p.rows;
  a.cols = p.cols;
  a.x_stride = p.logits_row_stride;
  a.g_stride = p.grad_row_stride;
  a.scale_stride = p.scale_stride;
  a.ignore_index = p.ignore_index;
  // each option rounded to fp32 once; the derived constants in fp32, as the reference forms them
  a.eps = static_cast<float>(p.label_smoothing);
  a.one_minus_eps = 1.f - a.eps;
  a.eps_over_cols = p.cols > 0 ? a.eps / static_cast<float>(p.cols) : 0.f;
  a.cap = static_cast<float>(p.softcap);
  a.inv_cap = a.cap > 0.f ? 1.f / a.cap : 0.f;
  a.z_loss = static_cast<float>(p.z_loss);
  a.smooth = p.label_smoothing > 0.0;  // (a tiny eps rounds to 0.f: the term is then 0)
  a.wread = a.weight != nullptr && a.smooth;

  switch (p.dtype) {
    case DType::F32:
      return dispatch<float>(a, stream);
    case DType::F16:
      return dispatch<__half>(a, stream);
    case DType::BF16:
      return dispatch<__nv_bfloat16>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lmk
