#include "thread_pool.h"

#include <algorithm>
#include <system_error>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define TVK_HAVE_GETPID 1
#endif

namespace tvk {

namespace {

// Spin iterations (one pause each, ~10-40 ns) before a worker sleeps: longer
// than the gap between two kernels of one decode step, short when idle.
constexpr int kSpinIterations = 1 << 12;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

ThreadPool::~ThreadPool() { StopAll(); }

void ThreadPool::StopAll() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true, std::memory_order_release);
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  stop_.store(false, std::memory_order_release);
}

void ThreadPool::Resize(int workers) {
  if (static_cast<int>(threads_.size()) == workers) return;
  StopAll();
  try {
    threads_.reserve(workers);
    for (int i = 0; i < workers; ++i) {
      threads_.emplace_back(&ThreadPool::WorkerLoop, this, i,
                            generation_.load(std::memory_order_relaxed));
    }
  } catch (...) {
    StopAll();  // leave an empty, consistent pool behind
    throw;
  }
}

void ThreadPool::WorkerLoop(int index, uint64_t seen_generation) {
  for (;;) {
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen_generation &&
           !stop_.load(std::memory_order_acquire)) {
      if (++spins < kSpinIterations) {
        CpuRelax();
        continue;
      }
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1, std::memory_order_relaxed);
      work_cv_.wait(lock, [&] {
        return stop_.load(std::memory_order_acquire) ||
               generation_.load(std::memory_order_acquire) != seen_generation;
      });
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen_generation = generation_.load(std::memory_order_acquire);
    const int task_index = index + 1;  // index 0 is the caller's
    if (task_index < n_tasks_) {
      try {
        (*task_)(task_index);
      } catch (...) {
        failed_.store(true, std::memory_order_relaxed);
      }
    }
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

bool ThreadPool::Run(int workers, int n, const std::function<void(int)>& task) {
  Resize(workers);
  task_ = &task;
  n_tasks_ = n;
  failed_.store(false, std::memory_order_relaxed);
  pending_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
  bool wake;
  {
    // Under the mutex: a worker between its last check and its wait cannot
    // miss this increment.
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
    wake = sleepers_.load(std::memory_order_relaxed) > 0;
  }
  if (wake) work_cv_.notify_all();
  bool ok = true;
  try {
    task(0);
  } catch (...) {
    ok = false;
  }
  // Wait even after a failure: workers still reference `task`.
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpinIterations) {
      CpuRelax();
    } else {
      std::this_thread::yield();  // a worker was descheduled: give it the core
    }
  }
  task_ = nullptr;
  return ok && !failed_.load(std::memory_order_relaxed);
}

namespace {

std::mutex g_pool_mu;  // one multi-threaded job at a time, process-wide
ThreadPool* g_pool = nullptr;
#if TVK_HAVE_GETPID
pid_t g_pool_pid = 0;
#endif

// The pool is leaked on purpose: joining workers from a static destructor at
// exit can deadlock, and after fork() the child has the pool object but not
// its threads, so it must start a fresh one (destroying the stale
// std::thread objects would call std::terminate).
ThreadPool& Pool() {
#if TVK_HAVE_GETPID
  if (g_pool != nullptr && g_pool_pid != getpid()) g_pool = nullptr;
  if (g_pool == nullptr) g_pool_pid = getpid();
#endif
  if (g_pool == nullptr) g_pool = new ThreadPool;
  return *g_pool;
}

}  // namespace

bool ParallelFor(int threads, int64_t n, int64_t align,
                 const std::function<void(int64_t, int64_t)>& fn) {
  try {
    align = std::max<int64_t>(align, 1);
    const int64_t units = (n + align - 1) / align;
    const int tasks = static_cast<int>(std::min<int64_t>(threads, units));
    if (tasks <= 1) {
      if (n > 0) fn(0, n);
      return true;
    }
    // Balanced contiguous chunks of whole alignment units.
    auto chunk = [&](int t) {
      const int64_t begin = std::min(n, units * t / tasks * align);
      const int64_t end = std::min(n, units * (t + 1) / tasks * align);
      if (begin < end) fn(begin, end);
    };
    std::lock_guard<std::mutex> lock(g_pool_mu);
    return Pool().Run(threads - 1, tasks, chunk);
  } catch (...) {
    return false;
  }
}

}  // namespace tvk
