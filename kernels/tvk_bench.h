// Machine measurements for the benchmarks (benchmarks/bandwidth.py and the
// roofline columns of benchmarks/kernel_matvec.py). Not used by inference.
#ifndef TERNVLM_KERNELS_TVK_BENCH_H_
#define TERNVLM_KERNELS_TVK_BENCH_H_

#include <stdint.h>

#include "tvk.h"  // TVK_API and the TVK_ERR_* codes

#ifdef __cplusplus
extern "C" {
#endif

// Reads all `bytes` bytes of buf once, split into `threads` contiguous parts
// (one std::thread each, part 0 on the caller), each part read as `streams`
// interleaved sequential streams (1..64); the caller times the call.
// *checksum = sum mod 2^64 of the buffer's little-endian 64-bit words, the
// last partial word zero-padded, so the reads cannot be optimised away and
// callers can check them. buf needs no alignment. Uses AVX2 when
// tvk_active_path() says so (tvk_force_path(TVK_PATH_SCALAR) forces scalar).
// Returns TVK_OK, TVK_ERR_NULL_POINTER (buf or checksum NULL),
// TVK_ERR_BAD_SHAPE (bytes <= 0 or streams outside [1, 64]), TVK_ERR_BAD_THREADS (threads outside
// [1, 64]) or TVK_ERR_INTERNAL (a thread could not be started).
TVK_API int tvk_read_bandwidth(const void* buf, int64_t bytes, int threads, int streams,
                               int64_t* checksum);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TERNVLM_KERNELS_TVK_BENCH_H_
