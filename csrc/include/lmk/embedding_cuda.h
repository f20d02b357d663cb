// Entry points of the CUDA embedding kernels (csrc/cuda/embedding.cu), shared by the kernels and
// the pybind11 module; the contract is lmk/embedding.h. Asynchronous on `stream`; the return
// value is the status of the launches (the first error of cudaGetLastError after each launch).
//
// Index check: `status` is one device int64 that receives the first position t with idx[t]
// outside [0, num_embeddings), or -1 (all bits set) when every index is in range. The entry
// points set it to -1 themselves (cudaMemsetAsync) before the check kernel runs.
//
// forward: the check, then the row gather, which reads `status` on the device and writes nothing
// when an index was bad (no out-of-range row is ever read, and no device-side assert). The
// caller reads `status` back (one synchronisation) to raise its error. dim == 0: the check only.
// n == 0: nothing is launched and `status` is not touched.
//
// backward: the caller sorts the tokens by row, stably (so the tokens of a row stay in
// increasing t), and passes, for the nseg distinct rows: seg_rows[s] (the row) and
// seg_offsets[s] .. seg_offsets[s + 1] (its tokens' slots in `order`, which holds token ids);
// it also zeroes dw. The kernel writes the rows of the segments (the in-order sum of their dy
// rows, times seg_scale[s] when given), except padding_idx, which stays zero.
// Segment rows outside [0, num_embeddings) are skipped (the forward has checked the indices).
//
// fused token + positional forward (token_pos_fwd_cuda): one check of both index arrays (ids
// and pos, each int32 or int64), `status` <- -1 when every ids[t] is in [0, num_embeddings) and
// every pos[t] in [0, num_positions), else the first bad t of ids, or (every id good) n + the
// first bad t of pos; then the kernel that reads `status` and writes nothing after a bad index,
// else out[t, j] = round_T(scale * tok[ids[t], j] + pe(t, j)) in A (the contract's two
// roundings: the multiply and the add are never fused), pe the learned row pos_weight[pos[t]]
// (pos_weight non-null, inv_freq null) or the sinusoid of sinusoid_pair (inv_freq non-null,
// pos_weight null, num_positions <= kSinusoidPositions). dim == 0 or an empty table: the check
// only. n == 0: nothing is launched and `status` is not touched.
//
// Types: F32, F16, BF16 (fp32 accumulation) and F64 (fp64 accumulation). idx: int32 or int64;
// order, seg_offsets, seg_rows: int64. cudaErrorInvalidValue: arguments outside the contract.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "lmk/common.h"
#include "lmk/embedding.h"

namespace lmk {

struct EmbeddingBwdSortedParams {
  DType dtype = DType::F32;              // T of dy and dw
  const void* dy = nullptr;              // (n, dim) contiguous
  void* dw = nullptr;                    // (num_embeddings, dim) contiguous, zeroed by the caller
  const int64_t* order = nullptr;        // (n) token ids, sorted stably by their row
  const int64_t* seg_offsets = nullptr;  // (nseg + 1) slots of each row's tokens in `order`
  const int64_t* seg_rows = nullptr;     // (nseg) the row of each segment
  int64_t nseg = 0, n = 0, dim = 0, num_embeddings = 0;
  // scale_grad_by_freq: (nseg) A (fp32; fp64 for F64 data), seg_scale[s] = 1 / count of segment
  // s rounded to A (the CPU backend rounds the double 1 / count); null: no scaling
  const void* seg_scale = nullptr;
  int64_t padding_idx = -1;  // a row that gets no gradient, or -1
};

// status <- first bad position or -1.
cudaError_t embedding_check_cuda(const void* idx, bool idx64, int64_t n, int64_t num_embeddings,
                                 int64_t* status, cudaStream_t stream);
// status <- first bad position or -1; out <- weight[idx] when status is -1.
cudaError_t embedding_fwd_cuda(const EmbeddingFwdParams& p, int64_t* status, cudaStream_t stream);
cudaError_t embedding_bwd_cuda(const EmbeddingBwdSortedParams& p, cudaStream_t stream);
// status <- first bad id t, or n + first bad position t, or -1; out <- scale * tok[ids] + pe
// when status is -1.
cudaError_t token_pos_fwd_cuda(const TokenPosFwdParams& p, int64_t* status, cudaStream_t stream);

}  // namespace lmk
