// AVX2 kernel for int8 activations (bitnet.cpp / llama.cpp style): weights
// stream once as packed bytes, each 32-byte chunk splits into bit planes with a
// shift and a mask (no table), and vpmaddubsw multiplies the unsigned plane
// codes with the matching int8 activations (permuted once per call so plane s
// lines up with xp, see internal.h). Unsigned codes carry an offset removed
// per scale group with the precomputed sum of the activations:
//   2bit : q = c - 1         -> sum q x = sum c x - sum x
//   1bit : q = 2c - 1        -> 2 sum c x - sum x
//   int4 : q = c - 8         -> sum c x - 8 sum x
//   int8 : signed; |w| * sign(x, w) (vpsignb) keeps vpmaddubsw's operands legal.
//   1.6bit: q = d - 1 per trit -> sum d x - sum x
// int16 partial sums cannot saturate: per chunk at most 4 planes * 2 * 3 * 127
// (2bit), 5 * 2 * 2 * 127 (1.6bit), 8 * 2 * 127 (1bit), 2 * 2 * 15 * 127 (int4),
// 2 * 128 * 127 (int8).
#include "internal.h"

#if TVK_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace tvk {
namespace {

template <Format F>
struct Planes;

template <>
struct Planes<Format::k2Bit> {
  static constexpr int kOffsetMul = 1, kScaleMul = 1;
  // sum over the 4 planes of c * x for one chunk, as int16 pairs.
  TVK_AVX2 static inline __m256i Dot(__m256i v, const int8_t* x) {
    const __m256i m = _mm256_set1_epi8(3);
    const __m256i p0 = _mm256_and_si256(v, m);
    const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m);
    const __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    const __m256i p3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), m);
    const __m256i a = _mm256_add_epi16(
        _mm256_maddubs_epi16(p0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
        _mm256_maddubs_epi16(p1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
    const __m256i b = _mm256_add_epi16(
        _mm256_maddubs_epi16(p2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64))),
        _mm256_maddubs_epi16(p3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96))));
    return _mm256_add_epi16(a, b);
  }
};

template <>
struct Planes<Format::k1Bit> {
  static constexpr int kOffsetMul = 1, kScaleMul = 2;
  TVK_AVX2 static inline __m256i Dot(__m256i v, const int8_t* x) {
    const __m256i m = _mm256_set1_epi8(1);
    __m256i acc = _mm256_maddubs_epi16(_mm256_and_si256(v, m),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    for (int s = 1; s < 8; ++s) {
      const __m256i p = _mm256_and_si256(_mm256_srli_epi16(v, s), m);
      acc = _mm256_add_epi16(
          acc, _mm256_maddubs_epi16(
                   p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * s))));
    }
    return acc;
  }
};

// 1.6-bit: byte b = sum_i d_i 3^i (5 trits, q = d - 1), decoded without multiplies. With
// b = 16 h + l, b mod m = (16 h mod m + l mod m) mod m: two nibble lookups (vpshufb), an add,
// and one conditional subtract (min_epu8(s, s - m): s - m wraps above s when s < m). Digit i
// is (b mod 3^(i+1) - b mod 3^i) / 3^i, whose values {0, 3^i, 2 * 3^i} have distinct low nibbles,
// so one more vpshufb turns it into 0, 1, 2. The top digit looks at (b - b mod 81) / 2 rounded
// up (vpavgb), which also sends bytes 243-255 to digits of b mod 243, like kTrits.
// About 40 ops per 32 bytes (160 codes) against 15 for 2-bit's 128.
template <>
struct Planes<Format::k1p6Bit> {
  static constexpr int kOffsetMul = 1, kScaleMul = 1;
  TVK_AVX2 static inline __m256i Table(const int8_t (&t)[16]) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
  }
  TVK_AVX2 static inline __m256i Plane(const int8_t* x, int s) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * s));
  }
  // (a + b) mod m for a, b < m.
  TVK_AVX2 static inline __m256i AddMod(__m256i a, __m256i b, int m) {
    const __m256i s = _mm256_add_epi8(a, b);
    return _mm256_min_epu8(s, _mm256_sub_epi8(s, _mm256_set1_epi8(static_cast<char>(m))));
  }
  TVK_AVX2 static inline __m256i Dot(__m256i v, const int8_t* x) {
    // 16 h mod m for h = 0..15, and l mod m for the moduli below 16.
    static constexpr int8_t kH3[16] = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0};
    static constexpr int8_t kH9[16] = {0, 7, 5, 3, 1, 8, 6, 4, 2, 0, 7, 5, 3, 1, 8, 6};
    static constexpr int8_t kH27[16] = {0, 16, 5, 21, 10, 26, 15, 4, 20, 9, 25, 14, 3, 19, 8, 24};
    static constexpr int8_t kH81[16] = {0,  16, 32, 48, 64, 80, 15, 31,
                                        47, 63, 79, 14, 30, 46, 62, 78};
    static constexpr int8_t kL3[16] = {0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0};
    static constexpr int8_t kL9[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6};
    // Digit from the low nibble of its difference (see above); -1 entries are never used.
    static constexpr int8_t kD1[16] = {0, -1, -1, 1, -1, -1, 2, -1, -1, -1, -1, -1, -1, -1, -1, -1};
    static constexpr int8_t kD2[16] = {0, -1, 2, -1, -1, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1};
    static constexpr int8_t kD3[16] = {0, -1, -1, -1, -1, -1, 2, -1, -1, -1, -1, 1, -1, -1, -1, -1};
    static constexpr int8_t kD4[16] = {0, 2, -1, -1, -1, -1, -1, -1, -1, 1, 0, -1, -1, -1, -1, -1};
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i l = _mm256_and_si256(v, m15);
    const __m256i h = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    const __m256i r3 =
        AddMod(_mm256_shuffle_epi8(Table(kH3), h), _mm256_shuffle_epi8(Table(kL3), l), 3);
    const __m256i r9 =
        AddMod(_mm256_shuffle_epi8(Table(kH9), h), _mm256_shuffle_epi8(Table(kL9), l), 9);
    const __m256i r27 = AddMod(_mm256_shuffle_epi8(Table(kH27), h), l, 27);
    const __m256i r81 = AddMod(_mm256_shuffle_epi8(Table(kH81), h), l, 81);
    const __m256i d1 = _mm256_shuffle_epi8(Table(kD1), _mm256_sub_epi8(r9, r3));
    const __m256i d2 = _mm256_shuffle_epi8(Table(kD2), _mm256_sub_epi8(r27, r9));
    const __m256i d3 = _mm256_shuffle_epi8(Table(kD3), _mm256_sub_epi8(r81, r27));
    const __m256i top = _mm256_avg_epu8(_mm256_sub_epi8(v, r81), _mm256_setzero_si256());
    const __m256i d4 = _mm256_shuffle_epi8(Table(kD4), top);
    const __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(r3, Plane(x, 0)),
                                       _mm256_maddubs_epi16(d1, Plane(x, 1)));
    const __m256i b = _mm256_add_epi16(_mm256_maddubs_epi16(d2, Plane(x, 2)),
                                       _mm256_maddubs_epi16(d3, Plane(x, 3)));
    return _mm256_add_epi16(_mm256_add_epi16(a, b), _mm256_maddubs_epi16(d4, Plane(x, 4)));
  }
};

template <>
struct Planes<Format::kInt4> {
  static constexpr int kOffsetMul = 8, kScaleMul = 1;
  TVK_AVX2 static inline __m256i Dot(__m256i v, const int8_t* x) {
    const __m256i m = _mm256_set1_epi8(15);
    const __m256i p0 = _mm256_and_si256(v, m);
    const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    return _mm256_add_epi16(
        _mm256_maddubs_epi16(p0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
        _mm256_maddubs_epi16(p1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
  }
};

template <>
struct Planes<Format::kInt8> {
  static constexpr int kOffsetMul = 0, kScaleMul = 1;
  TVK_AVX2 static inline __m256i Dot(__m256i v, const int8_t* x) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(xv, v));
  }
};

TVK_AVX2 inline int32_t HorizontalSumI32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Chunks whose int16 sums can be added before widening (no saturation).
template <Format F>
constexpr int kI16Chunks = F == Format::k2Bit    ? 8
                           : F == Format::k1p6Bit ? 12
                           : F == Format::k1Bit   ? 16
                           : F == Format::kInt4   ? 4
                                                  : 1;

// kSafe: the chunk may end past `wend` (last rows of the buffer); copies the
// bytes that exist. Kept out of the hot loops: a call there would spill every
// accumulator register.
template <bool kSafe>
TVK_AVX2 inline __m256i LoadChunk(const uint8_t* src, const uint8_t* wend) {
  if (!kSafe || src + 32 <= wend) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  }
  alignas(32) uint8_t tmp[32] = {};
  std::memcpy(tmp, src, static_cast<size_t>(wend - src));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}

// y[m, n] for MB rows of x (from m0) and R weight rows (from n), which share
// every activation load and give independent accumulation chains. A row's last
// chunk may read into the next row (those codes meet zero activations) but
// never past `wend`, the end of the weight buffer.
template <Format F, int MB, int R, bool kSafe>
TVK_AVX2 void DotRowsI8(const MatmulProblem& p, int64_t m0, int64_t n, int64_t nchunks,
                        int64_t group_chunks, const uint8_t* wend) {
  using P = Planes<F>;
  const ActQuant& a = *p.act;
  const __m256i ones = _mm256_set1_epi16(1);
  float total[R][MB] = {};
  int64_t c = 0;
  for (int64_t g = 0; g < p.scale_cols; ++g) {
    const int64_t cend = g + 1 == p.scale_cols ? nchunks : c + group_chunks;
    __m256i acc[R][MB];
    for (int r = 0; r < R; ++r) {
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
    }
    while (c < cend) {
      const int64_t cstop = std::min<int64_t>(cend, c + kI16Chunks<F>);
      __m256i acc16[R][MB];
      for (int r = 0; r < R; ++r) {
        for (int m = 0; m < MB; ++m) acc16[r][m] = _mm256_setzero_si256();
      }
      for (; c < cstop; ++c) {
        for (int r = 0; r < R; ++r) {
          const uint8_t* wr = p.w + (n + r) * p.row_bytes + 32 * c;
          // Decode (one activation row, 4 weight rows) streams each weight byte once: ask for
          // the rows two groups ahead. The hardware prefetchers of the Xeon keep up without it;
          // on the AMD EPYC VM beyond-LLC matvecs went from 2.5-5 to 7-9 GB/s (9.5 measured).
          if (MB == 1 && R == 4) {
            _mm_prefetch(reinterpret_cast<const char*>(wr + 8 * p.row_bytes), _MM_HINT_T0);
          }
          const __m256i v = LoadChunk<kSafe>(wr, wend);
          for (int m = 0; m < MB; ++m) {
            const int8_t* x = a.xp + (m0 + m) * a.Kp + c * a.chunk;
            acc16[r][m] = _mm256_add_epi16(acc16[r][m], P::Dot(v, x));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int m = 0; m < MB; ++m) {
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(acc16[r][m], ones));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = p.scale[(n + r) * p.scale_cols + g];
      for (int m = 0; m < MB; ++m) {
        int32_t dot = HorizontalSumI32(acc[r][m]) * P::kScaleMul;
        if (P::kOffsetMul != 0) dot -= P::kOffsetMul * a.xsum[(m0 + m) * p.scale_cols + g];
        total[r][m] += s * static_cast<float>(dot);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) p.y[(m0 + m) * p.N + n + r] = total[r][m] * a.d[m0 + m];
  }
}

template <Format F>
void MatmulI8T(const MatmulProblem& p, int64_t n0, int64_t n1) {
  using DotFn = void (*)(const MatmulProblem&, int64_t, int64_t, int64_t, int64_t,
                         const uint8_t*);
  static constexpr DotFn kDot[2][4] = {
      {DotRowsI8<F, 1, 1, false>, DotRowsI8<F, 2, 1, false>, DotRowsI8<F, 3, 1, false>,
       DotRowsI8<F, 4, 1, false>},
      {DotRowsI8<F, 1, 1, true>, DotRowsI8<F, 2, 1, true>, DotRowsI8<F, 3, 1, true>,
       DotRowsI8<F, 4, 1, true>}};
  const ActQuant& a = *p.act;
  const int64_t nchunks = a.Kp / a.chunk;
  const int64_t group_chunks = p.scale_cols == 1 ? nchunks : p.group / a.chunk;
  const uint8_t* wend = p.w + p.N * p.row_bytes;
  // Rows from `safe_end` on would read past the buffer with whole chunks.
  const int64_t over = std::max<int64_t>(0, 32 * nchunks - p.row_bytes);
  const int64_t safe_end =
      std::max<int64_t>(0, p.N - (over + p.row_bytes - 1) / std::max<int64_t>(p.row_bytes, 1));
  auto safe = [&](int64_t n) { return n >= safe_end ? 1 : 0; };
  if (p.M == 1) {  // decode: 4 weight rows at a time share the activation loads
    int64_t n = n0;
    for (; n + 4 <= std::min(n1, safe_end); n += 4) {
      DotRowsI8<F, 1, 4, false>(p, 0, n, nchunks, group_chunks, wend);
    }
    for (; n < n1; ++n) kDot[safe(n)][0](p, 0, n, nchunks, group_chunks, wend);
    return;
  }
  // Blocks of weight rows small enough to stay in L1 while every 4 rows of x
  // pass over them: batch-M calls load each weight byte from memory once.
  const int64_t block = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.row_bytes, 1));
  for (int64_t nb = n0; nb < n1; nb += block) {
    const int64_t ne = std::min(n1, nb + block);
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      const int mb = static_cast<int>(std::min<int64_t>(4, p.M - m0));
      for (int64_t n = nb; n < ne; ++n) {
        kDot[safe(n)][mb - 1](p, m0, n, nchunks, group_chunks, wend);
      }
    }
  }
}

}  // namespace

void MatmulI8Avx2(const MatmulProblem& p, int64_t n0, int64_t n1) {
  switch (p.fmt) {
    case Format::k2Bit:
      return MatmulI8T<Format::k2Bit>(p, n0, n1);
    case Format::k1Bit:
      return MatmulI8T<Format::k1Bit>(p, n0, n1);
    case Format::kInt8:
      return MatmulI8T<Format::kInt8>(p, n0, n1);
    case Format::kInt4:
      return MatmulI8T<Format::kInt4>(p, n0, n1);
    case Format::k1p6Bit:
      return MatmulI8T<Format::k1p6Bit>(p, n0, n1);
    case Format::k2BitLut:
      return MatmulLutAvx2(p, n0, n1);
  }
}

TVK_AVX2 bool AbsMaxAvx2(const float* x, int64_t K, float* amax) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
    mx = _mm256_max_ps(mx, a);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, mx);
  float m = 0.f;
  for (float v : lanes) m = v > m ? v : m;
  bool finite = _mm256_movemask_ps(bad) == 0;
  for (; k < K; ++k) {
    const float v = std::fabs(x[k]);
    finite = finite && std::isfinite(v);
    m = v > m ? v : m;
  }
  *amax = m;
  return finite;
}

namespace {
// clamp(rint(x * s), +-127) of 8 floats as int32 (rint: the default rounding, like nearbyint).
TVK_AVX2 inline __m256i Round8(const float* x, __m256 s) {
  const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), s),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(
      _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-127.f), r)));
}
}  // namespace

TVK_AVX2 void QuantizeRowAvx2(const float* x, int64_t K, float inv, int8_t* q) {
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i a = _mm256_packs_epi32(Round8(x + k, s), Round8(x + k + 8, s));
    const __m256i b = _mm256_packs_epi32(Round8(x + k + 16, s), Round8(x + k + 24, s));
    const __m256i v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), v);
  }
  for (; k < K; ++k) {
    const float r = std::nearbyint(x[k] * inv);
    q[k] = static_cast<int8_t>(static_cast<int>(std::min(127.f, std::max(-127.f, r))));
  }
}

}  // namespace tvk

#endif  // TVK_HAVE_AVX2
