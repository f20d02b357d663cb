// Flash attention forward and backward on CPU (contract: lmk/attention.h).
//
// Compiled twice by CMake (CPU_CAPABILITY=AVX2 and DEFAULT, see vec.h); the binding picks one.
//
// Tiles. Query blocks of kBQ = 48 rows and key blocks of kBK = 96 keys (aligned: block qb holds
// rows [qb * kBQ, ...) of its sequence; multiples of the micro-kernel's 6 rows; 48 x 96 and 96 x 96
// measured best of 48..128 here, 64 x 64 a few % slower). A tile's products only span the 16-key
// panels its rows can see (the diagonal tiles of causal / windowed attention). Everything a tile
// touches is converted to the accumulator type A (fp32; fp64 for fp64 data) in per-thread scratch:
// the Q / dO rows (columns zero-padded to a multiple of kNR = 16), K and V^T in "panels" of 16 keys
// (panel p, dim e, key p * 16 + jj at [p][e][jj]), V / K row-major (padded to 16 columns). Matrix
// products run on a register-blocked micro-kernel, C[6 x 16] (+)= A[6 x K] * B[K x 16] (12 fp32
// vector accumulators, A broadcast from memory, either A or A^T), e.g. S = Q K^T (B = the K
// panels), O += P V (B = V rows). fp64 uses the same driver with plain loops. Never more than one
// tile of scores exists per thread.
//
// Forward, one task per (sequence, q head, query block), tasks ordered so that the contiguous
// range each thread gets holds a balanced mix of cheap and expensive (causal) blocks (zig-zag
// over the query blocks of a head): for each key block that overlaps the window (others are
// skipped, tile_live() checks exactly), S = Q K^T, then per row the online softmax in base-2
// units (A = fp32: u = s * scale * log2e + mask * log2e, p = 2^(u - m) by an inline polynomial,
// 1.9e-7 relative; fp64: natural units and std::exp): running max m and sum l, O *= 2^(m_old -
// m_new), then O += P V. At the end o = O / l, lse = m ln2 + ln l; a row with no key (l = 0)
// gives o = 0 and lse = -inf. The packed K / V blocks of the current head are cached per thread
// (up to kCacheBytes), so the query blocks of a head convert K and V once.
//
// Backward (P recomputed from lse, D = rowsum(dO * O) precomputed in one pass):
//   per tile: S = Q K^T, P = exp(S - lse); dP = dO V^T; dS = P * (dP - D) * scale;
//   dV += P^T dO, dK += dS^T Q (per key block), dQ += dS K (per query block).
// Two schedules with the same floating-point operations in the same order (so the same bits):
//   * per head: one task per (batch, kv head) loops over key blocks; for each, over the group's
//     q heads and their query blocks in order, accumulating the key block's dK / dV tile and the
//     head group's dQ in an fp32 buffer (O(L) per thread). Used for dense batches whose (batch,
//     kv head) pairs share well over the threads (see bwd_typed).
//   * split: pass 1, one task per (batch / sequence, kv head, key block): the same loop without
//     dQ; pass 2, one task per (sequence, q head, query block): dQ over the key blocks in order.
// Every floating-point sum has an order fixed by the shapes: no atomics, and the results are
// bitwise the same for any thread count.
//
// Masks: bool, additive of T, or additive fp32 (on 16-bit T: read as fp32 and added in A, never
// rounded to T).
//
// Dropout (drop_threshold > 0): per row of a tile, the keep bits of its visible keys come from
// Philox4x32-10 (lmk/philox.h; one call per 4 keys, AVX2: 12 calls at once in 64-bit lanes with
// _mm256_mul_epu32, ~1 ns per key and thread here; baseline build: the scalar lmk::philox4x32_10)
// and become Z = keep * drop_scale (drop_factors). Forward: l and lse from the undropped P, then
// P *= Z before O += P V. Backward: dS = P * (Z * dP - D) * scale and P * Z for dV. Without
// dropout no Philox runs and the row code is the same as before. The bits depend only on (batch *
// Hq + head, packed row, packed key), so they are the same in every schedule and thread count.
//
// Special values: a NaN score (or +inf, inf - inf) makes its row NaN; masked / out-of-window
// keys are exactly 0 in P; rows whose lse is -inf contribute nothing to the gradients.
#include "lmk/attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace lmk::cpu::CPU_CAPABILITY {
namespace {

#include "vec.h"

constexpr int64_t kBQ = 48;                        // query rows per tile (a multiple of kMR)
constexpr int64_t kBK = 96;                        // keys per tile (a multiple of kNR and of kMR)
constexpr int64_t kNR = 16;                        // micro-kernel columns (two vectors)
constexpr int kMR = 6;                             // micro-kernel rows
constexpr int64_t kCacheBytes = int64_t{8} << 20;  // packed K / V blocks kept per thread
constexpr int64_t kBig = int64_t{1} << 40;         // windows wider than this are unbounded

inline int64_t pad_nr(int64_t x) { return (x + kNR - 1) / kNR * kNR; }
constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Position k of n in an order that alternates between the two ends: 0, n-1, 1, n-2, ...
inline int64_t zigzag(int64_t k, int64_t n) { return (k % 2 == 0) ? k / 2 : n - 1 - k / 2; }

// 64-byte aligned, uninitialised scratch.
template <class A>
class Buf {
 public:
  Buf() = default;
  explicit Buf(int64_t n) { alloc(n); }
  ~Buf() { release(); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void alloc(int64_t n) {
    release();
    if (n > 0) p_ = static_cast<A*>(::operator new(n * sizeof(A), std::align_val_t(64)));
  }
  A* get() const { return p_; }

 private:
  void release() {
    if (p_ != nullptr) ::operator delete(p_, std::align_val_t(64));
    p_ = nullptr;
  }
  A* p_ = nullptr;
};

// exp2v (vec.h): the degree-5 2^u, 1.9e-7 relative.
constexpr double kLn2 = 0.693147180559945309;

// ------------------------------------------------------------------ matrix products
// C[M x N] (+)= A[M x K] * B[K x N], N a multiple of kNR. A(r, k) = a[r * lda + k], or with kTA
// a[k * lda + r]; column panel p (kNR columns) of B at b + p * bps, its row k at + k * ldb; row r
// of C at c + r * ldc. Every C element is one chain of fused multiply-adds over k in order.

template <int MR, bool kAcc, bool kTA>
inline void micro(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc) {
  Vf c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if constexpr (kAcc) {
      c0[r] = vload_raw(c + r * ldc);
      c1[r] = vload_raw(c + r * ldc + kW);
    } else {
      c0[r] = vset(0.f);
      c1[r] = vset(0.f);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vf b0 = vload_raw(b + k * ldb), b1 = vload_raw(b + k * ldb + kW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vf ar = vset(kTA ? a[k * lda + r] : a[r * lda + k]);
      c0[r] = vfma(ar, b0, c0[r]);
      c1[r] = vfma(ar, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    vstore_raw(c + r * ldc, c0[r]);
    vstore_raw(c + r * ldc + kW, c1[r]);
  }
}

template <bool kAcc, bool kTA>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t bps,
          int64_t ldb, float* c, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR) {
    const float* bp = b + (n0 / kNR) * bps;
    int64_t r = 0;
    auto ar = [&](int64_t row) { return kTA ? a + row : a + row * lda; };
    for (; r + kMR <= M; r += kMR)
      micro<kMR, kAcc, kTA>(K, ar(r), lda, bp, ldb, c + r * ldc + n0, ldc);
    switch (M - r) {
      case 5:
        micro<5, kAcc, kTA>(K, ar(r), lda, bp, ldb, c + r * ldc + n0, ldc);
        break;
      case 4:
        micro<4, kAcc, kTA>(K, ar(r), lda, bp, ldb, c + r * ldc + n0, ldc);
        break;
      case 3:
        micro<3, kAcc, kTA>(K, ar(r), lda, bp, ldb, c + r * ldc + n0, ldc);
        break;
      case 2:
        micro<2, kAcc, kTA>(K, ar(r), lda, bp, ldb, c + r * ldc + n0, ldc);
        break;
      case 1:
        micro<1, kAcc, kTA>(K, ar(r), lda, bp, ldb, c + r * ldc + n0, ldc);
        break;
      default:
        break;
    }
  }
}

template <bool kAcc, bool kTA>
void gemm(int64_t M, int64_t N, int64_t K, const double* a, int64_t lda, const double* b,
          int64_t bps, int64_t ldb, double* c, int64_t ldc) {
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t n0 = 0; n0 < N; n0 += kNR) {
      const double* bp = b + (n0 / kNR) * bps;
      double acc[kNR];
      for (int64_t j = 0; j < kNR; ++j) acc[j] = kAcc ? c[r * ldc + n0 + j] : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double av = kTA ? a[k * lda + r] : a[r * lda + k];
        for (int64_t j = 0; j < kNR; ++j) acc[j] += av * bp[k * ldb + j];
      }
      for (int64_t j = 0; j < kNR; ++j) c[r * ldc + n0 + j] = acc[j];
    }
  }
}

// ------------------------------------------------------------------ conversions, packing

// dst[0, n) = src[0, n) widened to A, dst[n, npad) = 0.
template <class T, class A>
inline void to_acc(const T* src, int64_t n, A* dst, int64_t npad) {
  int64_t j = 0;
  if constexpr (std::is_same_v<A, double>) {
    for (; j < n; ++j) dst[j] = static_cast<double>(src[j]);
  } else {
    for (; j + kW <= n; j += kW) vstore_raw(dst + j, load(src + j));
    if (j < n) {
      store_n(dst + j, load_n(src + j, n - j, 0.f), n - j);
      j = n;
    }
  }
  for (; j < npad; ++j) dst[j] = A(0);
}

// dst[0, n) = round(src * mul).
template <class T, class A>
inline void from_acc(const A* src, int64_t n, A mul, T* dst) {
  int64_t j = 0;
  if constexpr (std::is_same_v<A, double>) {
    for (; j < n; ++j) dst[j] = static_cast<T>(src[j] * mul);
  } else {
    const Vf mv = vset(mul);
    for (; j + kW <= n; j += kW) store(dst + j, vmul(vload_raw(src + j), mv));
    if (j < n) store_n(dst + j, vmul(load_n(src + j, n - j, 0.f), mv), n - j);
  }
}

template <class T>
inline void zero_row(T* dst, int64_t n) {
  std::memset(static_cast<void*>(dst), 0, static_cast<size_t>(n) * sizeof(T));
}

// Rows src[j * sl], j < n, d values each, into panels of kNR rows transposed: element (j, e) at
// dst[(j / kNR) * d * kNR + e * kNR + j % kNR]; rows [n, pad_nr(n)) are zero. tmp: d values.
template <class T, class A>
void pack_panels(const T* src, int64_t sl, int64_t n, int64_t d, A* dst, A* tmp) {
  const int64_t npad = pad_nr(n);
  for (int64_t j = 0; j < npad; ++j) {
    A* col = dst + (j / kNR) * d * kNR + (j % kNR);
    if (j < n) {
      to_acc(src + j * sl, d, tmp, d);
      for (int64_t e = 0; e < d; ++e) col[e * kNR] = tmp[e];
    } else {
      for (int64_t e = 0; e < d; ++e) col[e * kNR] = A(0);
    }
  }
}

// Rows src[j * sl], j < n, into dst rows of dp values (zero-padded).
template <class T, class A>
void pack_rows(const T* src, int64_t sl, int64_t n, int64_t d, A* dst, int64_t dp) {
  for (int64_t j = 0; j < n; ++j) to_acc(src + j * sl, d, dst + j * dp, dp);
}

// ------------------------------------------------------------------ problem description

// One sequence: its rows, keys and window.
struct Seq {
  int64_t bb = 0;  // batch index for the strides (0 for varlen)
  int64_t q0 = 0, k0 = 0, Lb = 0, Sb = 0, off = 0, wl = -1, wr = -1;

  // Keys [lo, hi) of row i (clamped to [0, Sb); lo >= hi when none).
  void range(int64_t i, int64_t& lo, int64_t& hi) const {
    const int64_t d = i + off;
    lo = wl < 0 ? 0 : std::max<int64_t>(0, d - wl);
    hi = wr < 0 ? Sb : std::min<int64_t>(Sb, d + wr + 1);
  }
  // Whether some row of [i0, i1) sees some key of [j0, j1).
  bool live(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t lo, hi;
      range(i, lo, hi);
      if (std::max(lo, j0) < std::min(hi, j1)) return true;
    }
    return false;
  }
  // Key blocks [kb0, kb1) that rows [i0, i1) may see (a superset of the live ones).
  void key_blocks(int64_t i0, int64_t i1, int64_t& kb0, int64_t& kb1) const {
    int64_t lo0, hi0, lo1, hi1;
    range(i0, lo0, hi0);
    range(i1 - 1, lo1, hi1);
    kb0 = lo0 / kBK;
    kb1 = hi1 > lo0 ? cdiv(hi1, kBK) : kb0;
  }
  // The columns [c0, c1) of key block [j0, j0 + n) that rows [i0, i1) may see, c0 a multiple of
  // kNR: a tile's products skip the rest (the diagonal tiles of causal / windowed attention).
  void cols(int64_t i0, int64_t i1, int64_t j0, int64_t n, int64_t& c0, int64_t& c1) const {
    int64_t lo0, hi0, lo1, hi1;
    range(i0, lo0, hi0);
    range(i1 - 1, lo1, hi1);
    c0 = std::clamp<int64_t>(lo0 - j0, 0, n) / kNR * kNR;
    c1 = std::max(c0, std::min(hi1 - j0, n));
  }
  // Query blocks [qb0, qb1) whose rows may see keys [j0, j1) (a superset of the live ones).
  void query_blocks(int64_t j0, int64_t j1, int64_t& qb0, int64_t& qb1) const {
    const int64_t imin = wr < 0 ? 0 : std::max<int64_t>(0, j0 - off - wr);
    const int64_t imax = wl < 0 ? Lb : std::min<int64_t>(Lb, j1 - off + wl);
    qb0 = imin / kBQ;
    qb1 = imax > imin ? cdiv(imax, kBQ) : qb0;
  }
};

// kAddMask: additive of T; kAddMaskF32: additive fp32 (on 16-bit T, added in A unrounded).
enum MaskKind { kNoMask = 0, kBoolMask = 1, kAddMask = 2, kAddMaskF32 = 3 };

// The mask of one row of a tile: element j at ptr[j * stride] (T, float or bool).
struct MaskRow {
  const void* ptr = nullptr;
  int64_t stride = 0;
};

template <class T, class A>
struct Ctx {
  const AttnParams& p;
  const T* q;
  const T* k;
  const T* v;
  int64_t B, Hq, Hk, group, E, Ev, Ep, Evp, Lmax, Smax, total_q;
  bool varlen;
  int mask_kind = kNoMask;
  bool fused = false;  // no mask and 0 < c < inf: the scale folds into the exp pass
  A c;                 // score -> exp units (A = float: scale * log2e; double: scale)
  A mk;                // mask -> exp units
  int64_t wl, wr;
  // dropout: Z = keep * zscale, keep = philox output >= thr (lmk/philox.h)
  bool dropout = false;
  uint32_t thr = 0, key0 = 0, key1 = 0;
  A zscale = A(1);

  explicit Ctx(const AttnParams& ap) : p(ap) {
    q = static_cast<const T*>(p.q);
    k = static_cast<const T*>(p.k);
    v = static_cast<const T*>(p.v);
    B = p.B;
    Hq = p.Hq;
    Hk = p.Hk;
    group = Hk > 0 ? Hq / Hk : 1;
    E = p.E;
    Ev = p.Ev;
    Ep = pad_nr(E);
    Evp = pad_nr(Ev);
    Lmax = p.L;
    Smax = p.S;
    varlen = p.cu_q != nullptr;
    total_q = varlen ? p.cu_q[B] : p.L;
    if (p.mask != nullptr) {
      mask_kind = p.mask_dtype == DType::Bool  ? kBoolMask
                  : p.mask_dtype == DType::F32 ? kAddMaskF32
                                               : kAddMask;
    }
    dropout = p.drop_threshold != 0;
    thr = p.drop_threshold;
    key0 = static_cast<uint32_t>(p.seed);
    key1 = static_cast<uint32_t>(p.seed >> 32);
    zscale = static_cast<A>(p.drop_scale);
    if constexpr (std::is_same_v<A, float>) {
      c = static_cast<float>(p.scale * static_cast<double>(kLog2e));
      mk = kLog2e;
    } else {
      c = p.scale;
      mk = 1.0;
    }
    fused = mask_kind == kNoMask && c > A(0) && c < std::numeric_limits<A>::infinity();
    wl = p.window_left < 0 ? -1 : std::min(p.window_left, kBig);
    wr = p.window_right < 0 ? -1 : std::min(p.window_right, kBig);
  }

  Seq seq(int64_t b) const {
    Seq s;
    s.wl = wl;
    s.wr = wr;
    if (varlen) {
      s.q0 = p.cu_q[b];
      s.k0 = p.cu_k[b];
      s.Lb = p.cu_q[b + 1] - s.q0;
      s.Sb = p.cu_k[b + 1] - s.k0;
    } else {
      s.bb = b;
      s.Lb = Lmax;
      s.Sb = Smax;
    }
    s.off = p.bottom_right ? s.Sb - s.Lb : 0;
    return s;
  }
  const T* qrow(const Seq& s, int64_t h, int64_t i) const {
    return q + s.bb * p.q_sb + h * p.q_sh + (s.q0 + i) * p.q_sl;
  }
  const T* krow(const Seq& s, int64_t hk, int64_t j) const {
    return k + s.bb * p.k_sb + hk * p.k_sh + (s.k0 + j) * p.k_sl;
  }
  const T* vrow(const Seq& s, int64_t hk, int64_t j) const {
    return v + s.bb * p.v_sb + hk * p.v_sh + (s.k0 + j) * p.v_sl;
  }
  T* orow(const Seq& s, int64_t h, int64_t i) const {
    return static_cast<T*>(p.o) + s.bb * p.o_sb + h * p.o_sh + (s.q0 + i) * p.o_sl;
  }
  // Index of row i of head h in lse (and D): (B, Hq, L), or (1, Hq, total_q) for varlen.
  int64_t lse_index(const Seq& s, int64_t h, int64_t i) const {
    return varlen ? h * total_q + s.q0 + i : (s.bb * Hq + h) * Lmax + i;
  }
  MaskRow mask_row(const Seq& s, int64_t h, int64_t i, int64_t j0) const {
    MaskRow m;
    if (mask_kind == kNoMask) return m;
    const int64_t esize = mask_kind == kBoolMask     ? 1
                          : mask_kind == kAddMaskF32 ? 4
                                                     : static_cast<int64_t>(sizeof(T));
    const int64_t off = s.bb * p.m_sb + h * p.m_sh + i * p.m_sl + j0 * p.m_ss;
    m.ptr = static_cast<const char*>(p.mask) + off * esize;
    m.stride = p.m_ss;
    return m;
  }
};

// ------------------------------------------------------------------ dropout keep bits

constexpr int64_t kRaw = kBK + 64;  // Philox outputs per row of a tile (whole batches: <= 144)

// raw[t] = Philox output t % 4 of counter (g0 + t / 4, row, bh, 0) and key (k0, k1): the random
// number of key 4 * g0 + t (lmk/philox.h), for t < 4 * ngroups (the AVX2 version fills whole
// batches of kPhiloxBatch counters, up to 4 * kPhiloxBatch * cdiv(ngroups, kPhiloxBatch) values).
#if defined(CPU_CAPABILITY_AVX2)
// Counters in sets of four 64-bit lanes (the counter in the low half: _mm256_mul_epu32 reads only
// the low halves, so the high halves may hold anything); three sets in flight overlap the
// multiplies' latency (12 counters = 48 keys per batch). Measured here: ~1 ns per key and thread
// (about 5.5 vector instructions per key).
constexpr int kSets = 3;
constexpr int64_t kPhiloxBatch = 4 * kSets;
static_assert(4 * kPhiloxBatch * cdiv(cdiv(kBK + 3, 4), kPhiloxBatch) <= kRaw, "raw scratch");
inline void philox_keys(uint32_t g0, int64_t ngroups, uint32_t row, uint32_t bh, uint32_t k0,
                        uint32_t k1, uint32_t* raw) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  __m256i kv[20];  // the round keys (Weyl schedule)
  for (int r = 0; r < 10; ++r) {
    kv[2 * r] = _mm256_set1_epi64x(k0 + 0x9E3779B9u * static_cast<uint32_t>(r));
    kv[2 * r + 1] = _mm256_set1_epi64x(k1 + 0xBB67AE85u * static_cast<uint32_t>(r));
  }
  for (int64_t g = 0; g < ngroups; g += kPhiloxBatch) {
    const uint32_t gb = g0 + static_cast<uint32_t>(g);
    const __m256i base = _mm256_setr_epi64x(gb, gb + 1u, gb + 2u, gb + 3u);
    __m256i x0[kSets], x1[kSets], x2[kSets], x3[kSets];
#pragma GCC unroll 4
    for (int t = 0; t < kSets; ++t) {
      x0[t] = _mm256_add_epi64(base, _mm256_set1_epi64x(4 * t));
      x1[t] = _mm256_set1_epi64x(row);
      x2[t] = _mm256_set1_epi64x(bh);
      x3[t] = _mm256_setzero_si256();
    }
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
#pragma GCC unroll 4
      for (int t = 0; t < kSets; ++t) {
        const __m256i p0 = _mm256_mul_epu32(x0[t], m0), p1 = _mm256_mul_epu32(x2[t], m1);
        x0[t] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x1[t]), kv[2 * r]);
        x1[t] = p1;
        x2[t] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x3[t]), kv[2 * r + 1]);
        x3[t] = p0;
      }
    }
    // to key order: counter c's four outputs at raw[4 c .. 4 c + 4)
#pragma GCC unroll 4
    for (int t = 0; t < kSets; ++t) {
      const __m256i u = _mm256_blend_epi32(x0[t], _mm256_slli_epi64(x1[t], 32), 0xAA);  // x0, x1
      const __m256i w = _mm256_blend_epi32(x2[t], _mm256_slli_epi64(x3[t], 32), 0xAA);  // x2, x3
      const __m256i lo = _mm256_unpacklo_epi64(u, w);  // counters 0 | 2 of the set
      const __m256i hi = _mm256_unpackhi_epi64(u, w);  // counters 1 | 3
      uint32_t* dst = raw + 4 * g + 16 * t;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8),
                          _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}
#else
inline void philox_keys(uint32_t g0, int64_t ngroups, uint32_t row, uint32_t bh, uint32_t k0,
                        uint32_t k1, uint32_t* raw) {
  for (int64_t g = 0; g < ngroups; ++g) {
    const Philox4 r = philox4x32_10(g0 + static_cast<uint32_t>(g), row, bh, 0u, k0, k1);
    for (int l = 0; l < 4; ++l) raw[4 * g + l] = r.x[l];
  }
}
#endif

// z[t] for t < n: the dropout factor Z = keep * zscale of score (bh, row, col0 + t) for t in [lo,
// hi), 0 outside. raw: kRaw values of scratch.
template <class T, class A>
void drop_factors(const Ctx<T, A>& cx, int64_t bh, int64_t row, int64_t col0, int64_t lo,
                  int64_t hi, int64_t n, A* z, uint32_t* raw) {
  for (int64_t t = 0; t < std::min(lo, n); ++t) z[t] = A(0);
  for (int64_t t = std::max<int64_t>(hi, 0); t < n; ++t) z[t] = A(0);
  if (lo >= hi) return;
  const int64_t a = col0 + lo, base = a & ~int64_t{3}, sh = a - base, cnt = hi - lo;
  philox_keys(static_cast<uint32_t>(base >> 2), cdiv(sh + cnt, 4), static_cast<uint32_t>(row),
              static_cast<uint32_t>(bh), cx.key0, cx.key1, raw);
  const uint32_t* r = raw + sh;
  A* zz = z + lo;
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    const __m256i tv = _mm256_set1_epi32(static_cast<int>(cx.thr));
    const __m256 sv = _mm256_set1_ps(cx.zscale);
    for (; t + kW <= cnt; t += kW) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + t));
      const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(x, tv), x);  // x >= thr
      _mm256_storeu_ps(zz + t, _mm256_and_ps(_mm256_castsi256_ps(keep), sv));
    }
  }
#endif
  for (; t < cnt; ++t) zz[t] = r[t] >= cx.thr ? cx.zscale : A(0);
}

// ------------------------------------------------------------------ row operations

inline double max_nan(double a, double b) { return (std::isnan(b) || b > a) ? b : a; }

// s[0, npad) := the scores in exp units (c * s + mk * mask), -inf outside [lo, hi) (0 <= lo < hi
// <= npad) and where a bool mask is false. Returns the row's max when kMax.
template <bool kMax, class T, class A>
A units_row(A* s, int64_t npad, int64_t lo, int64_t hi, A c, A mk, int kind, const MaskRow& mr) {
  const A ninf = -std::numeric_limits<A>::infinity();
  if constexpr (std::is_same_v<A, float>) {
    const Vf cv = vset(c);
    if (kind == kNoMask && lo == 0 && hi == npad) {
      Vf mx = vset(-kInf);
      for (int64_t j = 0; j < npad; j += kW) {
        const Vf u = vmul(vload_raw(s + j), cv);
        vstore_raw(s + j, u);
        if constexpr (kMax) mx = vmax(mx, u);
      }
      return kMax ? hmax(mx) : 0.f;
    }
    if (kind == kNoMask) {
      for (int64_t j = 0; j < npad; j += kW) vstore_raw(s + j, vmul(vload_raw(s + j), cv));
    }
  } else {
    if (kind == kNoMask) {
      for (int64_t j = lo; j < hi; ++j) s[j] *= c;
    }
  }
  if (kind == kBoolMask) {
    const bool* m = static_cast<const bool*>(mr.ptr);
    for (int64_t j = lo; j < hi; ++j) s[j] = m[j * mr.stride] ? s[j] * c : ninf;
  } else if (kind == kAddMask) {
    const T* m = static_cast<const T*>(mr.ptr);
    for (int64_t j = lo; j < hi; ++j) s[j] = s[j] * c + static_cast<A>(m[j * mr.stride]) * mk;
  } else if (kind == kAddMaskF32) {
    const float* m = static_cast<const float*>(mr.ptr);
    for (int64_t j = lo; j < hi; ++j) s[j] = s[j] * c + static_cast<A>(m[j * mr.stride]) * mk;
  }
  for (int64_t j = 0; j < lo; ++j) s[j] = ninf;
  for (int64_t j = hi; j < npad; ++j) s[j] = ninf;
  if constexpr (!kMax) {
    return A(0);
  } else if constexpr (std::is_same_v<A, float>) {
    Vf mx = vset(-kInf);
    for (int64_t j = 0; j < npad; j += kW) mx = vmax(mx, vload_raw(s + j));
    return hmax(mx);
  } else {
    A mx = ninf;
    for (int64_t j = lo; j < hi; ++j) mx = max_nan(mx, s[j]);
    return mx;
  }
}

inline float exp_units(float x) { return std::exp2(x); }
inline double exp_units(double x) { return std::exp(x); }

// s[j] := exp(s[j] - mu) (in exp units) over [0, npad); returns the sum.
inline float exp_row(float* s, int64_t npad, float mu) {
  const Vf mv = vset(mu);
  Vf acc = vset(0.f);
  for (int64_t j = 0; j < npad; j += kW) {
    const Vf e = exp2v(vsub(vload_raw(s + j), mv));
    vstore_raw(s + j, e);
    acc = vadd(acc, e);
  }
  return hsum(acc);
}
inline double exp_row(double* s, int64_t npad, double mu) {
  double acc = 0.0;
  for (int64_t j = 0; j < npad; ++j) {
    s[j] = std::exp(s[j] - mu);
    acc += s[j];
  }
  return acc;
}

// s[j] *= z[j], j < n (a multiple of kW).
inline void mul_row(float* s, const float* z, int64_t n) {
  for (int64_t j = 0; j < n; j += kW) vstore_raw(s + j, vmul(vload_raw(s + j), vload_raw(z + j)));
}
inline void mul_row(double* s, const double* z, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] *= z[j];
}

inline void scale_row(float* o, int64_t n, float a) {
  const Vf av = vset(a);
  for (int64_t j = 0; j < n; j += kW) vstore_raw(o + j, vmul(vload_raw(o + j), av));
}
inline void scale_row(double* o, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) o[j] *= a;
}

// One row of the forward's online softmax for a tile: s (npad scores) becomes P, the running
// max m / sum l are updated and the output accumulator o (n_o values) rescaled.
template <class T, class A>
void fwd_row(A* s, int64_t npad, int64_t lo, int64_t hi, const Ctx<T, A>& cx, const MaskRow& mr,
             A& m, A& l, A* o, int64_t n_o) {
  if (lo >= hi) {
    zero_row(s, npad);
    return;
  }
  if constexpr (std::is_same_v<A, float>) {
    if (cx.fused && lo == 0 && hi == npad) {
      // max(c * s) = c * max(s) for 0 < c < inf; p = 2^(c * s - mu) in one FMA per vector
      Vf mx = vset(-kInf);
      for (int64_t j = 0; j < npad; j += kW) mx = vmax(mx, vload_raw(s + j));
      const float mnew = max_nan(m, hmax(mx) * cx.c);
      const float mu = mnew == -kInf ? 0.f : mnew;
      const float alpha = mu == m ? 1.f : exp_units(m - mu);
      const Vf cv = vset(cx.c), nmu = vset(-mu);
      Vf acc = vset(0.f);
      for (int64_t j = 0; j < npad; j += kW) {
        const Vf e = exp2v(vfma(vload_raw(s + j), cv, nmu));
        vstore_raw(s + j, e);
        acc = vadd(acc, e);
      }
      l = l * alpha + hsum(acc);
      m = mnew;
      if (alpha != 1.f) scale_row(o, n_o, alpha);
      return;
    }
  }
  const A mt = units_row<true, T>(s, npad, lo, hi, cx.c, cx.mk, cx.mask_kind, mr);
  const A mnew = max_nan(m, mt);
  const A mu = mnew == -std::numeric_limits<A>::infinity() ? A(0) : mnew;
  const A alpha = exp_units(m - mu);  // 0 for m = -inf
  const A sum = exp_row(s, npad, mu);
  l = l * alpha + sum;
  m = mnew;
  if (alpha != A(1)) scale_row(o, n_o, alpha);
}

// One row of the backward: p (npad scores) becomes P = exp(s - lse), dp (dO . v) becomes
// dS = P * (dp - D) * scale.
// With dropout (z: the row's factors Z, else null), dS = P * (Z * dp - D) * scale and s becomes
// P * Z (what dV needs).
template <class T, class A>
void bwd_row(A* s, A* dp, int64_t npad, int64_t lo, int64_t hi, const Ctx<T, A>& cx,
             const MaskRow& mr, A lse, A D, const A* z) {
  if (lo >= hi || lse == -std::numeric_limits<A>::infinity()) {
    zero_row(s, npad);
    zero_row(dp, npad);
    return;
  }
  const A scale = static_cast<A>(cx.p.scale);
  if constexpr (std::is_same_v<A, float>) {
    // p = 2^(c * s - lse * log2e): one FMA from the raw score when there is no mask
    const bool fused = cx.mask_kind == kNoMask && lo == 0 && hi == npad;
    if (!fused) units_row<false, T>(s, npad, lo, hi, cx.c, cx.mk, cx.mask_kind, mr);
    const Vf nl2 = vset(-(lse * kLog2e)), dv = vset(D), sv = vset(scale),
             cv = vset(fused ? cx.c : 1.f);
    if (z == nullptr) {
      for (int64_t j = 0; j < npad; j += kW) {
        const Vf pj = exp2v(vfma(vload_raw(s + j), cv, nl2));
        vstore_raw(s + j, pj);
        vstore_raw(dp + j, vmul(vmul(pj, vsub(vload_raw(dp + j), dv)), sv));
      }
    } else {
      for (int64_t j = 0; j < npad; j += kW) {
        const Vf pj = exp2v(vfma(vload_raw(s + j), cv, nl2)), zj = vload_raw(z + j);
        vstore_raw(s + j, vmul(pj, zj));
        vstore_raw(dp + j, vmul(vmul(pj, vsub(vmul(zj, vload_raw(dp + j)), dv)), sv));
      }
    }
  } else {
    units_row<false, T>(s, npad, lo, hi, cx.c, cx.mk, cx.mask_kind, mr);
    for (int64_t j = 0; j < npad; ++j) {
      const double pj = std::exp(s[j] - lse);
      const double zj = z == nullptr ? 1.0 : z[j];
      s[j] = pj * zj;
      dp[j] = pj * (zj * dp[j] - D) * scale;
    }
  }
}

// ------------------------------------------------------------------ packed K / V blocks

// Packed key blocks of one (sequence, kv head) kept per thread: block kb in slot kb (or kb %
// slots when they do not all fit), refilled by `fill` when missing.
template <class A>
class BlockCache {
 public:
  BlockCache(int64_t block_elems, int64_t nblocks) : elems_(std::max<int64_t>(block_elems, 1)) {
    const int64_t fit =
        std::max<int64_t>(1, kCacheBytes / (elems_ * static_cast<int64_t>(sizeof(A))));
    slots_ = std::max<int64_t>(1, std::min(nblocks, fit));
    buf_.alloc(slots_ * elems_);
    tag_.assign(slots_, -1);
  }
  template <class F>
  const A* get(int64_t key, int64_t kb, F&& fill) {
    if (key != key_) {
      key_ = key;
      std::fill(tag_.begin(), tag_.end(), -1);
    }
    const int64_t slot = kb % slots_;
    A* dst = buf_.get() + slot * elems_;
    if (tag_[slot] != kb) {
      fill(dst);
      tag_[slot] = kb;
    }
    return dst;
  }

 private:
  int64_t elems_, slots_ = 1, key_ = -1;
  Buf<A> buf_;
  std::vector<int64_t> tag_;
};

// ------------------------------------------------------------------ forward

template <class A>
struct FwdScratch {
  Buf<A> q, s, o, m, l, z;
  Buf<uint32_t> raw;
  FwdScratch(int64_t Ep, int64_t Evp) {
    z.alloc(kBK);
    raw.alloc(kRaw);
    q.alloc(kBQ * std::max<int64_t>(Ep, 1));
    s.alloc(kBQ * kBK);
    o.alloc(kBQ * std::max<int64_t>(Evp, 1));
    m.alloc(kBQ);
    l.alloc(kBQ);
  }
};

template <class T, class A>
void fwd_tile(const Ctx<T, A>& cx, int64_t b, int64_t h, int64_t qb, FwdScratch<A>& w,
              BlockCache<A>& cache, A* tmp) {
  const Seq sq = cx.seq(b);
  const int64_t i0 = qb * kBQ;
  if (i0 >= sq.Lb) return;
  const int64_t m = std::min(kBQ, sq.Lb - i0), hk = h / cx.group;
  const int64_t E = cx.E, Ev = cx.Ev, Ep = cx.Ep, Evp = cx.Evp;
  A* qf = w.q.get();
  A* s = w.s.get();
  A* o = w.o.get();
  A* mrow = w.m.get();
  A* lrow = w.l.get();
  for (int64_t r = 0; r < m; ++r) {
    to_acc(cx.qrow(sq, h, i0 + r), E, qf + r * Ep, Ep);
    mrow[r] = -std::numeric_limits<A>::infinity();
    lrow[r] = A(0);
  }
  if (Evp > 0) zero_row(o, m * Evp);
  int64_t kb0, kb1;
  sq.key_blocks(i0, i0 + m, kb0, kb1);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * kBK, n = std::min(kBK, sq.Sb - j0);
    if (n <= 0 || !sq.live(i0, i0 + m, j0, j0 + n)) continue;
    const A* blk = cache.get(b * cx.Hk + hk, kb, [&](A* dst) {
      pack_panels(cx.krow(sq, hk, j0), cx.p.k_sl, n, E, dst, tmp);
      pack_rows(cx.vrow(sq, hk, j0), cx.p.v_sl, n, Ev, dst + kBK * E, Evp);
    });
    // the tile's keys: [jt, jt + nt) of the block's [j0, j0 + n)
    int64_t c0, c1;
    sq.cols(i0, i0 + m, j0, n, c0, c1);
    const int64_t jt = j0 + c0, nt = c1 - c0, npad = pad_nr(nt);
    gemm<false, false>(m, npad, E, qf, Ep, blk + c0 * E, E * kNR, kNR, s, npad);
    for (int64_t r = 0; r < m; ++r) {
      int64_t lo, hi;
      sq.range(i0 + r, lo, hi);
      lo = std::clamp<int64_t>(lo - jt, 0, nt);
      hi = std::clamp<int64_t>(hi - jt, 0, nt);
      fwd_row(s + r * npad, npad, lo, hi, cx, cx.mask_row(sq, h, i0 + r, jt), mrow[r], lrow[r],
              o + r * Evp, Evp);
      if (cx.dropout && lo < hi) {  // l keeps the undropped sum; O accumulates P * Z
        A* z = w.z.get();
        drop_factors(cx, sq.bb * cx.Hq + h, sq.q0 + i0 + r, sq.k0 + jt, lo, hi, npad, z,
                     w.raw.get());
        mul_row(s + r * npad, z, npad);
      }
    }
    gemm<true, false>(m, Evp, nt, s, npad, blk + kBK * E + c0 * Evp, kNR, Evp, o, Evp);
  }
  A* lse = static_cast<A*>(cx.p.lse);
  for (int64_t r = 0; r < m; ++r) {
    T* out = cx.orow(sq, h, i0 + r);
    const int64_t li = cx.lse_index(sq, h, i0 + r);
    const A l = lrow[r];
    if (l == A(0)) {
      zero_row(out, Ev);
      lse[li] = -std::numeric_limits<A>::infinity();
    } else {
      from_acc(o + r * Evp, Ev, A(1) / l, out);
      if constexpr (std::is_same_v<A, float>) {
        lse[li] = static_cast<float>(static_cast<double>(mrow[r]) * kLn2 +
                                     std::log(static_cast<double>(l)));
      } else {
        lse[li] = mrow[r] + std::log(l);
      }
    }
  }
}

template <class T, class A>
void fwd_typed(const AttnParams& p) {
  const Ctx<T, A> cx(p);
  const int64_t nqb = cdiv(cx.Lmax, kBQ), nkb = cdiv(cx.Smax, kBK);
  const int64_t ntask = cx.B * cx.Hq * nqb;
  if (ntask <= 0) return;
  at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    FwdScratch<A> w(cx.Ep, cx.Evp);
    BlockCache<A> cache(kBK * (cx.E + cx.Evp), nkb);
    Buf<A> tmp(std::max<int64_t>({cx.E, cx.Ev, 1}));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, qb = zigzag(t % nqb, nqb);
      fwd_tile(cx, bh / cx.Hq, bh % cx.Hq, qb, w, cache, tmp.get());
    }
  });
}

// ------------------------------------------------------------------ backward

template <class T, class A>
struct BwdCtx : Ctx<T, A> {
  const AttnBwdParams& bp;
  const T* dout;
  const T* out;
  const A* lse;
  const A* D = nullptr;  // rowsum(dO * O), laid out like lse
  // packed key block: K panels | V^T panels | K rows
  int64_t off_vt, off_kr, blk_elems;

  explicit BwdCtx(const AttnBwdParams& b) : Ctx<T, A>(b.fwd), bp(b) {
    dout = static_cast<const T*>(b.dout);
    out = static_cast<const T*>(b.fwd.o);
    lse = static_cast<const A*>(b.fwd.lse);
    off_vt = kBK * this->E;
    off_kr = off_vt + kBK * this->Ev;
    blk_elems = off_kr + kBK * this->Ep;
  }
  const T* dorow(const Seq& s, int64_t h, int64_t i) const {
    return dout + s.bb * bp.do_sb + h * bp.do_sh + (s.q0 + i) * bp.do_sl;
  }
  const T* outrow(const Seq& s, int64_t h, int64_t i) const {
    return out + s.bb * this->p.o_sb + h * this->p.o_sh + (s.q0 + i) * this->p.o_sl;
  }
  T* dqrow(const Seq& s, int64_t h, int64_t i) const {
    return static_cast<T*>(bp.dq) + s.bb * bp.dq_sb + h * bp.dq_sh + (s.q0 + i) * bp.dq_sl;
  }
  T* dkrow(const Seq& s, int64_t hk, int64_t j) const {
    return static_cast<T*>(bp.dk) + s.bb * bp.dk_sb + hk * bp.dk_sh + (s.k0 + j) * bp.dk_sl;
  }
  T* dvrow(const Seq& s, int64_t hk, int64_t j) const {
    return static_cast<T*>(bp.dv) + s.bb * bp.dv_sb + hk * bp.dv_sh + (s.k0 + j) * bp.dv_sl;
  }
  void pack_block(const Seq& sq, int64_t hk, int64_t j0, int64_t n, A* dst, A* tmp) const {
    pack_panels(this->krow(sq, hk, j0), this->p.k_sl, n, this->E, dst, tmp);
    pack_panels(this->vrow(sq, hk, j0), this->p.v_sl, n, this->Ev, dst + off_vt, tmp);
    pack_rows(this->krow(sq, hk, j0), this->p.k_sl, n, this->E, dst + off_kr, this->Ep);
  }
};

template <class A>
struct BwdScratch {
  Buf<A> q, dO, P, dS, dk, dv, dkt, dvt, dq, blk, tmp, z;
  Buf<uint32_t> raw;
  BwdScratch(int64_t E, int64_t Ev, int64_t Ep, int64_t Evp, int64_t blk_elems) {
    z.alloc(kBK);
    raw.alloc(kRaw);
    q.alloc(kBQ * std::max<int64_t>(Ep, 1));
    dO.alloc(kBQ * std::max<int64_t>(Evp, 1));
    P.alloc(kBQ * kBK);
    dS.alloc(kBQ * kBK);
    dk.alloc(kBK * std::max<int64_t>(Ep, 1));
    dv.alloc(kBK * std::max<int64_t>(Evp, 1));
    dkt.alloc(kBK * std::max<int64_t>(Ep, 1));
    dvt.alloc(kBK * std::max<int64_t>(Evp, 1));
    dq.alloc(kBQ * std::max<int64_t>(Ep, 1));
    blk.alloc(blk_elems);
    tmp.alloc(std::max<int64_t>({E, Ev, 1}));
  }
};

// P (P * Z with dropout) and dS of the tile (rows [i0, i0 + m) of head h, keys [j0, j0 + n))
// from the converted Q / dO rows and the packed key block.
template <class T, class A>
void bwd_ps(const BwdCtx<T, A>& cx, const Seq& sq, int64_t h, int64_t i0, int64_t m, int64_t j0,
            int64_t c0, int64_t nt, const A* qf, const A* dof, const A* blk, A* P, A* dS,
            BwdScratch<A>& w) {
  const int64_t npad = pad_nr(nt), jt = j0 + c0;
  gemm<false, false>(m, npad, cx.E, qf, cx.Ep, blk + c0 * cx.E, cx.E * kNR, kNR, P, npad);
  gemm<false, false>(m, npad, cx.Ev, dof, cx.Evp, blk + cx.off_vt + c0 * cx.Ev, cx.Ev * kNR, kNR,
                     dS, npad);
  for (int64_t r = 0; r < m; ++r) {
    int64_t lo, hi;
    sq.range(i0 + r, lo, hi);
    lo = std::clamp<int64_t>(lo - jt, 0, nt);
    hi = std::clamp<int64_t>(hi - jt, 0, nt);
    const int64_t li = cx.lse_index(sq, h, i0 + r);
    A* z = nullptr;
    if (cx.dropout && lo < hi && cx.lse[li] != -std::numeric_limits<A>::infinity()) {
      z = w.z.get();
      drop_factors(cx, sq.bb * cx.Hq + h, sq.q0 + i0 + r, sq.k0 + jt, lo, hi, npad, z, w.raw.get());
    }
    bwd_row(P + r * npad, dS + r * npad, npad, lo, hi, cx, cx.mask_row(sq, h, i0 + r, jt),
            cx.lse[li], cx.D[li], static_cast<const A*>(z));
  }
}

template <class T, class A>
void load_q_do(const BwdCtx<T, A>& cx, const Seq& sq, int64_t h, int64_t i0, int64_t m, A* qf,
               A* dof) {
  for (int64_t r = 0; r < m; ++r) {
    to_acc(cx.qrow(sq, h, i0 + r), cx.E, qf + r * cx.Ep, cx.Ep);
    to_acc(cx.dorow(sq, h, i0 + r), cx.Ev, dof + r * cx.Evp, cx.Evp);
  }
}

template <class A>
inline void add_into(A* dst, const A* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Key block kb of (sequence b, kv head hk): dK and dV over the group's q heads and their query
// blocks in order, stored to dk / dv. With dq_acc (the group's dQ, (group, Lb, Ep) in A) also
// accumulates dQ there.
template <class T, class A>
void kv_block(const BwdCtx<T, A>& cx, int64_t b, int64_t hk, int64_t kb, BwdScratch<A>& w,
              A* dq_acc) {
  const Seq sq = cx.seq(b);
  const int64_t j0 = kb * kBK, n = std::min(kBK, sq.Sb - j0);
  if (n <= 0) return;
  const int64_t Ep = cx.Ep, Evp = cx.Evp;
  A* dk = w.dk.get();
  A* dv = w.dv.get();
  if (Ep > 0) zero_row(dk, n * Ep);
  if (Evp > 0) zero_row(dv, n * Evp);
  int64_t qb0, qb1;
  sq.query_blocks(j0, j0 + n, qb0, qb1);
  bool packed = false;
  for (int64_t g = 0; g < cx.group; ++g) {
    const int64_t h = hk * cx.group + g;
    for (int64_t qb = qb0; qb < qb1; ++qb) {
      const int64_t i0 = qb * kBQ, m = std::min(kBQ, sq.Lb - i0);
      if (m <= 0 || !sq.live(i0, i0 + m, j0, j0 + n)) continue;
      if (!packed) {
        cx.pack_block(sq, hk, j0, n, w.blk.get(), w.tmp.get());
        packed = true;
      }
      A* qf = w.q.get();
      A* dof = w.dO.get();
      A* P = w.P.get();
      A* dS = w.dS.get();
      load_q_do(cx, sq, h, i0, m, qf, dof);
      int64_t c0, c1;
      sq.cols(i0, i0 + m, j0, n, c0, c1);
      const int64_t nt = c1 - c0, npad = pad_nr(nt);
      bwd_ps(cx, sq, h, i0, m, j0, c0, nt, qf, dof, w.blk.get(), P, dS, w);
      // each tile's products summed on their own, then added: a two-level sum, so the error
      // of a long key column grows with the tile and block counts, not with L
      gemm<false, true>(nt, Evp, m, P, npad, dof, kNR, Evp, w.dvt.get(), Evp);
      gemm<false, true>(nt, Ep, m, dS, npad, qf, kNR, Ep, w.dkt.get(), Ep);
      add_into(dv + c0 * Evp, w.dvt.get(), nt * Evp);
      add_into(dk + c0 * Ep, w.dkt.get(), nt * Ep);
      if (dq_acc != nullptr) {
        gemm<true, false>(m, Ep, nt, dS, npad, w.blk.get() + cx.off_kr + c0 * Ep, kNR, Ep,
                          dq_acc + (g * sq.Lb + i0) * Ep, Ep);
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    from_acc(dk + j * Ep, cx.E, A(1), cx.dkrow(sq, hk, j0 + j));
    from_acc(dv + j * Evp, cx.Ev, A(1), cx.dvrow(sq, hk, j0 + j));
  }
}

// dQ of query block qb of (sequence b, q head h) over its key blocks in order.
template <class T, class A>
void q_block(const BwdCtx<T, A>& cx, int64_t b, int64_t h, int64_t qb, BwdScratch<A>& w,
             BlockCache<A>& cache) {
  const Seq sq = cx.seq(b);
  const int64_t i0 = qb * kBQ;
  if (i0 >= sq.Lb) return;
  const int64_t m = std::min(kBQ, sq.Lb - i0), hk = h / cx.group, Ep = cx.Ep;
  A* qf = w.q.get();
  A* dof = w.dO.get();
  A* dq = w.dq.get();
  if (Ep > 0) zero_row(dq, m * Ep);
  int64_t kb0, kb1;
  sq.key_blocks(i0, i0 + m, kb0, kb1);
  bool loaded = false;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * kBK, n = std::min(kBK, sq.Sb - j0);
    if (n <= 0 || !sq.live(i0, i0 + m, j0, j0 + n)) continue;
    if (!loaded) {
      load_q_do(cx, sq, h, i0, m, qf, dof);
      loaded = true;
    }
    const A* blk = cache.get(b * cx.Hk + hk, kb,
                             [&](A* dst) { cx.pack_block(sq, hk, j0, n, dst, w.tmp.get()); });
    int64_t c0, c1;
    sq.cols(i0, i0 + m, j0, n, c0, c1);
    const int64_t nt = c1 - c0;
    bwd_ps(cx, sq, h, i0, m, j0, c0, nt, qf, dof, blk, w.P.get(), w.dS.get(), w);
    gemm<true, false>(m, Ep, nt, w.dS.get(), pad_nr(nt), blk + cx.off_kr + c0 * Ep, kNR, Ep, dq,
                      Ep);
  }
  for (int64_t r = 0; r < m; ++r) from_acc(dq + r * Ep, cx.E, A(1), cx.dqrow(sq, h, i0 + r));
}

template <class T, class A>
void bwd_typed(const AttnBwdParams& bp) {
  BwdCtx<T, A> cx(bp);
  const int64_t nseq = cx.B, Hq = cx.Hq, Hk = cx.Hk;
  // D = rowsum(dO * O), in A, laid out like lse.
  const int64_t nrows = cx.varlen ? Hq * cx.total_q : nseq * Hq * cx.Lmax;
  std::unique_ptr<A[]> D(new A[std::max<int64_t>(nrows, 1)]);
  cx.D = D.get();
  const int64_t nqb = cdiv(cx.Lmax, kBQ), nkb = cdiv(cx.Smax, kBK);
  at::parallel_for(0, nseq * Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, qb = t % nqb, b = bh / Hq, h = bh % Hq;
      const Seq sq = cx.seq(b);
      for (int64_t i = qb * kBQ; i < std::min(sq.Lb, (qb + 1) * kBQ); ++i) {
        const T* x = cx.dorow(sq, h, i);
        const T* y = cx.outrow(sq, h, i);
        A d = 0;
        if constexpr (std::is_same_v<A, float>) {
          Vf acc = vset(0.f);
          int64_t e = 0;
          for (; e + kW <= cx.Ev; e += kW) acc = vfma(load(x + e), load(y + e), acc);
          if (e < cx.Ev) {
            acc = vfma(load_n(x + e, cx.Ev - e, 0.f), load_n(y + e, cx.Ev - e, 0.f), acc);
          }
          d = hsum(acc);
        } else {
          for (int64_t e = 0; e < cx.Ev; ++e) d += x[e] * y[e];
        }
        D[cx.lse_index(sq, h, i)] = d;
      }
    }
  });

  const int64_t threads = at::get_num_threads();
  const int64_t dq_elems = cx.group * cx.Lmax * cx.Ep;
  // The split schedule computes S, P and dP twice (8 products per tile against 5) but shares
  // its many tasks evenly; per head, the busiest thread runs ceil(n / t) of the n equal-cost
  // (batch, kv head) tasks. Per head when that is at most 1.5x the even share n / t (n = 3 and
  // 4 on t = 2 threads, yes; n = 1 on 2, or 5 on 4, no). Measured here, 2 threads, causal
  // L = 2048, d = 64, 4 heads: 71 ms split, 50 ms per head (torch 69 ms).
  const int64_t pairs = nseq * Hk;
  const bool per_head = !cx.varlen && 2 * cdiv(pairs, threads) * threads <= 3 * pairs &&
                        dq_elems * static_cast<int64_t>(sizeof(A)) <= (int64_t{16} << 20);
  if (per_head) {
    at::parallel_for(0, nseq * Hk, 1, [&](int64_t t0, int64_t t1) {
      BwdScratch<A> w(cx.E, cx.Ev, cx.Ep, cx.Evp, cx.blk_elems);
      Buf<A> dq_acc(std::max<int64_t>(dq_elems, 1));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / Hk, hk = t % Hk;
        const Seq sq = cx.seq(b);
        if (dq_elems > 0) zero_row(dq_acc.get(), dq_elems);
        for (int64_t kb = 0; kb < cdiv(sq.Sb, kBK); ++kb) kv_block(cx, b, hk, kb, w, dq_acc.get());
        for (int64_t g = 0; g < cx.group; ++g) {
          for (int64_t i = 0; i < sq.Lb; ++i) {
            from_acc(dq_acc.get() + (g * sq.Lb + i) * cx.Ep, cx.E, A(1),
                     cx.dqrow(sq, hk * cx.group + g, i));
          }
        }
      }
    });
    return;
  }
  // Pass 1: dK, dV per (sequence, kv head, key block).
  at::parallel_for(0, nseq * Hk * nkb, 1, [&](int64_t t0, int64_t t1) {
    BwdScratch<A> w(cx.E, cx.Ev, cx.Ep, cx.Evp, cx.blk_elems);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nkb, kb = zigzag(t % nkb, nkb);
      kv_block(cx, bh / Hk, bh % Hk, kb, w, static_cast<A*>(nullptr));
    }
  });
  // Pass 2: dQ per (sequence, q head, query block).
  at::parallel_for(0, nseq * Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    BwdScratch<A> w(cx.E, cx.Ev, cx.Ep, cx.Evp, cx.blk_elems);
    BlockCache<A> cache(cx.blk_elems, nkb);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, qb = zigzag(t % nqb, nqb);
      q_block(cx, bh / Hq, bh % Hq, qb, w, cache);
    }
  });
}

}  // namespace

void attention_fwd(const AttnParams& p) {
  switch (p.dtype) {
    case DType::F32:
      return fwd_typed<float, float>(p);
    case DType::F16:
      return fwd_typed<Half, float>(p);
    case DType::BF16:
      return fwd_typed<BFloat16, float>(p);
    case DType::F64:
      return fwd_typed<double, double>(p);
    case DType::Bool:
      break;
  }
}

void attention_bwd(const AttnBwdParams& p) {
  switch (p.fwd.dtype) {
    case DType::F32:
      return bwd_typed<float, float>(p);
    case DType::F16:
      return bwd_typed<Half, float>(p);
    case DType::BF16:
      return bwd_typed<BFloat16, float>(p);
    case DType::F64:
      return bwd_typed<double, double>(p);
    case DType::Bool:
      break;
  }
}

}  // namespace lmk::cpu::CPU_CAPABILITY
