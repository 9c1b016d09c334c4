// AVX2 kernel for 2bit-lut (tvk.h) with int7 activations, after T-MAC and
// bitnet.cpp's TL kernels: no multiplies. For each pair of activations
// (x_a, x_b) a 16-byte table holds the 9 possible sums q_a x_a + q_b x_b, plus
// 128 so they are bytes in [2, 254] (|x| <= 63); vpshufb looks the packed pair
// indices of 32 interleaved rows up in it at once (two pipes on Zen 2 against
// one for vpmaddubsw, and half the instructions per weight byte of the 2bit
// kernel). The bytes of even and odd rows widen into two int16 accumulators:
// one takes the byte pairs as words (even + 256 * odd, wrapping), the other the
// odd bytes, and even = words - 256 * odd once per block. A block is at most 128
// bytes of a row (2 * 128 lookups of at most 254 = 65024: below 2^16), then it
// goes to int32. Four tiles (128 rows, four weight streams) go through the loop
// together and share each table load.
#include "internal.h"

#if TVK_HAVE_AVX2

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tvk {
namespace {

constexpr int64_t kLutBlock = 128;  // packed bytes per row between int16 -> int32 flushes

// Adds one tile's int16 block sums to its int32 sums acc[4]: even rows from the
// low and high words (unpacklo / unpackhi), then odd rows likewise.
TVK_AVX2 inline void FlushBlock(__m256i e, __m256i o, __m256i* acc) {
  e = _mm256_sub_epi16(e, _mm256_slli_epi16(o, 8));  // even rows alone
  const __m256i z = _mm256_setzero_si256();
  acc[0] = _mm256_add_epi32(acc[0], _mm256_unpacklo_epi16(e, z));
  acc[1] = _mm256_add_epi32(acc[1], _mm256_unpackhi_epi16(e, z));
  acc[2] = _mm256_add_epi32(acc[2], _mm256_unpacklo_epi16(o, z));
  acc[3] = _mm256_add_epi32(acc[3], _mm256_unpackhi_epi16(o, z));
}

// Row r of a tile in FlushBlock's acc: word w of e (row 2w) or o (row 2w + 1)
// lands in int32 lane w % 4 + 4 (w / 8) of unpacklo (w % 8 < 4) or unpackhi.
constexpr int AccIndex(int r) {
  const int w = r / 2, half = (w % 8) / 4;
  return (2 * (r % 2) + half) * 8 + w % 4 + 4 * (w / 8);
}

// One packed byte j of a tile: looks its 32 low and 32 high pair indices up in the
// tables t0, t1 and adds the sums to the block accumulators (FlushBlock).
TVK_AVX2 inline void LookUp(__m256i t0, __m256i t1, const uint8_t* src, __m256i& e, __m256i& o) {
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i l0 = _mm256_shuffle_epi8(t0, _mm256_and_si256(v, m4));
  const __m256i l1 = _mm256_shuffle_epi8(t1, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
  e = _mm256_add_epi16(e, _mm256_add_epi16(l0, l1));
  o = _mm256_add_epi16(o, _mm256_add_epi16(_mm256_srli_epi16(l0, 8), _mm256_srli_epi16(l1, 8)));
}

TVK_AVX2 inline __m256i Table(const uint8_t* tab, int64_t j, int half) {
  return _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(tab + 32 * j + 16 * half)));
}

#if defined(__GNUC__) && !defined(__clang__)
#define TVK_NO_TREE_PRE __attribute__((optimize("no-tree-pre")))
#else
#define TVK_NO_TREE_PRE
#endif

constexpr int64_t kLutAhead = 64;  // software prefetch distance, packed bytes of a row

// Row sums (with the +128 per lookup still in) of TT tiles from `tile` over the
// packed bytes [j0, j1) for one row of x (tables `tab`), in AccIndex order.
// Built without GCC's partial redundancy elimination: with it, GCC 12 keeps two
// copies of the accumulators and spills two of them to the stack at every byte j.
template <int TT>
TVK_AVX2 TVK_NO_TREE_PRE void TileSums(
    const uint8_t* w, int64_t row_bytes, int64_t tile, const uint8_t* tab, int64_t j0, int64_t j1,
    __m256i (*acc)[4]) {
  const int64_t tile_bytes = kLutTile * row_bytes;
  const uint8_t* base = w + tile * tile_bytes;
  // Software prefetch, one line per tile per two bytes j, kLutAhead bytes of a row
  // ahead; past the end of a tile it goes on in the same tile of the next group, as
  // the hardware prefetchers do not follow four streams into a new group. Computed
  // as integers: the address may lie past the buffer (a hint).
  const uintptr_t near = static_cast<uintptr_t>(kLutAhead * kLutTile);
  const uintptr_t far = near + static_cast<uintptr_t>((TT - 1) * tile_bytes);
  for (int64_t b0 = j0; b0 < j1; b0 += kLutBlock) {
    const int64_t b1 = std::min(j1, b0 + kLutBlock);
    __m256i e[TT], o[TT];
    for (int q = 0; q < TT; ++q) e[q] = o[q] = _mm256_setzero_si256();
    for (int64_t j = b0; j < b1; ++j) {
      const uint8_t* src = base + j * kLutTile;
      // A line holds bytes j and j + 1 (j even) of a tile: half the tiles fetch theirs at
      // an even j, the other half at the odd j after it.
      const int64_t odd = j & 1;
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(src) - odd * kLutTile +
                              odd * (TT / 2) * tile_bytes +
                              (j + kLutAhead < row_bytes ? near : far);
      for (int q = 0; q < (TT + 1) / 2; ++q) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + q * tile_bytes), _MM_HINT_T0);
      }
      const __m256i t0 = Table(tab, j, 0), t1 = Table(tab, j, 1);
      for (int q = 0; q < TT; ++q) LookUp(t0, t1, src + q * tile_bytes, e[q], o[q]);
    }
    for (int q = 0; q < TT; ++q) FlushBlock(e[q], o[q], acc[q]);
  }
}

// y[m, n] for the rows n of TT tiles from `tile` (rows past n1 are not written),
// from the tables `tab` of row m of x.
template <int TT>
TVK_AVX2 void LutTiles(const MatmulProblem& p, int64_t m, const uint8_t* tab, int64_t tile,
                       int64_t n1) {
  const ActQuant& a = *p.act;
  const int64_t gbytes = p.scale_cols == 1 ? p.row_bytes : p.group / 4;
  float total[TT][kLutTile] = {};
  for (int64_t g = 0; g < p.scale_cols; ++g) {
    const int64_t j0 = g * gbytes, j1 = g + 1 == p.scale_cols ? p.row_bytes : j0 + gbytes;
    alignas(32) int32_t acc[TT][4 * 8];
    __m256i* v = reinterpret_cast<__m256i*>(acc);
    for (int i = 0; i < 4 * TT; ++i) v[i] = _mm256_setzero_si256();
    TileSums<TT>(p.w, p.row_bytes, tile, tab, j0, j1, reinterpret_cast<__m256i(*)[4]>(acc));
    const int32_t offset = static_cast<int32_t>(256 * (j1 - j0));  // 2 lookups of +128 per byte
    for (int q = 0; q < TT; ++q) {
      const int64_t n0 = (tile + q) * kLutTile;
      const int rows = static_cast<int>(std::min<int64_t>(kLutTile, n1 - n0));
      for (int r = 0; r < rows; ++r) {
        const float dot = static_cast<float>(acc[q][AccIndex(r)] - offset);
        total[q][r] += p.scale[(n0 + r) * p.scale_cols + g] * dot;
      }
    }
  }
  for (int q = 0; q < TT; ++q) {
    const int64_t n0 = (tile + q) * kLutTile;
    const int rows = static_cast<int>(std::min<int64_t>(kLutTile, n1 - n0));
    for (int r = 0; r < rows; ++r) p.y[m * p.N + n0 + r] = total[q][r] * a.d[m];
  }
}

// Lookup tables of rows [m0, m0 + M) of xq into t: 16 bytes per code pair, 2 pairs
// per packed byte (32 * row_bytes per row); pairs past K are zero.
TVK_AVX2 void BuildTables(const int8_t* xq, int64_t m0, int64_t M, int64_t K, int64_t row_bytes,
                          uint8_t* t) {
  // Entry i = ca + 3 cb of a pair table: (ca - 1) x_a + (cb - 1) x_b; 9..15: 0.
  const __m256i qa = _mm256_setr_epi8(-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0,  //
                                      -1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0);
  const __m256i qb = _mm256_setr_epi8(-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0,  //
                                      -1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0);
  // From 4 activations (two pairs) in every dword: x_a and x_b of pair 0 in the
  // low lane, of pair 1 in the high lane.
  const __m256i sel_a = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  //
                                         2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m256i sel_b = _mm256_add_epi8(sel_a, _mm256_set1_epi8(1));
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  const int64_t pairs = 2 * row_bytes, stride = 16 * pairs;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* x = xq + (m0 + m) * K;
    uint8_t* tm = t + m * stride;
    for (int64_t p = 0; 2 * p < 4 * row_bytes; p += 2) {
      int8_t four[4] = {0, 0, 0, 0};  // x past K is zero
      const int64_t k = 2 * p;
      if (k + 4 <= K) {
        std::memcpy(four, x + k, 4);
      } else {
        for (int i = 0; i < 4 && k + i < K; ++i) four[i] = x[k + i];
      }
      int32_t word;
      std::memcpy(&word, four, 4);
      const __m256i v = _mm256_set1_epi32(word);
      const __m256i s = _mm256_add_epi8(_mm256_sign_epi8(_mm256_shuffle_epi8(v, sel_a), qa),
                                        _mm256_sign_epi8(_mm256_shuffle_epi8(v, sel_b), qb));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tm + 16 * p), _mm256_xor_si256(s, bias));
    }
  }
}

}  // namespace

void MatmulLutAvx2(const MatmulProblem& p, int64_t n0, int64_t n1) {
  // Rows of x go in chunks of 16 whose tables (32 * row_bytes each) stay small; within a
  // chunk, weight tiles stay in cache while every row passes over them (prefill),
  // and decode (M = 1) streams them once, four at a time. Each thread builds the
  // tables it reads (a few hundred instructions per row of x).
  constexpr int64_t kTiles = 4, kRows = 16;
  thread_local std::vector<uint8_t> tables;
  const int64_t stride = 32 * p.row_bytes;
  tables.resize(static_cast<size_t>(std::min(kRows, p.M) * stride));
  const int64_t t0 = n0 / kLutTile, t1 = (n1 + kLutTile - 1) / kLutTile;
  for (int64_t m0 = 0; m0 < p.M; m0 += kRows) {
    const int64_t mc = std::min(kRows, p.M - m0);
    BuildTables(p.act->xq, m0, mc, p.K, p.row_bytes, tables.data());
    for (int64_t t = t0; t < t1; t += kTiles) {
      const int64_t nt = std::min(kTiles, t1 - t);
      for (int64_t m = 0; m < mc; ++m) {
        const uint8_t* tab = tables.data() + m * stride;
        if (nt == kTiles) {
          LutTiles<kTiles>(p, m0 + m, tab, t, n1);
        } else {
          for (int64_t u = t; u < t + nt; ++u) LutTiles<1>(p, m0 + m, tab, u, n1);
        }
      }
    }
  }
}

}  // namespace tvk

#endif  // TVK_HAVE_AVX2
