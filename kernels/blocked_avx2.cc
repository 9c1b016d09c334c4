// AVX2 blocked matmul for M > kSmallM (prefill, image encoder) and for the
// 1.6bit format at any M: decode a kBlockRows x kBlockK tile of W to floats
// once, then run a small register-tiled dot-product kernel over all rows of x.
#include "internal.h"

#if TVK_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "avx2_codes.h"

namespace tvk {
namespace {

// y[i, j] (+)= sum_k x[i, k] * b[j, k] for an MR x NR tile. One accumulator
// per output keeps the k order, and so the result, independent of the tile
// shape a given element lands in.
template <int MR, int NR>
TVK_AVX2 void MicroKernel(const float* x, int64_t ldx, const float* b, int64_t ldb,
                          int64_t kc, float* y, int64_t ldy, bool accumulate) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    __m256 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = _mm256_loadu_ps(b + j * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      float s = HorizontalSum(acc[i][j]);
      for (int64_t t = k; t < kc; ++t) s += x[i * ldx + t] * b[j * ldb + t];
      float* out = y + i * ldy + j;
      *out = accumulate ? *out + s : s;
    }
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*,
                         int64_t, bool);

// [MR-1][NR-1]. A single x row uses 4 weight rows for enough independent FMA
// chains; otherwise 2 keeps MR*NR accumulators plus loads within 16 registers.
constexpr MicroFn kMicro[4][4] = {
    {MicroKernel<1, 1>, MicroKernel<1, 2>, MicroKernel<1, 3>, MicroKernel<1, 4>},
    {MicroKernel<2, 1>, MicroKernel<2, 2>, nullptr, nullptr},
    {MicroKernel<3, 1>, MicroKernel<3, 2>, nullptr, nullptr},
    {MicroKernel<4, 1>, MicroKernel<4, 2>, nullptr, nullptr},
};

}  // namespace

void MatmulBlockedAvx2(const MatmulProblem& p, int64_t n0, int64_t n1) {
  // Per-thread tile buffer, kept between calls (no allocation per call).
  thread_local std::vector<float> tile;
  tile.resize(kBlockRows * kBlockK);
  float* b = tile.data();

  for (int64_t nb0 = n0; nb0 < n1; nb0 += kBlockRows) {
    const int64_t nb = std::min(kBlockRows, n1 - nb0);
    for (int64_t k0 = 0; k0 < p.K; k0 += kBlockK) {
      const int64_t kc = std::min(kBlockK, p.K - k0);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t n = nb0 + j;
        const uint8_t* row = RowPtr(p.fmt, p.w, p.row_bytes, n);
        DecodeRowAvx2(p.fmt, row, p.scale + n * p.scale_cols, p.group,
                      k0, k0 + kc, b + j * kBlockK);
      }
      for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
        const int mr = static_cast<int>(std::min<int64_t>(4, p.M - m0));
        const int nr_max = mr == 1 ? 4 : 2;
        for (int64_t j0 = 0; j0 < nb; j0 += nr_max) {
          const int nr = static_cast<int>(std::min<int64_t>(nr_max, nb - j0));
          kMicro[mr - 1][nr - 1](p.x + m0 * p.K + k0, p.K, b + j0 * kBlockK, kBlockK, kc,
                                 p.y + m0 * p.N + nb0 + j0, p.N, k0 > 0);
        }
      }
    }
  }
}

}  // namespace tvk

#endif  // TVK_HAVE_AVX2
