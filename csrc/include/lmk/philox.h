// Counter-based random numbers: Philox4x32 with 10 rounds (Salmon, Moraes, Dror and Shaw,
// "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator behind attention
// dropout on every backend. A pure function of (counter, key), so a kernel draws any element's
// number on its own, in any order, and the backward redraws the forward's numbers exactly.
// lmkernels/reference.py (philox4x32_10) and lmkernels/triton_kernels/attention.py compute the
// very same bits.
#pragma once
#include <cstdint>

#include "lmk/common.h"

namespace lmk {

struct Philox4 {
  uint32_t x[4];
};

// The four 32-bit outputs for counter (c0, c1, c2, c3) and key (k0, k1).
LMK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the Weyl key schedule
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(p1);
    c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(p0);
  }
  return {{c0, c1, c2, c3}};
}

// Attention dropout (attention.h). Score (b, h, i, j) of the op's (B, Hq, L, S) view is kept iff
//   philox4x32_10(c = (j >> 2, i, b * Hq + h, 0), key = (seed low 32 bits, seed high 32 bits))
//     .x[j & 3] >= threshold
// (a varlen batch is batch 0 of its packed view: i = cu_q[seq] + row, j = cu_k[seq] + key).
// Four neighbouring keys share one Philox call. threshold = round(p * 2^32) (capped at
// 2^32 - 1), so a score is dropped with probability threshold / 2^32; kept ones are multiplied by
// the exact inverse keep probability 2^32 / (2^32 - threshold). threshold 0 keeps everything.
LMK_HD bool dropout_keep(uint64_t seed, uint32_t threshold, int64_t bh, int64_t i, int64_t j) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i),
                                  static_cast<uint32_t>(bh), 0u, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  return r.x[j & 3] >= threshold;
}

}  // namespace lmk
