// C entry points: argument checks, path selection, threading and the shared
// epilogue. The kernels themselves live in reference.cc and *_avx2.cc.
#include <algorithm>
#include <atomic>
#include <cmath>

#include "internal.h"
#include "thread_pool.h"
#include "tvk.h"

namespace tvk {
namespace {

// Sizes up to 2^31 keep every index product (M*K, N*K, M*N) inside int64.
constexpr int64_t kMaxDim = int64_t{1} << 31;
constexpr int kMaxThreads = 64;

std::atomic<int> g_forced_path{TVK_PATH_AUTO};

bool CpuHasAvx2() {
#if TVK_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

int SelectPath() {
  const int forced = g_forced_path.load(std::memory_order_relaxed);
  if (forced == TVK_PATH_SCALAR) return TVK_PATH_SCALAR;
  if (CpuHasAvx2()) return TVK_PATH_AVX2;
  return TVK_PATH_SCALAR;  // NEON hook: check __aarch64__ kernels here
}

bool BadDim(int64_t d) { return d <= 0 || d >= kMaxDim; }

int CheckCommon(const void* w, const float* scale, const float* out, int64_t N,
                int64_t K, int64_t scale_cols, int threads) {
  if (w == nullptr || scale == nullptr || out == nullptr) return TVK_ERR_NULL_POINTER;
  if (BadDim(N) || BadDim(K)) return TVK_ERR_BAD_SHAPE;
  if (scale_cols <= 0 || K % scale_cols != 0) return TVK_ERR_BAD_SCALE;
  if (threads < 1 || threads > kMaxThreads) return TVK_ERR_BAD_THREADS;
  return TVK_OK;
}

void Epilogue(const MatmulProblem& p, int64_t n0, int64_t n1) {
  const bool clip = p.clip > 0.f;
  if (p.bias == nullptr && !clip) return;
  for (int64_t m = 0; m < p.M; ++m) {
    float* row = p.y + m * p.N;
    for (int64_t n = n0; n < n1; ++n) {
      float v = row[n];
      if (p.bias != nullptr) v += p.bias[n];
      if (clip) v = std::min(std::max(v, -p.clip), p.clip);
      row[n] = v;
    }
  }
}

int RunMatmul(Format fmt, const float* x, int64_t M, int64_t K, const uint8_t* w,
              int64_t N, const float* scale, int64_t scale_cols, const float* bias,
              float clip, float* y, int threads) {
  if (x == nullptr) return TVK_ERR_NULL_POINTER;
  const int err = CheckCommon(w, scale, y, N, K, scale_cols, threads);
  if (err != TVK_OK) return err;
  if (BadDim(M)) return TVK_ERR_BAD_SHAPE;
  if (std::isnan(clip)) return TVK_ERR_BAD_CLIP;

  const int64_t cpb = CodesPerByte(fmt);
  const MatmulProblem p{fmt, x, M, K, w, N, (K + cpb - 1) / cpb, scale, scale_cols,
                        K / scale_cols, bias, clip, y};
  void (*kernel)(const MatmulProblem&, int64_t, int64_t) = MatmulScalar;
  int64_t align = 1;
#if TVK_HAVE_AVX2
  if (SelectPath() == TVK_PATH_AVX2) {
    if (fmt != Format::k1p6Bit && M <= kSmallM) {
      kernel = MatmulSmallMAvx2;
    } else {
      kernel = MatmulBlockedAvx2;
      align = kBlockRows;
    }
  }
#endif
  const bool ok = ParallelFor(threads, N, align, [&](int64_t n0, int64_t n1) {
    kernel(p, n0, n1);
    Epilogue(p, n0, n1);  // while this thread's columns are still in cache
  });
  return ok ? TVK_OK : TVK_ERR_INTERNAL;
}

int RunUnpack(Format fmt, const uint8_t* w, int64_t N, int64_t K, const float* scale,
              int64_t scale_cols, float* out, int threads) {
  const int err = CheckCommon(w, scale, out, N, K, scale_cols, threads);
  if (err != TVK_OK) return err;
  const int64_t cpb = CodesPerByte(fmt);
  const UnpackProblem p{fmt, w, N, K, (K + cpb - 1) / cpb, scale, scale_cols,
                        K / scale_cols, out};
  void (*kernel)(const UnpackProblem&, int64_t, int64_t) = UnpackScalar;
#if TVK_HAVE_AVX2
  if (SelectPath() == TVK_PATH_AVX2) kernel = UnpackAvx2;
#endif
  const bool ok =
      ParallelFor(threads, N, 1, [&](int64_t n0, int64_t n1) { kernel(p, n0, n1); });
  return ok ? TVK_OK : TVK_ERR_INTERNAL;
}

}  // namespace
}  // namespace tvk

// The C boundary: nothing may throw past it.
#define TVK_GUARD(expr) \
  try {                 \
    return expr;        \
  } catch (...) {       \
    return TVK_ERR_INTERNAL; \
  }

extern "C" {

int tvk_ternary_matmul_2bit(const float* x, int64_t M, int64_t K, const uint8_t* w,
                            int64_t N, const float* scale, int64_t scale_cols,
                            const float* bias, float clip, float* y, int threads) {
  TVK_GUARD(tvk::RunMatmul(tvk::Format::k2Bit, x, M, K, w, N, scale, scale_cols, bias,
                           clip, y, threads))
}

int tvk_ternary_matmul_1p6bit(const float* x, int64_t M, int64_t K, const uint8_t* w,
                              int64_t N, const float* scale, int64_t scale_cols,
                              const float* bias, float clip, float* y, int threads) {
  TVK_GUARD(tvk::RunMatmul(tvk::Format::k1p6Bit, x, M, K, w, N, scale, scale_cols, bias,
                           clip, y, threads))
}

int tvk_binary_matmul_1bit(const float* x, int64_t M, int64_t K, const uint8_t* w,
                           int64_t N, const float* scale, int64_t scale_cols,
                           const float* bias, float clip, float* y, int threads) {
  TVK_GUARD(tvk::RunMatmul(tvk::Format::k1Bit, x, M, K, w, N, scale, scale_cols, bias,
                           clip, y, threads))
}

int tvk_ternary_unpack_2bit(const uint8_t* w, int64_t N, int64_t K, const float* scale,
                            int64_t scale_cols, float* out, int threads) {
  TVK_GUARD(tvk::RunUnpack(tvk::Format::k2Bit, w, N, K, scale, scale_cols, out, threads))
}

int tvk_ternary_unpack_1p6bit(const uint8_t* w, int64_t N, int64_t K, const float* scale,
                              int64_t scale_cols, float* out, int threads) {
  TVK_GUARD(tvk::RunUnpack(tvk::Format::k1p6Bit, w, N, K, scale, scale_cols, out, threads))
}

int tvk_binary_unpack_1bit(const uint8_t* w, int64_t N, int64_t K, const float* scale,
                           int64_t scale_cols, float* out, int threads) {
  TVK_GUARD(tvk::RunUnpack(tvk::Format::k1Bit, w, N, K, scale, scale_cols, out, threads))
}

const char* tvk_error_string(int code) {
  switch (code) {
    case TVK_OK:
      return "ok";
    case TVK_ERR_NULL_POINTER:
      return "a required pointer is NULL";
    case TVK_ERR_BAD_SHAPE:
      return "M, K and N must be in [1, 2^31)";
    case TVK_ERR_BAD_SCALE:
      return "scale_cols must be positive and divide K";
    case TVK_ERR_BAD_THREADS:
      return "threads must be in [1, 64]";
    case TVK_ERR_BAD_CLIP:
      return "clip is NaN";
    case TVK_ERR_INTERNAL:
      return "internal error (out of memory or cannot start a thread)";
    default:
      return "unknown error code";
  }
}

void tvk_force_path(int path) {
  if (path == TVK_PATH_AUTO || path == TVK_PATH_SCALAR || path == TVK_PATH_AVX2) {
    tvk::g_forced_path.store(path, std::memory_order_relaxed);
  }
}

int tvk_active_path(void) { return tvk::SelectPath(); }

}  // extern "C"
