// Entry points of the CUDA flash-attention kernels (csrc/cuda/attention.cu), shared by the kernels
// and the pybind11 module; the contract is lmk/attention.h. Asynchronous on `stream`; the return
// value is the status of the launches (the first error of cudaGetLastError after each launch).
//
// Types: F32, F16, BF16 data (q, k, v, o, dO, dq, dk, dv); the mask is Bool, T or F32 (an F32
// mask on 16-bit data is added in fp32, unrounded); lse and the backward's workspace are fp32.
// Dropout (seed, drop_threshold > 0, drop_scale) draws the keep bits of lmk/philox.h at the
// packed positions (varlen: batch 0, rows cu_q[b] + i, keys cu_k[b] + j). cudaErrorNotSupported:
// fp64 data, or a head dim (E or Ev) above kAttnMaxHeadDim; cudaErrorInvalidValue: arguments
// outside the contract (Hq not a multiple of Hk, a mask together with cu_q / cu_k, a mask of
// another dtype, only one of cu_q / cu_k, null pointers, a grid over 2^31 - 1 blocks).
//
// Shapes as AttnParams states: dense (B, Hq, L, E) ... views with element strides, or varlen
// (cu_q / cu_k with B + 1 offsets each; L / S the largest lengths, which only bound the grid:
// they must be at least the longest sequence). B == 0, Hq == 0 or L == 0: nothing is launched.
// S == 0 (or a sequence without keys): o = 0 and lse = -inf for its rows.
//
// forward: o and lse written for every query row.
// backward: dq, dk, dv written (dk / dv rows that no query reaches are zeros). The caller gives
// a workspace of fp32 laid out like lse (attention_lse_rows elements; varlen: the rows of the
// packed tensors, cu_q[B]); it receives D[i] = sum_e dO[i, e] * O[i, e]. Deterministic: no
// atomics, every sum in an order fixed by the shapes.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "lmk/attention.h"

namespace lmk {

constexpr int64_t kAttnMaxHeadDim = 256;

// Elements of lse and of the backward workspace: dense B * Hq * L, varlen Hq * total_q.
constexpr int64_t attention_lse_rows(int64_t B, int64_t Hq, int64_t L, bool varlen,
                                     int64_t total_q) {
  return varlen ? Hq * total_q : B * Hq * L;
}

cudaError_t attention_fwd_cuda(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_bwd_cuda(const AttnBwdParams& p, float* workspace, cudaStream_t stream);

}  // namespace lmk
