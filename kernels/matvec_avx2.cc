// AVX2 fused kernel for small M (batch-1 decode) and the bit-packed formats:
// weights stream from memory once, each dword of codes becomes 2 (2bit) or 4
// (1bit) vectors of scale * q in registers (see avx2_codes.h) and is FMA'd
// with up to kSmallM rows of x. No weight tile is written to memory.
#include "internal.h"

#if TVK_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>

#include "avx2_codes.h"

namespace tvk {
namespace {

// FMA chains per x row: 4 for one row so FMA latency is hidden, else 2 per
// row (MB rows already give independent chains) to stay within 16 registers.
template <Format F, int MB>
struct DotShape {
  static constexpr int kVecs = BitLayout<F>::kVecs;
  static constexpr int kUnroll = (MB == 1 && kVecs == 2) ? 2 : 1;  // dwords per step
  static constexpr int kAcc = kVecs * kUnroll;
};

// acc[m][first + v] += q_v * x[m, k + 8v] for the codes in one dword.
template <Format F, int MB, int kAcc>
TVK_AVX2 inline __attribute__((always_inline)) void DwordStep(
    const uint8_t* codes_ptr, const __m256i* shifts, __m256 table, const float* x,
    int64_t ldx, int64_t k, int first, __m256 (&acc)[MB][kAcc]) {
  const __m256i codes = BroadcastDword(codes_ptr);
  for (int v = 0; v < BitLayout<F>::kVecs; ++v) {
    const __m256 q = Expand8(codes, shifts[v], table);
    for (int m = 0; m < MB; ++m) {
      acc[m][first + v] =
          _mm256_fmadd_ps(q, _mm256_loadu_ps(x + m * ldx + k + 8 * v), acc[m][first + v]);
    }
  }
}

// y[m * ldy] = sum_k x[m, k] * scale * q[k] for one weight row and MB x rows.
template <Format F, int MB>
TVK_AVX2 void DotRow(const float* x, int64_t K, const uint8_t* row, const float* srow,
                     int64_t G, float* y, int64_t ldy) {
  using L = BitLayout<F>;
  using S = DotShape<F, MB>;
  __m256i shifts[L::kVecs];
  for (int v = 0; v < L::kVecs; ++v) shifts[v] = LaneShifts<F>(v);
  __m256 acc[MB][S::kAcc];
  for (int m = 0; m < MB; ++m) {
    for (int a = 0; a < S::kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
  }
  float tail[MB] = {};

  for (int64_t k = 0; k < K;) {  // one scale group per pass
    const int64_t g = k / G;
    const int64_t end = (g + 1) * G;
    const float s = srow[g];
    const __m256 table = BitCodes<F>::Table(s);
    for (; k < end && k % L::kPerByte != 0; ++k) {  // group not byte aligned
      const float q = s * CodeAt<F>(row, k);
      for (int m = 0; m < MB; ++m) tail[m] += q * x[m * K + k];
    }
    for (; k + S::kUnroll * L::kPerDword <= end; k += S::kUnroll * L::kPerDword) {
      for (int u = 0; u < S::kUnroll; ++u) {
        const int64_t ku = k + u * L::kPerDword;
        DwordStep<F, MB, S::kAcc>(row + ku / L::kPerByte, shifts, table, x, K, ku,
                                  u * L::kVecs, acc);
      }
    }
    if (S::kUnroll > 1 && k + L::kPerDword <= end) {
      DwordStep<F, MB, S::kAcc>(row + k / L::kPerByte, shifts, table, x, K, k, 0, acc);
      k += L::kPerDword;
    }
    for (; k + 8 <= end; k += 8) {  // 8 codes = kBits bytes, never past the row
      const __m256 q = Expand8(BroadcastCodes(row + k / L::kPerByte, L::kBits), shifts[0],
                               table);
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
      }
    }
    for (; k < end; ++k) {
      const float q = s * CodeAt<F>(row, k);
      for (int m = 0; m < MB; ++m) tail[m] += q * x[m * K + k];
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m256 sum = acc[m][0];
    for (int a = 1; a < S::kAcc; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
    y[m * ldy] = HorizontalSum(sum) + tail[m];
  }
}

template <Format F>
void MatmulSmallMT(const MatmulProblem& p, int64_t n0, int64_t n1) {
  using DotFn = void (*)(const float*, int64_t, const uint8_t*, const float*, int64_t,
                         float*, int64_t);
  static constexpr DotFn kDot[4] = {DotRow<F, 1>, DotRow<F, 2>, DotRow<F, 3>, DotRow<F, 4>};
  static_assert(kSmallM <= 4, "kDot covers up to 4 rows of x at once");
  for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
    const int mb = static_cast<int>(std::min<int64_t>(4, p.M - m0));
    for (int64_t n = n0; n < n1; ++n) {
      kDot[mb - 1](p.x + m0 * p.K, p.K, p.w + n * p.row_bytes, p.scale + n * p.scale_cols,
                   p.group, p.y + m0 * p.N + n, p.N);
    }
  }
}

}  // namespace

void MatmulSmallMAvx2(const MatmulProblem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case Format::k2Bit:
      return MatmulSmallMT<Format::k2Bit>(p, n0, n1);
    case Format::k1Bit:
      return MatmulSmallMT<Format::k1Bit>(p, n0, n1);
    case Format::k1p6Bit:
      return MatmulBlockedAvx2(p, n0, n1);  // trits do not split into lanes
    case Format::kInt8:
    case Format::kInt4:
    case Format::k2BitLut:
      return MatmulScalar(p, n0, n1);  // not dispatched here (api.cc)
  }
}

}  // namespace tvk

#endif  // TVK_HAVE_AVX2
