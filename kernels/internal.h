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

enum class Format { k2Bit, k1p6Bit, k1Bit };

constexpr int CodesPerByte(Format f) {
  return f == Format::k2Bit ? 4 : (f == Format::k1p6Bit ? 5 : 8);
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
  } else if constexpr (F == Format::k1p6Bit) {
    return kTrits.q[row[k / 5]][k % 5];
  } else {
    return ((row[k >> 3] >> (k & 7)) & 1) * 2 - 1;
  }
}

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
void UnpackScalar(const UnpackProblem& p, int64_t n0, int64_t n1);

#if TVK_HAVE_AVX2
// 2bit / 1bit only: decodes codes in registers and FMAs them with up to
// kSmallM rows of x at once (batch-1 decode is a memory-bound matvec).
void MatmulSmallMAvx2(const MatmulProblem& p, int64_t n0, int64_t n1);
// Any format, any M: decodes kBlockRows x kBlockK tiles of W to floats once
// and reuses them across all rows of x. n0 must be a multiple of kBlockRows.
void MatmulBlockedAvx2(const MatmulProblem& p, int64_t n0, int64_t n1);
void UnpackAvx2(const UnpackProblem& p, int64_t n0, int64_t n1);
// out[k - k0] = q[k] * srow[k / group] for k in [k0, k1); k0 must be a
// multiple of CodesPerByte(fmt) for 1.6bit. Writes nothing outside the range.
void DecodeRowAvx2(Format fmt, const uint8_t* row, const float* srow,
                   int64_t group, int64_t k0, int64_t k1, float* out);
#endif

}  // namespace tvk

#endif  // TERNVLM_KERNELS_INTERNAL_H_
