// A small persistent worker pool for splitting kernels over output rows.
#ifndef TERNVLM_KERNELS_THREAD_POOL_H_
#define TERNVLM_KERNELS_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tvk {

// A job is one call of task(i) per index i, index 0 running on the caller.
// Decode calls hundreds of small kernels per token, a few microseconds each,
// so workers spin (with pause) for a short while after a job before they sleep
// on a condition variable, and the caller spins for the workers to finish: a
// hand-off costs well under a microsecond instead of a futex wake-up. Not
// re-entrant: callers serialise Run (ParallelFor does).
class ThreadPool {
 public:
  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs task(i) for i in [0, n), n <= workers + 1, after (re)starting the
  // pool with exactly `workers` threads. Returns false if a task threw. Throws
  // std::system_error if a thread cannot be started.
  bool Run(int workers, int n, const std::function<void(int)>& task);

 private:
  void Resize(int workers);
  void StopAll();
  void WorkerLoop(int index, uint64_t seen_generation);

  std::mutex mu_;  // guards sleeping; generation_ changes under it
  std::condition_variable work_cv_;
  std::vector<std::thread> threads_;
  // Written by Run before the release increment of generation_.
  const std::function<void(int)>* task_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> failed_{false};
};

// Calls fn(begin, end) on at most `threads` contiguous chunks of [0, n) whose
// boundaries are multiples of `align`. threads == 1 (or a single chunk) runs
// inline without the pool. Returns false on a thread start failure or an
// exception in fn; never throws.
bool ParallelFor(int threads, int64_t n, int64_t align,
                 const std::function<void(int64_t, int64_t)>& fn);

}  // namespace tvk

#endif  // TERNVLM_KERNELS_THREAD_POOL_H_
