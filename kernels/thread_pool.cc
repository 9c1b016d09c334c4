#include "thread_pool.h"

#include <algorithm>
#include <system_error>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define TVK_HAVE_GETPID 1
#endif

namespace tvk {

ThreadPool::~ThreadPool() { StopAll(); }

void ThreadPool::StopAll() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  stop_ = false;
}

void ThreadPool::Resize(int workers) {
  if (static_cast<int>(threads_.size()) == workers) return;
  StopAll();
  try {
    threads_.reserve(workers);
    for (int i = 0; i < workers; ++i) {
      threads_.emplace_back(&ThreadPool::WorkerLoop, this, i, generation_);
    }
  } catch (...) {
    StopAll();  // leave an empty, consistent pool behind
    throw;
  }
}

void ThreadPool::WorkerLoop(int index, uint64_t seen_generation) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_cv_.wait(lock, [&] { return stop_ || generation_ != seen_generation; });
    if (stop_) return;
    seen_generation = generation_;
    const std::function<void(int)>* task = task_;
    const int task_index = index + 1;  // index 0 is the caller's
    bool ok = true;
    if (task_index < n_tasks_) {
      lock.unlock();
      try {
        (*task)(task_index);
      } catch (...) {
        ok = false;
      }
      lock.lock();
    }
    if (!ok) failed_ = true;
    if (--pending_ == 0) done_cv_.notify_one();
  }
}

bool ThreadPool::Run(int workers, int n, const std::function<void(int)>& task) {
  Resize(workers);
  {
    std::lock_guard<std::mutex> lock(mu_);
    task_ = &task;
    n_tasks_ = n;
    pending_ = static_cast<int>(threads_.size());  // every worker acknowledges
    failed_ = false;
    ++generation_;
  }
  work_cv_.notify_all();
  bool ok = true;
  try {
    task(0);
  } catch (...) {
    ok = false;
  }
  // Wait even after a failure: workers still reference `task`.
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  task_ = nullptr;
  return ok && !failed_;
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
