// AVX2 decoding of the bit-packed formats (2bit, 1bit), shared by the fused
// small-M kernel and the row decoder. Include only where TVK_HAVE_AVX2.
//
// Trick: broadcast a little-endian dword of codes to all 8 lanes and shift
// lane i right so that its code sits in the low bits. vpermps only reads the
// low 3 bits of each index, so an 8-entry table indexed by them turns the
// lane straight into scale * q; the bits of the next codes above the code
// are ignored by repeating the table. Two uops per 8 weights, no branches.
#ifndef TERNVLM_KERNELS_AVX2_CODES_H_
#define TERNVLM_KERNELS_AVX2_CODES_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "internal.h"

namespace tvk {

template <Format F>
struct BitCodes;

template <>
struct BitCodes<Format::k2Bit> {
  static constexpr int kBits = 2;
  // Index bits: (low bit of next code, code). Stored 3 decodes to 2 like
  // the scalar path.
  TVK_AVX2 static inline __m256 Table(float s) {
    return _mm256_setr_ps(-s, 0.f, s, 2.f * s, -s, 0.f, s, 2.f * s);
  }
};

template <>
struct BitCodes<Format::k1Bit> {
  static constexpr int kBits = 1;
  // Index bits: (next two codes, code): only bit 0 matters.
  TVK_AVX2 static inline __m256 Table(float s) {
    return _mm256_setr_ps(-s, s, -s, s, -s, s, -s, s);
  }
};

template <Format F>
struct BitLayout {
  static constexpr int kBits = BitCodes<F>::kBits;
  static constexpr int kPerByte = 8 / kBits;
  static constexpr int kPerDword = 32 / kBits;  // 16 or 32 codes
  static constexpr int kVecs = kPerDword / 8;   // 8-lane vectors per dword
};

// Shift counts that move code 8*v + i of a dword to the bottom of lane i.
template <Format F>
TVK_AVX2 inline __m256i LaneShifts(int v) {
  constexpr int b = BitCodes<F>::kBits;
  const int base = 8 * v * b;
  return _mm256_setr_epi32(base, base + b, base + 2 * b, base + 3 * b, base + 4 * b,
                           base + 5 * b, base + 6 * b, base + 7 * b);
}

// `bytes` (1..4) little-endian bytes broadcast to every lane.
TVK_AVX2 inline __m256i BroadcastCodes(const uint8_t* p, int bytes) {
  uint32_t v = 0;
  std::memcpy(&v, p, bytes);
  return _mm256_set1_epi32(static_cast<int>(v));
}

TVK_AVX2 inline __m256i BroadcastDword(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(static_cast<int>(v));
}

TVK_AVX2 inline __m256 Expand8(__m256i codes, __m256i shift, __m256 table) {
  return _mm256_permutevar8x32_ps(table, _mm256_srlv_epi32(codes, shift));
}

TVK_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace tvk

#endif  // TERNVLM_KERNELS_AVX2_CODES_H_
