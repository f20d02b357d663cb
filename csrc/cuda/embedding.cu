// Embedding lookup and its deterministic weight gradient (contract: lmk/embedding.h; entry points
// and the caller's part: lmk/embedding_cuda.h). Torch-free: raw pointers, sizes and a stream.
//
// Forward, two kernels on one stream:
//   embedding_check_kernel   grid-stride over the tokens; a thread that meets an index outside
//                            [0, num_embeddings) does one atomicMin of its position into the
//                            int64 `status` (set to all ones first) and stops: status ends as
//                            the first bad position. The atomic only orders the check; it never
//                            touches the results.
//   embedding_gather_kernel  reads `status` first and returns when an index was bad, so a bad
//                            index never reaches an address. A group of G lanes (G the smallest
//                            power of two >= the row's words, at most 32) copies one token's row,
//                            grid-stride over the tokens; each lane moves up to kGatherUnroll
//                            words per step (all loads, then all stores). The copy is a plain
//                            byte copy in words W of 16, 8, 4 or 2 bytes: the widest that divides
//                            the weight and out pointers, the row length and the row stride in
//                            bytes. Any dtype's bits (NaN payloads included) are copied as they
//                            are.
// Backward (embedding_bwd_kernel): the caller has sorted the tokens by row (stably), cut them
// into segments, one per distinct row, zeroed dw and (with scale_grad_by_freq) computed each
// segment's scale 1 / count (the exact double reciprocal rounded to A, the CPU backend's scale).
// Grid x runs over the segments, a group of G lanes per segment (G the smallest power of two >=
// the row's packs, at most 32; grid-stride), grid y over tiles of G packs (grid-stride). A pack
// is V = 16 / sizeof(T) consecutive columns (one 16-byte load of dy, unpacked with bit
// operations), or one column when dim is not a multiple of V or dy / dw is not 16-byte aligned.
// Each lane adds its pack of the segment's dy rows in the segment's order (increasing t) into
// fp32 (fp64 for fp64) registers, multiplies by the scale and stores the row once, rounded (RNE)
// to T. The token loop keeps kBwdBatch dy loads in flight per lane (the token ids of the next
// batch load while the current batch is added), because the contract's order makes each
// column's sum one chain of dependent adds. padding_idx and rows never looked up stay as the
// caller zeroed them. No atomics on data: each dw element is written by exactly one thread, and
// the bits depend only on idx and dy.
//
// Fused token + positional forward (contract: embedding.h), two kernels on one stream:
//   token_pos_check_kernel   the index check of ids and positions together: a bad id at t
//                            reports t, a bad position n + t, into one atomicMin on `status`,
//                            so it ends as the first bad id, else n + the first bad position.
//   token_pos_fwd_kernel     reads `status` first and returns when anything was bad. A group of
//                            G lanes per token row (as in the gather), each lane kTpUnroll units
//                            per step: a unit is 16 bytes (V = 16 / sizeof(T) columns, one
//                            access of each table row and of out) when both tables' and out's
//                            rows are 16-byte aligned and whole units, else a column pair
//                            (element accesses). out = round_T(scale * tok + pe) with add.rn /
//                            mul.rn (never fused; bit for bit the reference for a learned table).
//                            The sinusoid: one sinusoid_pair per column pair (sin to the even,
//                            cos to the odd column); its f64 reduction may fuse into FMAs and its
//                            f32 polynomials run with -ftz, both within the contract's few ulp.
//                            The index arrays' widths are run-time flags (a uniform branch).
//
// Numerics: nvcc may fuse multiply-adds (its default); the backward's
// adds and the scale multiply are written as add.rn.f32 / mul.rn.f32 PTX (fp64: __dadd_rn /
// __dmul_rn), so they are IEEE operations that keep denormals and are never fused (the PTX has
// no .ftz operation): the sums, started from +0 like the reference's zero-filled table, are bit
// for bit the reference's in-order sums, and with scale_grad_by_freq the CPU backend's scaled
// rows (the reference divides by the count instead: within an ulp). Conversions of 16-bit data
// to fp32 are exact; the final rounding to fp16/bf16 is __float2half_rn / __float2bfloat16_rn.
//
// Memory traffic: forward n * 4 (or 8) bytes of idx read twice (check and gather) plus one read
// of each looked-up row and one write of out (the fused forward: both index arrays twice, both
// tables' rows (or inv_freq) once, out once); backward one read of dy, the order / offsets /
// rows / scale arrays, and one write of the touched dw rows (after the caller's zero fill of dw;
// the caller's sort and segmentation run as torch ops before).
//
// Limits: a segment's sum is one chain of adds per column (the contract's order), so a row hit
// by very many tokens takes time proportional to its count, spread over only its dim / V lanes.
// All element offsets are 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "lmk/cuda_acc.h"
#include "lmk/embedding.h"
#include "lmk/embedding_cuda.h"

namespace lmk {
namespace {

constexpr int kWarp = 32;
constexpr int kCheckBlock = 256;   // threads per block of the index check
constexpr int kGatherBlock = 256;  // threads per block of the gather (8 to 256 rows per block)
constexpr int kBwdBlock = 128;     // threads per block of the backward
constexpr int kGatherUnroll = 4;   // words per lane per step of the gather
constexpr int kBwdBatch = 8;       // dy loads in flight per lane in the backward
constexpr int kTpUnroll = 2;       // units per lane per step of the fused token + position
// Its blocks per SM asked of ptxas: <= 64 registers per thread. Without an explicit budget ptxas
// took 32 registers and spilled 4 bytes in the 16-bit column-pair sinusoid variants for sm_90.
constexpr int kTpMinBlocks = 4;
// Backward blocks per SM asked of ptxas: <= 128 registers per thread. Without an explicit budget
// ptxas spilled a few bytes in some variants at 80-128 registers; with it none spills.
constexpr int kBwdMinBlocks = 4;
constexpr int64_t kMaxBlocks = 1 << 20;       // grid cap; the kernels loop over further work
constexpr int64_t kMaxTilesY = 65535;         // grid y cap (column tiles of the backward)
constexpr unsigned long long kNoBad = ~0ull;  // status: every index in range (-1 as int64)

// ------------------------------------------------------------------ index check

template <typename I>
__global__ void __launch_bounds__(kCheckBlock)
    embedding_check_kernel(const I* __restrict__ idx, const int64_t n, const int64_t rows,
                           unsigned long long* __restrict__ status) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kCheckBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kCheckBlock + threadIdx.x; t < n; t += step) {
    const int64_t v = static_cast<int64_t>(idx[t]);
    if (v < 0 || v >= rows) {
      // this thread's later positions are larger: one atomic per thread at most
      atomicMin(status, static_cast<unsigned long long>(t));
      break;
    }
  }
}

// ------------------------------------------------------------------ forward gather

struct GatherArgs {
  const void* weight;  // rows stride_words words apart
  const void* idx;     // (n) I, all checked when *status == kNoBad
  void* out;           // (n, row_words) words
  const unsigned long long* status;
  int64_t n, row_words, stride_words;
  int group;  // G: lanes per token row, a power of two <= 32
};

// W: the word moved per access (uint4, uint2, unsigned int, unsigned short); I: index type.
template <typename W, typename I>
__global__ void __launch_bounds__(kGatherBlock) embedding_gather_kernel(const GatherArgs a) {
  if (*a.status != kNoBad) return;  // a bad index: write nothing
  const W* __restrict__ weight = static_cast<const W*>(a.weight);
  const I* __restrict__ idx = static_cast<const I*>(a.idx);
  W* __restrict__ out = static_cast<W*>(a.out);
  const int g = a.group;
  const int lane = static_cast<int>(threadIdx.x) & (g - 1);
  const int64_t groups_per_block = kGatherBlock / g;
  const int64_t step = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int64_t span = int64_t{g} * kGatherUnroll;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / g; t < a.n;
       t += step) {
    const W* src = weight + static_cast<int64_t>(idx[t]) * a.stride_words;
    W* dst = out + t * a.row_words;
    for (int64_t c0 = lane; c0 < a.row_words; c0 += span) {
      W w[kGatherUnroll];
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t c = c0 + int64_t{g} * u;
        if (c < a.row_words) w[u] = __ldg(src + c);
      }
#pragma unroll
      for (int u = 0; u < kGatherUnroll; ++u) {
        const int64_t c = c0 + int64_t{g} * u;
        if (c < a.row_words) dst[c] = w[u];
      }
    }
  }
}

// ------------------------------------------------------------------ backward

// Accumulation type A of T, IEEE adds and multiplies (no flush to zero, never fused), and the
// conversions between T and A.
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Data moved as raw words: a pack of V = 16 / sizeof(T) elements is one uint4 (one 16-byte
// access, unpacked with bit operations so the elements never get split across registers), and
// V == 1 is one element. unpack() gives the elements as A (exact), pack() rounds A to T (RNE).
__device__ __forceinline__ unsigned word_of(const uint4& r, int k) {
  return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
}

template <typename T, int V>
struct Io;

template <typename T>
struct Io<T, 1> {
  using Raw = T;
  using A = AccT<T>;
  static __device__ __forceinline__ void unpack(const Raw& r, A (&o)[1]) { o[0] = to_acc(r); }
  static __device__ __forceinline__ Raw pack(const A (&a)[1]) { return from_acc<T>(a[0]); }
};

template <>
struct Io<float, 4> {
  using Raw = uint4;
  static __device__ __forceinline__ void unpack(const Raw& r, float (&o)[4]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) o[k] = __uint_as_float(word_of(r, k));
  }
  static __device__ __forceinline__ Raw pack(const float (&a)[4]) {
    return make_uint4(__float_as_uint(a[0]), __float_as_uint(a[1]), __float_as_uint(a[2]),
                      __float_as_uint(a[3]));
  }
};

template <>
struct Io<__nv_bfloat16, 8> {
  using Raw = uint4;
  static __device__ __forceinline__ void unpack(const Raw& r, float (&o)[8]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned w = word_of(r, k);
      o[2 * k] = __uint_as_float(w << 16);
      o[2 * k + 1] = __uint_as_float(w & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ unsigned bits(float lo, float hi) {
    return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
  }
  static __device__ __forceinline__ Raw pack(const float (&a)[8]) {
    return make_uint4(bits(a[0], a[1]), bits(a[2], a[3]), bits(a[4], a[5]), bits(a[6], a[7]));
  }
};

template <>
struct Io<__half, 8> {
  using Raw = uint4;
  static __device__ __forceinline__ void unpack(const Raw& r, float (&o)[8]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const unsigned w = word_of(r, k);
      o[2 * k] = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
      o[2 * k + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
    }
  }
  static __device__ __forceinline__ unsigned bits(float lo, float hi) {
    return static_cast<unsigned>(__half_as_ushort(__float2half_rn(lo))) |
           static_cast<unsigned>(__half_as_ushort(__float2half_rn(hi))) << 16;
  }
  static __device__ __forceinline__ Raw pack(const float (&a)[8]) {
    return make_uint4(bits(a[0], a[1]), bits(a[2], a[3]), bits(a[4], a[5]), bits(a[6], a[7]));
  }
};

template <>
struct Io<double, 2> {
  using Raw = uint4;
  static __device__ __forceinline__ void unpack(const Raw& r, double (&o)[2]) {
    o[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    o[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  static __device__ __forceinline__ Raw pack(const double (&a)[2]) {
    return make_uint4(
        static_cast<unsigned>(__double2loint(a[0])), static_cast<unsigned>(__double2hiint(a[0])),
        static_cast<unsigned>(__double2loint(a[1])), static_cast<unsigned>(__double2hiint(a[1])));
  }
};

struct BwdArgs {
  const void* dy;  // (n, dim) T
  void* dw;        // (num_embeddings, dim) T
  const int64_t* order;
  const int64_t* seg_offsets;
  const int64_t* seg_rows;
  const void* seg_scale;  // (nseg) A, or null
  int64_t nseg, dim, npacks, ntiles, num_embeddings, padding_idx;
  int group;  // G: lanes per (segment, tile), a power of two <= 32
};

// Segments over the x dimension of the grid (a group of G lanes per segment, grid-stride),
// tiles of G packs over y (grid-stride); lane l of a group owns pack tile * G + l of the row.
template <typename T, int V>
__global__ void __launch_bounds__(kBwdBlock, kBwdMinBlocks) embedding_bwd_kernel(const BwdArgs a) {
  using A = AccT<T>;
  using P = Io<T, V>;
  using R = typename P::Raw;
  const R* __restrict__ dy = static_cast<const R*>(a.dy);
  R* __restrict__ dw = static_cast<R*>(a.dw);
  const int64_t* __restrict__ order = a.order;
  const int64_t row_packs = a.npacks;  // packs per row of dy and dw
  const int g = a.group;
  const int lane = static_cast<int>(threadIdx.x) & (g - 1);
  const int64_t groups_per_block = kBwdBlock / g;
  const int64_t seg_step = static_cast<int64_t>(gridDim.x) * groups_per_block;
  for (int64_t tile = blockIdx.y; tile < a.ntiles; tile += gridDim.y) {
    const int64_t pack = tile * g + lane;
    if (pack >= row_packs) break;
    for (int64_t seg = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / g;
         seg < a.nseg; seg += seg_step) {
      const int64_t row = a.seg_rows[seg];
      if (row == a.padding_idx || row < 0 || row >= a.num_embeddings) continue;
      const int64_t s0 = a.seg_offsets[seg];
      const int64_t s1 = a.seg_offsets[seg + 1];

      A acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = A(0);
      int64_t tok[kBwdBatch];
#pragma unroll
      for (int u = 0; u < kBwdBatch; ++u) tok[u] = s0 + u < s1 ? order[s0 + u] : 0;
      for (int64_t s = s0; s < s1; s += kBwdBatch) {
        R v[kBwdBatch];
#pragma unroll
        for (int u = 0; u < kBwdBatch; ++u) {
          if (s + u < s1) v[u] = dy[tok[u] * row_packs + pack];
        }
        // the next batch's token ids load while this batch's rows arrive
#pragma unroll
        for (int u = 0; u < kBwdBatch; ++u) {
          const int64_t k = s + kBwdBatch + u;
          tok[u] = k < s1 ? order[k] : 0;
        }
#pragma unroll
        for (int u = 0; u < kBwdBatch; ++u) {
          if (s + u < s1) {
            A x[V];
            P::unpack(v[u], x);
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] = add_rn(acc[i], x[i]);
          }
        }
      }
      if (a.seg_scale != nullptr) {
        const A scale = static_cast<const A*>(a.seg_scale)[seg];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = mul_rn(acc[i], scale);
      }
      dw[row * row_packs + pack] = P::pack(acc);
    }
  }
}

// ------------------------------------------------------------------ fused token + position

// Ids and positions checked together: a bad id at t reports t, a bad position at t reports
// n + t, and the smallest report wins, so status ends as the first bad id, or (every id good)
// n + the first bad position. A thread stops at its first bad id (its later ids are larger, and
// every position report is larger still); after a bad position it checks only its ids.
template <typename I, typename J>
__global__ void __launch_bounds__(kCheckBlock)
    token_pos_check_kernel(const I* __restrict__ ids, const J* __restrict__ pos, const int64_t n,
                           const int64_t rows, const int64_t positions,
                           unsigned long long* __restrict__ status) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kCheckBlock;
  bool pos_bad = false;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kCheckBlock + threadIdx.x; t < n; t += step) {
    const int64_t v = static_cast<int64_t>(ids[t]);
    if (v < 0 || v >= rows) {
      atomicMin(status, static_cast<unsigned long long>(t));
      break;
    }
    if (!pos_bad) {
      const int64_t q = static_cast<int64_t>(pos[t]);
      if (q < 0 || q >= positions) {
        atomicMin(status, static_cast<unsigned long long>(n + t));
        pos_bad = true;
      }
    }
  }
}

// A unit of V consecutive columns of a row, V even, loaded widened to A and stored rounded (RNE)
// to T. Vec: V = 16 / sizeof(T), one 16-byte access (rows, strides and pointers 16-byte
// aligned); else V = 2, element accesses, the second column absent past an odd dim.
template <typename T, bool Vec>
struct Unit;

template <typename T>
struct Unit<T, true> {
  static constexpr int V = 16 / static_cast<int>(sizeof(T));
  using A = AccT<T>;
  static __device__ __forceinline__ void load(const T* row, int64_t u, int64_t, A (&x)[V]) {
    Io<T, V>::unpack(__ldg(reinterpret_cast<const uint4*>(row) + u), x);
  }
  static __device__ __forceinline__ void store(T* row, int64_t u, int64_t, const A (&x)[V]) {
    reinterpret_cast<uint4*>(row)[u] = Io<T, V>::pack(x);
  }
};

template <typename T>
struct Unit<T, false> {
  static constexpr int V = 2;
  using A = AccT<T>;
  static __device__ __forceinline__ void load(const T* row, int64_t u, int64_t dim, A (&x)[V]) {
    const int64_t j = 2 * u;
    x[0] = to_acc(row[j]);
    x[1] = j + 1 < dim ? to_acc(row[j + 1]) : A(0);
  }
  static __device__ __forceinline__ void store(T* row, int64_t u, int64_t dim, const A (&x)[V]) {
    const int64_t j = 2 * u;
    row[j] = from_acc<T>(x[0]);
    if (j + 1 < dim) row[j + 1] = from_acc<T>(x[1]);
  }
};

struct TokenPosArgs {
  const void* tok;         // (num_embeddings, dim) T, rows tok_stride elements apart
  const void* ids;         // (n) int32 / int64, all checked when *status == kNoBad
  const void* pw;          // (num_positions, dim) T, rows pos_stride apart (learned table)
  const void* pos;         // (n) int32 / int64
  const double* inv_freq;  // (ceil(dim / 2)) (sinusoid)
  void* out;               // (n, dim) T contiguous
  const unsigned long long* status;
  int64_t n, dim, units, tok_stride, pos_stride;  // units: Unit's per row
  float scale32;                                  // scale rounded to A (fp32 / fp64)
  double scale64;
  int group;  // G: lanes per token row, a power of two <= 32
  bool ids64, pos64;
};

__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t t) {
  return is64 ? __ldg(static_cast<const int64_t*>(p) + t)
              : static_cast<int64_t>(__ldg(static_cast<const int32_t*>(p) + t));
}

template <typename A>
__device__ __forceinline__ A scale_of(const TokenPosArgs& a);
template <>
__device__ __forceinline__ float scale_of<float>(const TokenPosArgs& a) {
  return a.scale32;
}
template <>
__device__ __forceinline__ double scale_of<double>(const TokenPosArgs& a) {
  return a.scale64;
}

// A group of G lanes per token row (grid-stride over the tokens); lane l owns the units l,
// l + G, ... of the row, kTpUnroll of them per step (all loads, then the math and the stores).
// out = round_T(scale * tok + pe) with an IEEE multiply and add (never fused, denormals kept):
// the reference's two roundings in A. The sinusoid: one sinusoid_pair per column pair.
template <typename T, bool Vec, bool Learned>
__global__ void __launch_bounds__(kGatherBlock, kTpMinBlocks)
    token_pos_fwd_kernel(const TokenPosArgs a) {
  if (*a.status != kNoBad) return;  // a bad id or position: write nothing
  using A = AccT<T>;
  using U = Unit<T, Vec>;
  constexpr int V = U::V;
  const T* __restrict__ tok = static_cast<const T*>(a.tok);
  const T* __restrict__ pw = static_cast<const T*>(a.pw);
  T* __restrict__ out = static_cast<T*>(a.out);
  const A scale = scale_of<A>(a);
  const int g = a.group;
  const int lane = static_cast<int>(threadIdx.x) & (g - 1);
  const int64_t groups_per_block = kGatherBlock / g;
  const int64_t step = static_cast<int64_t>(gridDim.x) * groups_per_block;
  const int64_t span = int64_t{g} * kTpUnroll;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / g; t < a.n;
       t += step) {
    const int64_t id = load_index(a.ids, a.ids64, t);
    const int64_t p = load_index(a.pos, a.pos64, t);
    const T* tok_row = tok + id * a.tok_stride;
    const T* pos_row = Learned ? pw + p * a.pos_stride : nullptr;
    T* out_row = out + t * a.dim;
    const double pd = static_cast<double>(p);
    for (int64_t u0 = lane; u0 < a.units; u0 += span) {
      A e[kTpUnroll][V], pe[kTpUnroll][V];
#pragma unroll
      for (int k = 0; k < kTpUnroll; ++k) {
        const int64_t u = u0 + int64_t{g} * k;
        if (u < a.units) {
          U::load(tok_row, u, a.dim, e[k]);
          if constexpr (Learned) U::load(pos_row, u, a.dim, pe[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kTpUnroll; ++k) {
        const int64_t u = u0 + int64_t{g} * k;
        if (u < a.units) {
          if constexpr (!Learned) {
#pragma unroll
            for (int i = 0; i < V / 2; ++i) {  // column pair u * V / 2 + i: (sin, cos)
              const SinCos sc = sinusoid_pair(pd * __ldg(a.inv_freq + u * (V / 2) + i));
              pe[k][2 * i] = static_cast<A>(sc.s);
              pe[k][2 * i + 1] = static_cast<A>(sc.c);
            }
          }
          A r[V];
#pragma unroll
          for (int i = 0; i < V; ++i) r[i] = add_rn(mul_rn(scale, e[k][i]), pe[k][i]);
          U::store(out_row, u, a.dim, r);
        }
      }
    }
  }
}

// ------------------------------------------------------------------ launchers

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

unsigned grid_for(int64_t work_items, int64_t per_block) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((work_items + per_block - 1) / per_block, kMaxBlocks)));
}

// The smallest power of two >= units, at most a warp.
int group_for(int64_t units) {
  int g = 1;
  while (g < kWarp && g < units) g *= 2;
  return g;
}

template <typename I>
cudaError_t check_typed(const void* idx, int64_t n, int64_t rows, int64_t* status,
                        cudaStream_t stream) {
  embedding_check_kernel<I><<<grid_for(n, kCheckBlock), kCheckBlock, 0, stream>>>(
      static_cast<const I*>(idx), n, rows, reinterpret_cast<unsigned long long*>(status));
  return cudaGetLastError();
}

cudaError_t check(const void* idx, bool idx64, int64_t n, int64_t rows, int64_t* status,
                  cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(status, 0xff, sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  return idx64 ? check_typed<int64_t>(idx, n, rows, status, stream)
               : check_typed<int32_t>(idx, n, rows, status, stream);
}

template <typename W>
cudaError_t gather_word(GatherArgs a, int64_t word_bytes, bool idx64, cudaStream_t stream) {
  a.row_words /= word_bytes;
  a.stride_words /= word_bytes;
  a.group = group_for(a.row_words);
  const unsigned grid = grid_for(a.n, kGatherBlock / a.group);
  if (idx64) {
    embedding_gather_kernel<W, int64_t><<<grid, kGatherBlock, 0, stream>>>(a);
  } else {
    embedding_gather_kernel<W, int32_t><<<grid, kGatherBlock, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T, int V>
cudaError_t bwd_launch(BwdArgs a, cudaStream_t stream) {
  a.npacks = a.dim / V;
  a.group = group_for(a.npacks);
  a.ntiles = (a.npacks + a.group - 1) / a.group;
  const dim3 grid(grid_for(a.nseg, kBwdBlock / a.group),
                  static_cast<unsigned>(std::min<int64_t>(a.ntiles, kMaxTilesY)));
  embedding_bwd_kernel<T, V><<<grid, kBwdBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const BwdArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (a.dim % V == 0 && aligned(a.dy, 16) && aligned(a.dw, 16)) return bwd_launch<T, V>(a, stream);
  return bwd_launch<T, 1>(a, stream);
}

template <typename I, typename J>
cudaError_t token_pos_check_typed(const TokenPosFwdParams& p, int64_t* status,
                                  cudaStream_t stream) {
  token_pos_check_kernel<I, J><<<grid_for(p.n, kCheckBlock), kCheckBlock, 0, stream>>>(
      static_cast<const I*>(p.ids), static_cast<const J*>(p.pos), p.n, p.num_embeddings,
      p.num_positions, reinterpret_cast<unsigned long long*>(status));
  return cudaGetLastError();
}

cudaError_t token_pos_check(const TokenPosFwdParams& p, int64_t* status, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(status, 0xff, sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (p.ids64) {
    return p.pos64 ? token_pos_check_typed<int64_t, int64_t>(p, status, stream)
                   : token_pos_check_typed<int64_t, int32_t>(p, status, stream);
  }
  return p.pos64 ? token_pos_check_typed<int32_t, int64_t>(p, status, stream)
                 : token_pos_check_typed<int32_t, int32_t>(p, status, stream);
}

template <typename T, bool Vec>
cudaError_t token_pos_launch(TokenPosArgs a, bool learned, cudaStream_t stream) {
  constexpr int V = Unit<T, Vec>::V;
  a.units = (a.dim + V - 1) / V;
  a.group = group_for(a.units);
  const unsigned grid = grid_for(a.n, kGatherBlock / a.group);
  if (learned) {
    token_pos_fwd_kernel<T, Vec, true><<<grid, kGatherBlock, 0, stream>>>(a);
  } else {
    token_pos_fwd_kernel<T, Vec, false><<<grid, kGatherBlock, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// The 16-byte units when every row of both tables and of out starts 16-byte aligned and holds
// whole units; else column pairs.
template <typename T>
cudaError_t token_pos_typed(const TokenPosArgs& a, bool learned, cudaStream_t stream) {
  constexpr int64_t esize = sizeof(T);
  auto fits = [&](const void* ptr, int64_t stride) {
    return aligned(ptr, 16) && (stride * esize) % 16 == 0;
  };
  const bool vec = (a.dim * esize) % 16 == 0 && fits(a.tok, a.tok_stride) && fits(a.out, a.dim) &&
                   (!learned || fits(a.pw, a.pos_stride));
  return vec ? token_pos_launch<T, true>(a, learned, stream)
             : token_pos_launch<T, false>(a, learned, stream);
}

bool valid_dtype(DType d) {
  return d == DType::F32 || d == DType::F16 || d == DType::BF16 || d == DType::F64;
}

}  // namespace

cudaError_t embedding_check_cuda(const void* idx, bool idx64, int64_t n, int64_t num_embeddings,
                                 int64_t* status, cudaStream_t stream) {
  if (n < 0 || num_embeddings < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (idx == nullptr || status == nullptr) return cudaErrorInvalidValue;
  return check(idx, idx64, n, num_embeddings, status, stream);
}

cudaError_t embedding_fwd_cuda(const EmbeddingFwdParams& p, int64_t* status, cudaStream_t stream) {
  if (!valid_dtype(p.dtype)) return cudaErrorInvalidValue;
  if (p.n < 0 || p.dim < 0 || p.num_embeddings < 0 || p.weight_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.n == 0) return cudaSuccess;
  if (p.idx == nullptr || status == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = check(p.idx, p.idx64, p.n, p.num_embeddings, status, stream);
  // no columns: nothing to copy; no rows: every index is bad
  if (err != cudaSuccess || p.dim == 0 || p.num_embeddings == 0) return err;
  if (p.weight == nullptr || p.out == nullptr) return cudaErrorInvalidValue;

  const int64_t esize = dtype_size(p.dtype);
  GatherArgs a{};
  a.weight = p.weight;
  a.idx = p.idx;
  a.out = p.out;
  a.status = reinterpret_cast<const unsigned long long*>(status);
  a.n = p.n;
  a.row_words = p.dim * esize;  // bytes here; divided by the word size below
  a.stride_words = p.weight_stride * esize;
  auto fits = [&](int64_t w) {
    return a.row_words % w == 0 && a.stride_words % w == 0 && aligned(p.weight, w) &&
           aligned(p.out, w);
  };
  if (fits(16)) return gather_word<uint4>(a, 16, p.idx64, stream);
  if (fits(8)) return gather_word<uint2>(a, 8, p.idx64, stream);
  if (fits(4)) return gather_word<unsigned int>(a, 4, p.idx64, stream);
  if (fits(2)) return gather_word<unsigned short>(a, 2, p.idx64, stream);
  return cudaErrorInvalidValue;  // a pointer not aligned to its element
}

cudaError_t token_pos_fwd_cuda(const TokenPosFwdParams& p, int64_t* status, cudaStream_t stream) {
  if (!valid_dtype(p.dtype)) return cudaErrorInvalidValue;
  if (p.n < 0 || p.dim < 0 || p.num_embeddings < 0 || p.tok_stride < 0 || p.num_positions < 0 ||
      p.pos_stride < 0) {
    return cudaErrorInvalidValue;
  }
  const bool learned = p.pos_weight != nullptr;
  if (learned == (p.inv_freq != nullptr)) return cudaErrorInvalidValue;  // exactly one of them
  if (!learned && p.num_positions > kSinusoidPositions) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  if (p.ids == nullptr || p.pos == nullptr || status == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = token_pos_check(p, status, stream);
  // no columns: nothing to write; no rows in a table: every id (or position) is bad
  if (err != cudaSuccess || p.dim == 0 || p.num_embeddings == 0 || p.num_positions == 0) {
    return err;
  }
  if (p.tok_weight == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  const int64_t esize = dtype_size(p.dtype);
  if (!aligned(p.tok_weight, esize) || !aligned(p.out, esize) ||
      (learned && !aligned(p.pos_weight, esize)) || (!learned && !aligned(p.inv_freq, 8))) {
    return cudaErrorInvalidValue;
  }

  TokenPosArgs a{};
  a.tok = p.tok_weight;
  a.ids = p.ids;
  a.pw = p.pos_weight;
  a.pos = p.pos;
  a.inv_freq = p.inv_freq;
  a.out = p.out;
  a.status = reinterpret_cast<const unsigned long long*>(status);
  a.n = p.n;
  a.dim = p.dim;
  a.tok_stride = p.tok_stride;
  a.pos_stride = learned ? p.pos_stride : 0;
  a.scale32 = static_cast<float>(p.scale);  // rounded to A (RNE)
  a.scale64 = p.scale;
  a.ids64 = p.ids64;
  a.pos64 = p.pos64;
  switch (p.dtype) {
    case DType::F32:
      return token_pos_typed<float>(a, learned, stream);
    case DType::F16:
      return token_pos_typed<__half>(a, learned, stream);
    case DType::BF16:
      return token_pos_typed<__nv_bfloat16>(a, learned, stream);
    case DType::F64:
      return token_pos_typed<double>(a, learned, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t embedding_bwd_cuda(const EmbeddingBwdSortedParams& p, cudaStream_t stream) {
  if (!valid_dtype(p.dtype)) return cudaErrorInvalidValue;
  if (p.nseg < 0 || p.n < 0 || p.dim < 0 || p.num_embeddings < 0 || p.nseg > p.n) {
    return cudaErrorInvalidValue;
  }
  if (p.nseg == 0 || p.dim == 0) return cudaSuccess;
  if (p.dy == nullptr || p.dw == nullptr || p.order == nullptr || p.seg_offsets == nullptr ||
      p.seg_rows == nullptr) {
    return cudaErrorInvalidValue;
  }
  BwdArgs a{};
  a.dy = p.dy;
  a.dw = p.dw;
  a.order = p.order;
  a.seg_offsets = p.seg_offsets;
  a.seg_rows = p.seg_rows;
  a.nseg = p.nseg;
  a.dim = p.dim;
  a.num_embeddings = p.num_embeddings;
  a.padding_idx = p.padding_idx;
  a.seg_scale = p.seg_scale;
  switch (p.dtype) {
    case DType::F32:
      return bwd_typed<float>(a, stream);
    case DType::F16:
      return bwd_typed<__half>(a, stream);
    case DType::BF16:
      return bwd_typed<__nv_bfloat16>(a, stream);
    case DType::F64:
      return bwd_typed<double>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lmk
