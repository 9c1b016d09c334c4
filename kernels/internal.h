// Shared internals of the tvk kernels: formats, problem descriptions, scalar
// code access and the per-path kernel entry points. Not part of the C ABI.
#ifndef TERNVLM_KERNELS_INTERNAL_H_
#define TERNVLM_KERNELS_INTERNAL_H_

#include <cstdint>

#include "tvk.h"

// AVX2 code is compiled per function with a target attribute, so the library
// itself stays generic x86-64 and picks the path at run time. -DTVK_NO_SIMD
// builds the portable scalar-only library (what non-x86 targets get today).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(TVK_NO_SIMD)
#define TVK_HAVE_AVX2 1
#define TVK_AVX2 __attribute__((target("avx2,fma")))
#else
#define TVK_HAVE_AVX2 0
#endif
// NEON hook: an aarch64 path would add TVK_HAVE_NEON, kernels next to the
// *_avx2.cc files and a branch in SelectPath() (api.cc). Until then ARM runs
// the scalar path.

namespace tvk {

// Values match TVK_FMT_* (tvk.h) and the custom-op options' format field.
enum class Format { k2Bit = 0, k1p6Bit = 1, k1Bit = 2, kInt8 = 3, kInt4 = 4, k2BitLut = 5 };
constexpr int kNumFormats = 6;

constexpr int CodesPerByte(Format f) {
  switch (f) {
    case Format::k2Bit:
    case Format::k2BitLut:
      return 4;
    case Format::k1p6Bit:
      return 5;
    case Format::k1Bit:
      return 8;
    case Format::kInt8:
      return 1;
    case Format::kInt4:
      return 2;
  }
  return 1;
}

constexpr int64_t RowBytes(Format f, int64_t k) {
  return (k + CodesPerByte(f) - 1) / CodesPerByte(f);
}

// 2bit-lut interleaves rows in tiles of kLutTile (tvk.h): the bytes of row n
// start at RowPtr and follow each other kLutTile bytes apart (CodeAt reads them so).
constexpr int64_t kLutTile = 32;
constexpr int64_t StoredRows(Format f, int64_t n) {
  return f == Format::k2BitLut ? (n + kLutTile - 1) / kLutTile * kLutTile : n;
}
inline const uint8_t* RowPtr(Format f, const uint8_t* w, int64_t row_bytes, int64_t n) {
  if (f == Format::k2BitLut) return w + (n / kLutTile) * kLutTile * row_bytes + n % kLutTile;
  return w + n * row_bytes;
}

// AVX2 tiling, shared by the dispatcher (thread chunks are multiples of
// kBlockRows) and the blocked kernel. kBlockK is a multiple of 4, 5 and 8 so
// K chunks start on a byte boundary in every format.
constexpr int64_t kSmallM = 4;      // M <= kSmallM: fused decode-and-FMA kernel
constexpr int64_t kBlockRows = 8;   // weight rows decoded per block
constexpr int64_t kBlockK = 640;    // K columns decoded per block

// Digits of a 1.6-bit byte: q[b][i] = (b / 3^i) % 3 - 1, also as floats padded
// to 8 so one unaligned 8-float store expands a byte. Bytes above 242 decode
// like pack.unpack does (digit-wise), so every byte value is well defined.
struct TritTable {
  int8_t q[256][5];
  alignas(32) float f[256][8];
  constexpr TritTable() : q(), f() {
    for (int b = 0; b < 256; ++b) {
      int v = b;
      for (int i = 0; i < 5; ++i) {
        q[b][i] = static_cast<int8_t>(v % 3 - 1);
        f[b][i] = static_cast<float>(v % 3 - 1);
        v /= 3;
      }
    }
  }
};
inline constexpr TritTable kTrits{};

// Code q of column k in one packed row (scalar decode, the reference).
template <Format F>
inline int CodeAt(const uint8_t* row, int64_t k) {
  if constexpr (F == Format::k2Bit) {
    return ((row[k >> 2] >> (2 * (k & 3))) & 3) - 1;  // stored 3 -> 2, as pack.unpack
  } else if constexpr (F == Format::k2BitLut) {
    const int pair = (row[(k >> 2) * kLutTile] >> (4 * ((k >> 1) & 1))) & 15;
    if (pair > 8) return 0;
    return ((k & 1) ? pair / 3 : pair % 3) - 1;
  } else if constexpr (F == Format::k1p6Bit) {
    return kTrits.q[row[k / 5]][k % 5];
  } else if constexpr (F == Format::k1Bit) {
    return ((row[k >> 3] >> (k & 7)) & 1) * 2 - 1;
  } else if constexpr (F == Format::kInt8) {
    return static_cast<int8_t>(row[k]);
  } else {
    return ((row[k >> 1] >> (4 * (k & 1))) & 15) - 8;  // int4: q + 8 per nibble, low first
  }
}

// int8 activations (tvk_matmul with TVK_ACT_INT8): each row m of x becomes
// xq = rint(x * (127 / amax)) with amax = max |x[m, :]|, and
//   y[m, n] = (sum_g scale[n, g] * (float) sum_{k in g} xq[k] * q[n, k]) * (amax / 127)
// (0 for an all-zero row, NaN for a row with inf/NaN). The integer sums are
// exact, so every path gives bit-identical results.
//
// For the SIMD kernels a row of xq is also stored permuted to match the bit
// planes of the packed weights: a chunk is 32 bytes of one weight row, i.e.
// 32 * CodesPerByte codes, and plane s of byte j holds code CodesPerByte*j + s
// of the chunk (for 1.6bit plane s is trit s of the byte), so
//   xp[c * chunk + s * 32 + j] = xq[c * chunk + CodesPerByte * j + s]
// and positions past K are 0 (the weights there may be anything).
struct ActQuant {
  const int8_t* xq = nullptr;    // [M, K] row-major (reference path)
  const int8_t* xp = nullptr;    // [M, Kp] permuted (SIMD path) or nullptr
  const int32_t* xsum = nullptr; // [M, scale_cols]: sum of xq per scale group
  const float* d = nullptr;      // [M]: amax / 127 (0 or NaN, see above)
  int64_t Kp = 0;                // K rounded up to whole chunks
  int64_t chunk = 0;             // codes per chunk
};

struct MatmulProblem {
  Format fmt;
  const float* x;  // [M, K]
  int64_t M, K;
  const uint8_t* w;  // [N, row_bytes]
  int64_t N, row_bytes;
  const float* scale;  // [N, scale_cols]
  int64_t scale_cols, group;  // group = K / scale_cols
  const float* bias;  // [N] or nullptr
  float clip;         // <= 0: none
  float* y;           // [M, N]
  const ActQuant* act = nullptr;  // int8 activations, else nullptr (float)
};

struct UnpackProblem {
  Format fmt;
  const uint8_t* w;
  int64_t N, K, row_bytes;
  const float* scale;
  int64_t scale_cols, group;
  float* out;  // [N, K]
};

// Kernels fill output rows n in [n0, n1) (columns of y for the matmuls). The
// matmul kernels write the raw product; bias and clip are applied by the
// dispatcher so every path shares one epilogue.
void MatmulScalar(const MatmulProblem& p, int64_t n0, int64_t n1);
// p.act set: the int8-activation product from p.act->xq (reference).
void MatmulI8Scalar(const MatmulProblem& p, int64_t n0, int64_t n1);
// Dequantized rows ids[i] of W into out[i, :] (ids already range-checked).
void GatherScalar(Format fmt, const uint8_t* w, int64_t row_bytes, int64_t K,
                  const float* scale, int64_t scale_cols, const int32_t* ids, int64_t n_ids,
                  float* out);
void UnpackScalar(const UnpackProblem& p, int64_t n0, int64_t n1);

#if TVK_HAVE_AVX2
// 2bit / 1bit only: decodes codes in registers and FMAs them with up to
// kSmallM rows of x at once (batch-1 decode is a memory-bound matvec).
void MatmulSmallMAvx2(const MatmulProblem& p, int64_t n0, int64_t n1);
// Any format, any M: decodes kBlockRows x kBlockK tiles of W to floats once
// and reuses them across all rows of x. n0 must be a multiple of kBlockRows.
void MatmulBlockedAvx2(const MatmulProblem& p, int64_t n0, int64_t n1);
void UnpackAvx2(const UnpackProblem& p, int64_t n0, int64_t n1);
// Row helpers for QuantizeActs (same results as the scalar loops, bit for bit):
// max |x| (false if any value is inf or NaN) and q = clamp(rint(x * inv), +-127).
bool AbsMaxAvx2(const float* x, int64_t K, float* amax);
void QuantizeRowAvx2(const float* x, int64_t K, float inv, int8_t* q);
// int8 activations from p.act->xp, every format; scale groups must be whole
// chunks (scale_cols == 1 or group % chunk == 0).
void MatmulI8Avx2(const MatmulProblem& p, int64_t n0, int64_t n1);
// 2bit-lut with int7 activations from p.act->xq (lut_avx2.cc). n0 must be a
// multiple of kLutTile; scale groups must be whole bytes (group % 4 == 0).
void MatmulLutAvx2(const MatmulProblem& p, int64_t n0, int64_t n1);
// out[k - k0] = q[k] * srow[k / group] for k in [k0, k1); k0 must be a
// multiple of CodesPerByte(fmt) for 1.6bit. Writes nothing outside the range.
void DecodeRowAvx2(Format fmt, const uint8_t* row, const float* srow,
                   int64_t group, int64_t k0, int64_t k1, float* out);
#endif

}  // namespace tvk

#endif  // TERNVLM_KERNELS_INTERNAL_H_
