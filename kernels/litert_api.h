// ternvlm's LiteRT driver: runs a .tflite with our custom operators
// (TernaryMatMul, TernaryMatMul158, BinaryMatMul, TernaryUnpack; see
// litert_ops.h) on the LiteRT C API of the ai-edge-litert wheel.
//
// libLiteRt.so is not linked: tvr_open dlopen()s the path it is given and
// resolves every function it needs (a missing one is an error naming it).
// The library stays loaded for the life of the process.
//
//   tvr_model* m = tvr_open(lib, "model.tflite", threads, err, sizeof err);
//   for each signature s, tensor i: tvr_tensor_info(...), then tvr_bind() a
//       64-byte aligned host buffer of at least `buffer_bytes` bytes
//   fill inputs; tvr_run(m, s); read outputs; ...; tvr_close(m);
//
// Signature inputs and outputs are listed in the model's graph order (not
// alphabetically): callers bind them by name. Bound memory belongs to the
// caller and must stay valid until it is re-bound or the model is closed.
// Functions returning int give 0 on success and -1 on error, with a one-line
// message in tvr_last_error(). LiteRT's own diagnostics go to stderr; when a
// run or the compilation fails, the driver captures them into the message.
// A model is not thread-safe: one call at a time.
#ifndef TERNVLM_KERNELS_LITERT_API_H_
#define TERNVLM_KERNELS_LITERT_API_H_

#include <stddef.h>
#include <stdint.h>

#include "tvk.h"  // TVK_API

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tvr_model tvr_model;

// Opens `model_path` with the LiteRT library at `litert_path`; threads in
// [1, 64] (the runtime's CPU threads and our kernels' threads). NULL on error,
// with the reason in err (err_size bytes, NUL-terminated).
TVK_API tvr_model* tvr_open(const char* litert_path, const char* model_path, int threads,
                            char* err, size_t err_size);
// Releases everything (NULL is fine). Bound caller memory is not freed.
TVK_API void tvr_close(tvr_model* model);
// The last error of this model ("" if none). Valid until the next call.
TVK_API const char* tvr_last_error(const tvr_model* model);

TVK_API int tvr_num_signatures(const tvr_model* model);
TVK_API const char* tvr_signature_name(const tvr_model* model, int signature);
// Number of inputs (is_output = 0) or outputs (1) of a signature; -1 on error.
TVK_API int tvr_num_tensors(const tvr_model* model, int signature, int is_output);
// A signature tensor: name, element type (LiteRtElementType: 1 float32,
// 2 int32, 3 uint8, 4 int64, 6 bool, 7 int16, 9 int8, 10 float16, ...),
// rank, dims[0..rank) (room for 8), nbytes (the packed tensor) and
// buffer_bytes (what a bound buffer must hold, >= nbytes).
TVK_API int tvr_tensor_info(const tvr_model* model, int signature, int is_output, int index,
                            const char** name, int* dtype, int* rank, int64_t* dims,
                            size_t* nbytes, size_t* buffer_bytes);
// Uses `data` (64-byte aligned, `size` >= buffer_bytes) for a tensor from now on.
TVK_API int tvr_bind(tvr_model* model, int signature, int is_output, int index, void* data,
                     size_t size);
// Runs a signature on the bound buffers.
TVK_API int tvr_run(tvr_model* model, int signature);
// Number of ternvlm custom-op nodes in the model (all signatures).
TVK_API int tvr_num_custom_ops(const tvr_model* model);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TERNVLM_KERNELS_LITERT_API_H_
