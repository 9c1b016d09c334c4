// C entry points: argument checks, path selection, threading and the shared
// epilogue. The kernels themselves live in reference.cc and *_avx2.cc.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

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

bool ValidFormat(int f) { return f >= 0 && f < kNumFormats; }

// Per-calling-thread scratch for quantized activations (kept between calls).
struct ActScratch {
  std::vector<int8_t> xq, xp;
  std::vector<int32_t> xsum;
  std::vector<float> d;
};

// Quantizes every row of x to [-qmax, qmax] (internal.h, ActQuant) and, when
// `permute`, lays it out for the SIMD kernels.
void QuantizeActs(Format fmt, int qmax, const float* x, int64_t M, int64_t K, int64_t scale_cols,
                  bool permute, ActScratch& s, ActQuant& a) {
  const int64_t cpb = CodesPerByte(fmt);
  a.chunk = 32 * cpb;
  a.Kp = (K + a.chunk - 1) / a.chunk * a.chunk;
  s.xq.resize(static_cast<size_t>(M * K));
  s.xsum.assign(static_cast<size_t>(M * scale_cols), 0);
  s.d.resize(static_cast<size_t>(M));
  const int64_t G = K / scale_cols;
  const bool simd = TVK_HAVE_AVX2 && SelectPath() == TVK_PATH_AVX2;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    int8_t* q = s.xq.data() + m * K;
    float amax = 0.f;
    bool finite = true;
#if TVK_HAVE_AVX2
    if (simd) {
      finite = AbsMaxAvx2(xm, K, &amax);
    } else
#endif
    {
      for (int64_t k = 0; k < K; ++k) {
        const float v = std::fabs(xm[k]);
        finite = finite && std::isfinite(v);
        amax = v > amax ? v : amax;
      }
    }
    if (!finite || amax == 0.f) {
      std::fill(q, q + K, int8_t{0});
      s.d[m] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float inv = static_cast<float>(qmax) / amax;
#if TVK_HAVE_AVX2
    if (simd) {
      QuantizeRowAvx2(xm, K, inv, q);
    } else
#endif
    {
      for (int64_t k = 0; k < K; ++k) {
        const float r = std::nearbyint(xm[k] * inv);
        q[k] = static_cast<int8_t>(static_cast<int>(std::min(127.f, std::max(-127.f, r))));
      }
    }
    int32_t* xs = s.xsum.data() + m * scale_cols;
    for (int64_t g = 0; g < scale_cols; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += q[k];
      xs[g] = sum;
    }
    s.d[m] = amax / static_cast<float>(qmax);
  }
  a.xq = s.xq.data();
  a.xsum = s.xsum.data();
  a.d = s.d.data();
  a.xp = nullptr;
  if (!permute) return;
  s.xp.assign(static_cast<size_t>(M * a.Kp), 0);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* q = s.xq.data() + m * K;
    int8_t* out = s.xp.data() + m * a.Kp;
    for (int64_t c0 = 0; c0 < K; c0 += a.chunk) {
      const int64_t n = std::min(a.chunk, K - c0);
      for (int64_t j = 0, i = 0; i < n; ++j) {  // i = cpb * j + plane
        for (int64_t plane = 0; plane < cpb && i < n; ++plane, ++i) {
          out[c0 + plane * 32 + j] = q[c0 + i];
        }
      }
    }
  }
  a.xp = s.xp.data();
}

int RunMatmul(Format fmt, int act_mode, const float* x, int64_t M, int64_t K,
              const uint8_t* w, int64_t N, const float* scale, int64_t scale_cols,
              const float* bias, float clip, float* y, int threads) {
  if (x == nullptr) return TVK_ERR_NULL_POINTER;
  const int err = CheckCommon(w, scale, y, N, K, scale_cols, threads);
  if (err != TVK_OK) return err;
  if (BadDim(M)) return TVK_ERR_BAD_SHAPE;
  if (std::isnan(clip)) return TVK_ERR_BAD_CLIP;

  MatmulProblem p{fmt,  x,    M,          K,           w,    N,    RowBytes(fmt, K),
                  scale, scale_cols, K / scale_cols, bias, clip, y};
  void (*kernel)(const MatmulProblem&, int64_t, int64_t) = MatmulScalar;
  int64_t align = 1;
  const bool avx2 = TVK_HAVE_AVX2 && SelectPath() == TVK_PATH_AVX2;
  thread_local ActScratch scratch;
  ActQuant act;
  const bool int_act = act_mode != TVK_ACT_F32;  // int8 or int7
  if (int_act) {
    const bool lut = fmt == Format::k2BitLut;
    // 2bit-lut's kernel sums whole bytes (4 codes) per scale group.
    const int64_t chunk = lut ? 4 : 32 * CodesPerByte(fmt);
    const bool simd = avx2 && (scale_cols == 1 || p.group % chunk == 0);
    // 2bit-lut reads xq as it is (its kernel builds lookup tables from it).
    QuantizeActs(fmt, act_mode == TVK_ACT_INT7 ? 63 : 127, x, M, K, scale_cols, simd && !lut,
                 scratch, act);
    p.act = &act;
    kernel = MatmulI8Scalar;
#if TVK_HAVE_AVX2
    if (simd) kernel = MatmulI8Avx2;
    if (simd && lut) align = kLutTile;
#endif
  }
#if TVK_HAVE_AVX2
  const bool float_simd = fmt == Format::k2Bit || fmt == Format::k1p6Bit || fmt == Format::k1Bit;
  if (!int_act && avx2 && float_simd) {
    if (fmt != Format::k1p6Bit && M <= kSmallM) {
      kernel = MatmulSmallMAvx2;
    } else {
      kernel = MatmulBlockedAvx2;
      align = kBlockRows;
    }
  }
#endif
  // Waking a worker costs more than a few microseconds of work: small products run here.
  constexpr int64_t kMinParallelBytes = 16 * 1024;
  const int use = M * StoredRows(fmt, N) * p.row_bytes < kMinParallelBytes ? 1 : threads;
  const bool ok = ParallelFor(use, N, align, [&](int64_t n0, int64_t n1) {
    kernel(p, n0, n1);
    Epilogue(p, n0, n1);  // while this thread's columns are still in cache
  });
  return ok ? TVK_OK : TVK_ERR_INTERNAL;
}

int RunGather(Format fmt, const int32_t* ids, int64_t n_ids, const uint8_t* w, int64_t N,
              int64_t K, const float* scale, int64_t scale_cols, float* out) {
  if (ids == nullptr) return TVK_ERR_NULL_POINTER;
  const int err = CheckCommon(w, scale, out, N, K, scale_cols, 1);
  if (err != TVK_OK) return err;
  if (BadDim(n_ids)) return TVK_ERR_BAD_SHAPE;
  for (int64_t i = 0; i < n_ids; ++i) {
    if (ids[i] < 0 || ids[i] >= N) return TVK_ERR_BAD_INDEX;
  }
  GatherScalar(fmt, w, RowBytes(fmt, K), K, scale, scale_cols, ids, n_ids, out);
  return TVK_OK;
}

int RunUnpack(Format fmt, const uint8_t* w, int64_t N, int64_t K, const float* scale,
              int64_t scale_cols, float* out, int threads) {
  const int err = CheckCommon(w, scale, out, N, K, scale_cols, threads);
  if (err != TVK_OK) return err;
  const UnpackProblem p{fmt, w, N, K, RowBytes(fmt, K), scale, scale_cols, K / scale_cols, out};
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
  TVK_GUARD(tvk::RunMatmul(tvk::Format::k2Bit, TVK_ACT_F32, x, M, K, w, N, scale, scale_cols, bias,
                           clip, y, threads))
}

int tvk_ternary_matmul_1p6bit(const float* x, int64_t M, int64_t K, const uint8_t* w,
                              int64_t N, const float* scale, int64_t scale_cols,
                              const float* bias, float clip, float* y, int threads) {
  TVK_GUARD(tvk::RunMatmul(tvk::Format::k1p6Bit, TVK_ACT_F32, x, M, K, w, N, scale, scale_cols,
                           bias, clip, y, threads))
}

int tvk_binary_matmul_1bit(const float* x, int64_t M, int64_t K, const uint8_t* w,
                           int64_t N, const float* scale, int64_t scale_cols,
                           const float* bias, float clip, float* y, int threads) {
  TVK_GUARD(tvk::RunMatmul(tvk::Format::k1Bit, TVK_ACT_F32, x, M, K, w, N, scale, scale_cols, bias,
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

int tvk_matmul(int format, int act, const float* x, int64_t M, int64_t K, const uint8_t* w,
               int64_t N, const float* scale, int64_t scale_cols, const float* bias,
               float clip, float* y, int threads) {
  if (!tvk::ValidFormat(format) || act < TVK_ACT_F32 || act > TVK_ACT_INT7) {
    return TVK_ERR_BAD_FORMAT;
  }
  if (format == TVK_FMT_2BIT_LUT && act != TVK_ACT_INT7) return TVK_ERR_BAD_FORMAT;
  TVK_GUARD(tvk::RunMatmul(static_cast<tvk::Format>(format), act, x, M, K, w,
                           N, scale, scale_cols, bias, clip, y, threads))
}

int64_t tvk_row_bytes(int format, int64_t K) {
  if (!tvk::ValidFormat(format)) return TVK_ERR_BAD_FORMAT;
  if (tvk::BadDim(K)) return TVK_ERR_BAD_SHAPE;
  return tvk::RowBytes(static_cast<tvk::Format>(format), K);
}

int64_t tvk_weight_bytes(int format, int64_t N, int64_t K) {
  if (!tvk::ValidFormat(format)) return TVK_ERR_BAD_FORMAT;
  if (tvk::BadDim(K) || tvk::BadDim(N)) return TVK_ERR_BAD_SHAPE;
  const auto f = static_cast<tvk::Format>(format);
  return tvk::StoredRows(f, N) * tvk::RowBytes(f, K);
}

int tvk_gather(int format, const int32_t* ids, int64_t n_ids, const uint8_t* w, int64_t N,
               int64_t K, const float* scale, int64_t scale_cols, float* out) {
  if (!tvk::ValidFormat(format)) return TVK_ERR_BAD_FORMAT;
  TVK_GUARD(tvk::RunGather(static_cast<tvk::Format>(format), ids, n_ids, w, N, K, scale,
                           scale_cols, out))
}

int tvk_unpack(int format, const uint8_t* w, int64_t N, int64_t K, const float* scale,
               int64_t scale_cols, float* out, int threads) {
  if (!tvk::ValidFormat(format)) return TVK_ERR_BAD_FORMAT;
  TVK_GUARD(tvk::RunUnpack(static_cast<tvk::Format>(format), w, N, K, scale, scale_cols, out,
                           threads))
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
    case TVK_ERR_BAD_FORMAT:
      return "unknown weight format or activation mode, or a pair that does not go together "
             "(2bit-lut takes int7 activations only)";
    case TVK_ERR_BAD_INDEX:
      return "an index is outside [0, N)";
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
