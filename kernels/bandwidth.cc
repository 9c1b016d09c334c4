// tvk_read_bandwidth (tvk_bench.h): a plain streaming read of a buffer, the
// memory-bandwidth ceiling the matmul kernels are compared against. Each thread
// reads its part as `streams` interleaved sequential streams: on the AMD EPYC
// (Zen 2) VM one stream per core reads 13-14 GB/s and eight read 19-20, more
// than numpy's float32 matvec, so one stream alone is not the ceiling.
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "internal.h"
#include "tvk_bench.h"

#if TVK_HAVE_AVX2
#include <immintrin.h>
#endif

namespace tvk {
namespace {

constexpr int kMaxBenchThreads = 64;
constexpr int kMaxStreams = 64;

uint64_t SumWordsScalar(const uint8_t* p, int64_t words) {
  // Four independent sums so the loop is bound by loads, not by add latency.
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= words; i += 4) {
    uint64_t w[4];
    std::memcpy(w, p + 8 * i, sizeof(w));
    s0 += w[0];
    s1 += w[1];
    s2 += w[2];
    s3 += w[3];
  }
  for (; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, sizeof(w));
    s0 += w;
  }
  return s0 + s1 + s2 + s3;
}

constexpr int64_t kStepWords = 16;  // 128 bytes of one stream before moving to the next

#if TVK_HAVE_AVX2
// Steps [0, steps) of every stream, 128 bytes each, the streams in turn.
__attribute__((target("avx2"))) uint64_t SumStepsAvx2(const uint8_t* const* start, int streams,
                                                      int64_t steps) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < steps; ++i) {
    for (int s = 0; s < streams; ++s) {
      const uint8_t* q = start[s] + 8 * kStepWords * i;
      a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
      a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64)));
      a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 96)));
    }
  }
  const __m256i a = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

__attribute__((target("avx2"))) uint64_t SumWordsAvx2(const uint8_t* p, int64_t words) {
  const int64_t steps = words / kStepWords;
  return SumStepsAvx2(&p, 1, steps) +
         SumWordsScalar(p + 8 * kStepWords * steps, words - kStepWords * steps);
}
#endif

uint64_t SumWords(const uint8_t* p, int64_t words, bool avx2) {
#if TVK_HAVE_AVX2
  if (avx2) return SumWordsAvx2(p, words);
#else
  (void)avx2;
#endif
  return SumWordsScalar(p, words);
}


// The words split into `streams` contiguous ranges read in turn 128 bytes at a time, so the
// memory system sees that many sequential streams at once. The sum does not depend on streams.
uint64_t SumStreams(const uint8_t* p, int64_t words, int streams, bool avx2) {
  if (streams <= 1) return SumWords(p, words, avx2);
  std::vector<int64_t> begin(static_cast<size_t>(streams) + 1);
  std::vector<const uint8_t*> start(static_cast<size_t>(streams));
  for (int s = 0; s <= streams; ++s) begin[static_cast<size_t>(s)] = words * s / streams;
  for (int s = 0; s < streams; ++s) {
    start[static_cast<size_t>(s)] = p + 8 * begin[static_cast<size_t>(s)];
  }
  const int64_t steps = words / streams / kStepWords;  // whole steps every range has
  uint64_t total = 0;
#if TVK_HAVE_AVX2
  if (avx2) total = SumStepsAvx2(start.data(), streams, steps);
#endif
  if (!avx2) {
    for (int64_t i = 0; i < steps; ++i) {
      for (int s = 0; s < streams; ++s) {
        const uint8_t* q = start[static_cast<size_t>(s)] + 8 * kStepWords * i;
        for (int64_t k = 0; k < kStepWords; ++k) {
          uint64_t w;
          std::memcpy(&w, q + 8 * k, sizeof(w));
          total += w;
        }
      }
    }
  }
  for (int s = 0; s < streams; ++s) {  // what is left of each range
    const int64_t from = begin[static_cast<size_t>(s)] + steps * kStepWords;
    const int64_t left = begin[static_cast<size_t>(s) + 1] - from;
    if (left > 0) total += SumWords(p + 8 * from, left, avx2);
  }
  return total;
}

}  // namespace
}  // namespace tvk

extern "C" {

int tvk_read_bandwidth(const void* buf, int64_t bytes, int threads, int streams,
                       int64_t* checksum) {
  if (buf == nullptr || checksum == nullptr) return TVK_ERR_NULL_POINTER;
  if (bytes <= 0) return TVK_ERR_BAD_SHAPE;
  if (threads < 1 || threads > tvk::kMaxBenchThreads) return TVK_ERR_BAD_THREADS;
  if (streams < 1 || streams > tvk::kMaxStreams) return TVK_ERR_BAD_SHAPE;

  const auto* p = static_cast<const uint8_t*>(buf);
  const bool avx2 = TVK_HAVE_AVX2 && tvk_active_path() == TVK_PATH_AVX2;
  const int64_t words = bytes / 8;
  // Parts split on word boundaries, so the sum does not depend on `threads`.
  std::vector<uint64_t> sums(static_cast<size_t>(threads), 0);
  auto part = [&](int t) {
    const int64_t w0 = words * t / threads, w1 = words * (t + 1) / threads;
    sums[static_cast<size_t>(t)] = tvk::SumStreams(p + 8 * w0, w1 - w0, streams, avx2);
  };
  std::vector<std::thread> workers;
  int status = TVK_OK;
  try {
    workers.reserve(static_cast<size_t>(threads - 1));
    for (int t = 1; t < threads; ++t) workers.emplace_back(part, t);
  } catch (const std::exception&) {
    status = TVK_ERR_INTERNAL;  // still join the threads that did start
  }
  if (status == TVK_OK) part(0);
  for (std::thread& w : workers) w.join();
  if (status != TVK_OK) return status;

  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  const int64_t tail = bytes - 8 * words;
  if (tail > 0) {
    uint64_t last = 0;  // zero-padded little-endian word
    for (int64_t b = 0; b < tail; ++b) last |= uint64_t{p[8 * words + b]} << (8 * b);
    total += last;
  }
  std::memcpy(checksum, &total, sizeof(total));  // two's-complement bits of the sum
  return TVK_OK;
}

}  // extern "C"
