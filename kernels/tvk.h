// ternvlm compute kernels: ternary / binary weight matmuls with a C ABI.
//
// These are the bodies of ternvlm's LiteRT custom operators. They take plain
// pointers and sizes so that any runtime (LiteRT, ctypes, tests) can call them.
//
//   y[M, N] = x[M, K] . dequant(W)[N, K]^T  * scale  (+ bias)  (clamped)
//
// Packed weights: N rows, each row packed on its own and padded at its end.
//   2bit   : 4 codes per byte, code q stored as q+1 in bits 2i..2i+1 of byte
//            k/4 (i = k%4). Row = ceil(K/4) bytes. Stored value 3 decodes to
//            q = 2 (never produced by the packer; kept to match pack.unpack).
//   1.6bit : 5 trits per byte, byte = sum_i (q_i+1) * 3^i. Row = ceil(K/5)
//            bytes. Bytes > 242 decode digit-wise like pack.unpack does.
//   1bit   : bit i of byte k/8 is 1 for +1, 0 for -1. Row = ceil(K/8) bytes.
//   int8   : one signed byte per weight (embedding / LM head). Row = K bytes.
//   int4   : q in [-8, 7] stored as q+8 in bits 4i..4i+3 of byte k/2
//            (i = k%2). Row = ceil(K/2) bytes (embedding / LM head).
//   2bit-lut: ternary, 2 bits per weight, laid out for a table-lookup kernel
//            (T-MAC / bitnet.cpp TL style). Codes pair up along K: pair
//            (k, k+1), k even, is the index (q_k + 1) + 3 (q_{k+1} + 1) in 0..8
//            (9..15 decode as two zeros). Byte j of row n holds pairs 4j (low
//            nibble) and 4j+2 (high nibble). Rows are interleaved in tiles of
//            32: byte j of row n sits at ((n / 32) * ceil(K/4) + j) * 32 + n % 32,
//            so the buffer holds ceil(N/32) * 32 rows (tvk_weight_bytes); the
//            rows past N are read, never written out. Needs TVK_ACT_INT7 in
//            tvk_matmul: a lookup adds two activations, which must fit a byte.
//
// scale is [N, scale_cols] row-major; scale_cols must divide K and the group
// size is G = K / scale_cols (scale_cols == 1: one scale per output row; a
// per-tensor scale is passed as a per-row scale repeated by the caller):
//   y[m, n] = sum_g scale[n, g] * sum_{k in group g} x[m, k] * q[n, k]
// bias ([N]) may be NULL. clip <= 0 disables clipping, otherwise y is clamped
// to [-clip, clip]. threads in [1, 64]; threads == 1 runs on the caller.
//
// Activations: TVK_ACT_F32 multiplies float x with the codes as written above;
// TVK_ACT_INT8 first quantizes each row of x to int8 with its own scale,
//   xq = rint(x * (127 / amax)), amax = max_k |x[m, k]|,
// and returns (sum_g scale[n, g] * (float) sum_{k in g} xq[k] q[n, k]) * amax / 127
// computed with exact integer sums (all-zero row: 0; inf/NaN in a row: NaN).
// That is bitnet.cpp's a8 scheme; ternvlm.export.ops computes the same in
// PyTorch so exported files match the model they come from. TVK_ACT_INT7 is
// the same with 63 in place of 127 (any format; the one 2bit-lut takes).
//
// Every function returns TVK_OK (0) or a negative TVK_ERR_* code and never
// crashes on bad sizes or NULL pointers. Calls are thread-safe; concurrent
// multi-threaded calls share one worker pool and are serialised.
#ifndef TERNVLM_KERNELS_TVK_H_
#define TERNVLM_KERNELS_TVK_H_

#include <stdint.h>

#if defined(_WIN32)
#define TVK_API __declspec(dllexport)
#else
#define TVK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum {
  TVK_OK = 0,
  TVK_ERR_NULL_POINTER = -1,
  TVK_ERR_BAD_SHAPE = -2,
  TVK_ERR_BAD_SCALE = -3,
  TVK_ERR_BAD_THREADS = -4,
  TVK_ERR_BAD_CLIP = -5,
  TVK_ERR_INTERNAL = -6,
  TVK_ERR_BAD_FORMAT = -7,
  TVK_ERR_BAD_INDEX = -8,
};

// Weight formats (also the custom-op options' format field).
enum {
  TVK_FMT_2BIT = 0,
  TVK_FMT_1P6BIT = 1,
  TVK_FMT_1BIT = 2,
  TVK_FMT_INT8 = 3,
  TVK_FMT_INT4 = 4,
  TVK_FMT_2BIT_LUT = 5,
};

enum { TVK_ACT_F32 = 0, TVK_ACT_INT8 = 1, TVK_ACT_INT7 = 2 };

// Implementation paths for tvk_force_path / tvk_active_path.
enum {
  TVK_PATH_AUTO = 0,
  TVK_PATH_SCALAR = 1,
  TVK_PATH_AVX2 = 2,
  TVK_PATH_NEON = 3,  // reserved: no NEON kernels yet, ARM runs scalar
};

TVK_API int tvk_ternary_matmul_2bit(const float* x, int64_t M, int64_t K,
                                    const uint8_t* w, int64_t N,
                                    const float* scale, int64_t scale_cols,
                                    const float* bias, float clip, float* y,
                                    int threads);
TVK_API int tvk_ternary_matmul_1p6bit(const float* x, int64_t M, int64_t K,
                                      const uint8_t* w, int64_t N,
                                      const float* scale, int64_t scale_cols,
                                      const float* bias, float clip, float* y,
                                      int threads);
TVK_API int tvk_binary_matmul_1bit(const float* x, int64_t M, int64_t K,
                                   const uint8_t* w, int64_t N,
                                   const float* scale, int64_t scale_cols,
                                   const float* bias, float clip, float* y,
                                   int threads);

// Any format and activation mode (the per-format functions above are
// tvk_matmul(TVK_FMT_..., TVK_ACT_F32, ...)).
TVK_API int tvk_matmul(int format, int act, const float* x, int64_t M, int64_t K,
                       const uint8_t* w, int64_t N, const float* scale, int64_t scale_cols,
                       const float* bias, float clip, float* y, int threads);
// Bytes of one packed row of K codes in `format`, or a negative error code.
TVK_API int64_t tvk_row_bytes(int format, int64_t K);
// Bytes of a packed N x K matrix (rows padded to whole tiles for 2bit-lut).
TVK_API int64_t tvk_weight_bytes(int format, int64_t N, int64_t K);
// Embedding lookup on packed rows: out[i, :] = q[ids[i], :] * scale[ids[i], k / G]
// for i < n_ids; TVK_ERR_BAD_INDEX if any id is outside [0, N).
TVK_API int tvk_gather(int format, const int32_t* ids, int64_t n_ids, const uint8_t* w,
                       int64_t N, int64_t K, const float* scale, int64_t scale_cols,
                       float* out);
TVK_API int tvk_unpack(int format, const uint8_t* w, int64_t N, int64_t K, const float* scale,
                       int64_t scale_cols, float* out, int threads);

// out[n, k] = q[n, k] * scale[n, k / G]  (dequantized float32 [N, K]).
// Decode attention of one token (kernels/attention.cc): qkv [(H + 2G) * D] = [q | k | v] of
// the token at position `pos`; caches [cache_len, G, D] (position-major) hold positions < pos
// (slots >= pos are ignored). Rotary embedding (rotate-half on the first rot_dim dims, cos/sin [rot_dim]) is
// applied to q and k; out [(H + 2G) * D] = [softmax(q.K^T * scale) V per head | rotary(k) | v].
TVK_API int tvk_decode_attention(const float* qkv, const float* cos, const float* sin,
                                 const float* k_cache, const float* v_cache, int64_t pos,
                                 int64_t heads, int64_t kv_heads, int64_t head_dim,
                                 int64_t rot_dim, int64_t cache_len, float scale, float* out);

TVK_API int tvk_ternary_unpack_2bit(const uint8_t* w, int64_t N, int64_t K,
                                    const float* scale, int64_t scale_cols,
                                    float* out, int threads);
TVK_API int tvk_ternary_unpack_1p6bit(const uint8_t* w, int64_t N, int64_t K,
                                      const float* scale, int64_t scale_cols,
                                      float* out, int threads);
TVK_API int tvk_binary_unpack_1bit(const uint8_t* w, int64_t N, int64_t K,
                                   const float* scale, int64_t scale_cols,
                                   float* out, int threads);

// Static, never NULL; "unknown error code" for codes not listed above.
TVK_API const char* tvk_error_string(int code);

// Process-wide switch for tests and benchmarks. Unknown values are ignored;
// forcing a path the CPU lacks falls back to scalar (see tvk_active_path).
TVK_API void tvk_force_path(int path);
// The path the next call will run: TVK_PATH_SCALAR or TVK_PATH_AVX2.
TVK_API int tvk_active_path(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TERNVLM_KERNELS_TVK_H_
