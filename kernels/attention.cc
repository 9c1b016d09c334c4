// Decode attention: one new token against a KV cache, rotary embedding included.
//
// Why one kernel: written with builtin operators, a decoder layer's attention at decode time is
// about 30 LiteRT nodes (split, reshapes, rotary products, the scores, mask, softmax, the
// weighted sum); every node costs runtime structures and dispatch, and XNNPACK keeps its own
// copy of the cache it reads. Here it is one pass over the cache, reading it in place.
//
// Layout (tvk.h tvk_decode_attention): qkv = [q (H*D) | k (G*D) | v (G*D)] of the new token;
// out = [o (H*D) | rotary(k) (G*D) | v (G*D)], the last two being what the caller writes into
// its cache at `pos`. Query head h reads kv head h / (H / G). Caches are position-major
// [L, G, D] (export/graphs.py); slots >= pos are ignored.
#include <cmath>
#include <cstring>
#include <vector>

#include "internal.h"

#if TVK_HAVE_AVX2
#include <immintrin.h>
#endif

namespace tvk {
namespace {

// x[i] * cos[i] + rotate_half(x)[i] * sin[i] on the first `rot` dims (rotate_half(x) =
// [-x[rot/2:rot], x[:rot/2]]), the rest copied: RotaryEmbedding in models/layers.py.
void Rotary(const float* x, const float* cos, const float* sin, int64_t rot, int64_t d, float* y) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < rot; ++i) {
    const float r = i < half ? -x[i + half] : x[i - half];
    y[i] = x[i] * cos[i] + r * sin[i];
  }
  for (int64_t i = rot; i < d; ++i) y[i] = x[i];
}

float DotScalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void AxpyScalar(float w, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

#if TVK_HAVE_AVX2
TVK_AVX2 float DotAvx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  }
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  float r = _mm_cvtss_f32(s);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

TVK_AVX2 void AxpyAvx2(float w, const float* x, int64_t n, float* y) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += w * x[i];
}
#endif

}  // namespace

int DecodeAttention(const float* qkv, const float* cos, const float* sin, const float* k_cache,
                    const float* v_cache, int64_t pos, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, int64_t rot_dim, int64_t cache_len, float scale,
                    float* out, bool avx2) {
  const int64_t d = head_dim, g_count = kv_heads;
  const int64_t rep = heads / kv_heads;
  const float* q = qkv;
  const float* k = qkv + heads * d;
  const float* v = k + g_count * d;
  float* o = out;
  float* k_new = out + heads * d;
  float* v_new = k_new + g_count * d;
  for (int64_t g = 0; g < g_count; ++g) Rotary(k + g * d, cos, sin, rot_dim, d, k_new + g * d);
  std::memmove(v_new, v, static_cast<size_t>(g_count * d) * sizeof(float));
  float (*dot)(const float*, const float*, int64_t) = DotScalar;
  void (*axpy)(float, const float*, int64_t, float*) = AxpyScalar;
#if TVK_HAVE_AVX2
  if (avx2) {
    dot = DotAvx2;
    axpy = AxpyAvx2;
  }
#else
  (void)avx2;
#endif
  std::vector<float> qr(static_cast<size_t>(d)), w(static_cast<size_t>(pos + 1));
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = h / rep;
    Rotary(q + h * d, cos, sin, rot_dim, d, qr.data());
    const float* kc = k_cache + g * d;  // row j at kc + j * stride
    const float* vc = v_cache + g * d;
    const int64_t stride = g_count * d;
    float mx = -INFINITY;
    for (int64_t j = 0; j < pos; ++j) {
      w[j] = dot(qr.data(), kc + j * stride, d) * scale;
      mx = w[j] > mx ? w[j] : mx;
    }
    w[pos] = dot(qr.data(), k_new + g * d, d) * scale;
    mx = w[pos] > mx ? w[pos] : mx;
    float total = 0.0f;
    for (int64_t j = 0; j <= pos; ++j) {
      w[j] = std::exp(w[j] - mx);
      total += w[j];
    }
    const float inv = 1.0f / total;
    float* oh = o + h * d;
    std::memset(oh, 0, static_cast<size_t>(d) * sizeof(float));
    for (int64_t j = 0; j < pos; ++j) axpy(w[j] * inv, vc + j * stride, d, oh);
    axpy(w[pos] * inv, v_new + g * d, d, oh);
  }
  return TVK_OK;
}

}  // namespace tvk

extern "C" int tvk_decode_attention(const float* qkv, const float* cos, const float* sin,
                                    const float* k_cache, const float* v_cache, int64_t pos,
                                    int64_t heads, int64_t kv_heads, int64_t head_dim,
                                    int64_t rot_dim, int64_t cache_len, float scale, float* out) {
  if (qkv == nullptr || cos == nullptr || sin == nullptr || k_cache == nullptr ||
      v_cache == nullptr || out == nullptr) {
    return TVK_ERR_NULL_POINTER;
  }
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || head_dim < 1 || rot_dim < 0 ||
      rot_dim > head_dim || rot_dim % 2 != 0 || cache_len < 1 || heads > (1 << 20) ||
      head_dim > (1 << 20) || cache_len > (int64_t{1} << 31)) {
    return TVK_ERR_BAD_SHAPE;
  }
  if (pos < 0 || pos >= cache_len) return TVK_ERR_BAD_INDEX;
  if (!std::isfinite(scale)) return TVK_ERR_BAD_SCALE;
  return tvk::DecodeAttention(qkv, cos, sin, k_cache, v_cache, pos, heads, kv_heads, head_dim,
                              rot_dim, cache_len, scale, out,
                              TVK_HAVE_AVX2 && tvk_active_path() == TVK_PATH_AVX2);
}
