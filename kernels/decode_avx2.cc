// AVX2 row decoders: packed codes -> scale * q floats. Used by the unpack
// kernels and by the blocked matmul, which decodes a tile once per x block.
#include "internal.h"

#if TVK_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>

#include "avx2_codes.h"

namespace tvk {
namespace {

template <Format F>
TVK_AVX2 void DecodeBits(const uint8_t* row, const float* srow, int64_t G, int64_t k0,
                         int64_t k1, float* out) {
  using L = BitLayout<F>;
  __m256i shifts[L::kVecs];
  for (int v = 0; v < L::kVecs; ++v) shifts[v] = LaneShifts<F>(v);

  int64_t k = k0;
  while (k < k1) {  // one scale group (or its part inside [k0, k1)) per pass
    const int64_t g = k / G;
    const int64_t end = std::min(k1, (g + 1) * G);
    const float s = srow[g];
    const __m256 table = BitCodes<F>::Table(s);
    // Groups that do not start on a byte boundary begin with a scalar head.
    for (; k < end && k % L::kPerByte != 0; ++k) out[k - k0] = s * CodeAt<F>(row, k);
    for (; k + L::kPerDword <= end; k += L::kPerDword) {
      const __m256i codes = BroadcastDword(row + k / L::kPerByte);
      for (int v = 0; v < L::kVecs; ++v) {
        _mm256_storeu_ps(out + (k - k0) + 8 * v, Expand8(codes, shifts[v], table));
      }
    }
    for (; k + 8 <= end; k += 8) {  // 8 codes = kBits bytes, never past the row
      const __m256i codes = BroadcastCodes(row + k / L::kPerByte, L::kBits);
      _mm256_storeu_ps(out + (k - k0), Expand8(codes, shifts[0], table));
    }
    for (; k < end; ++k) out[k - k0] = s * CodeAt<F>(row, k);
  }
}

// 1.6bit: one 8-float table store per byte at out + 5j. The 3 extra lanes are
// overwritten by the next byte, so a store is only issued while it stays
// inside [k0, k1). When groups hold whole bytes (G % 5 == 0, e.g. per-row
// scales) the scale is applied on the fly, otherwise in a second pass.
TVK_AVX2 void DecodeTrits(const uint8_t* row, const float* srow, int64_t G, int64_t k0,
                          int64_t k1, float* out) {
  const bool fused_scale = G % 5 == 0;
  int64_t k = k0;  // multiple of 5
  while (k < k1) {
    const int64_t g = k / G;
    const int64_t end = fused_scale ? std::min(k1, (g + 1) * G) : k1;
    const float s = fused_scale ? srow[g] : 1.f;
    const __m256 sv = _mm256_set1_ps(s);
    const uint8_t* byte = row + k / 5;
    for (; k + 5 <= end && k + 8 <= k1; k += 5, ++byte) {
      _mm256_storeu_ps(out + (k - k0), _mm256_mul_ps(_mm256_load_ps(kTrits.f[*byte]), sv));
    }
    for (; k < end; ++k) out[k - k0] = s * kTrits.q[row[k / 5]][k % 5];
  }
  if (fused_scale) return;
  for (k = k0; k < k1;) {
    const int64_t g = k / G;
    const int64_t end = std::min(k1, (g + 1) * G);
    const __m256 sv = _mm256_set1_ps(srow[g]);
    for (; k + 8 <= end; k += 8) {
      _mm256_storeu_ps(out + (k - k0), _mm256_mul_ps(_mm256_loadu_ps(out + (k - k0)), sv));
    }
    for (; k < end; ++k) out[k - k0] *= srow[g];
  }
}

// The head formats (int8 / int4) are unpacked rarely (only --ops unpack of a
// quantized head); plain code is enough there.
template <Format F>
void DecodeScalar(const uint8_t* row, const float* srow, int64_t group, int64_t k0, int64_t k1,
                  float* out) {
  for (int64_t k = k0; k < k1; ++k) {
    out[k - k0] = srow[k / group] * static_cast<float>(CodeAt<F>(row, k));
  }
}

}  // namespace

void DecodeRowAvx2(Format fmt, const uint8_t* row, const float* srow, int64_t group,
                   int64_t k0, int64_t k1, float* out) {
  switch (fmt) {
    case Format::k2Bit:
      return DecodeBits<Format::k2Bit>(row, srow, group, k0, k1, out);
    case Format::k1p6Bit:
      return DecodeTrits(row, srow, group, k0, k1, out);
    case Format::k1Bit:
      return DecodeBits<Format::k1Bit>(row, srow, group, k0, k1, out);
    case Format::kInt8:
      return DecodeScalar<Format::kInt8>(row, srow, group, k0, k1, out);
    case Format::kInt4:
      return DecodeScalar<Format::kInt4>(row, srow, group, k0, k1, out);
    case Format::k2BitLut:
      return DecodeScalar<Format::k2BitLut>(row, srow, group, k0, k1, out);
  }
}

void UnpackAvx2(const UnpackProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    DecodeRowAvx2(p.fmt, RowPtr(p.fmt, p.w, p.row_bytes, n), p.scale + n * p.scale_cols, p.group, 0,
                  p.K, p.out + n * p.K);
  }
}

}  // namespace tvk

#endif  // TVK_HAVE_AVX2
