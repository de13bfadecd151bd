#include "thread_pool.h"

#include <algorithm>

#include <string>
#include <system_error>

#include "runtime/error.h"
#include "runtime/numa.h"

namespace moe_sft {

ThreadPool::ThreadPool(int threads) : ranges_(new Range[std::max(threads, 1)]) {
  workers_.reserve(size_t(std::max(threads, 1)));
  try {
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w, threads] { worker_loop(w, threads); });
  } catch (const std::system_error& e) {  // e.g. EAGAIN under a pids or RLIMIT_NPROC limit
    stop_and_join();
    throw Error(MOE_SFT_ERR_UNSUPPORTED, "cannot start " + std::to_string(threads) + " worker threads (" +
                                             e.what() + "): lower num_threads");
  }
}

ThreadPool::~ThreadPool() { stop_and_join(); }

void ThreadPool::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

bool ThreadPool::claim(int worker, int64_t* task) {
  // Own range first, then the other workers' ranges in ring order. fetch_add hands every index out once.
  for (int i = 0; i < active_; ++i) {
    Range& r = ranges_[(worker + i) % active_];
    if (r.next.load(std::memory_order_relaxed) >= r.end) continue;
    int64_t t = r.next.fetch_add(1, std::memory_order_relaxed);
    if (t < r.end) {
      *task = t;
      return true;
    }
  }
  return false;
}

void ThreadPool::run_tasks(int worker) {
  int64_t task;
  while (claim(worker, &task)) {
    try {
      (*body_)(task, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker_loop(int worker, int threads) {
  // On several NUMA nodes, workers are spread over them in order (the first ones on node 0, ...), so the
  // contiguous task ranges of parallel_for, ordered part by part, land on the node that holds that part.
  pin_thread_to_numa_node(worker * numa_topology().nodes() / threads);
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    if (worker < active_) run_tasks(worker);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, int workers, const Body& body) {
  if (n <= 0) return;
  int active = int(std::min<int64_t>({int64_t(std::max(workers, 1)), int64_t(size()), n}));
  if (active == 1) {
    for (int64_t t = 0; t < n; ++t) body(t, 0);
    return;
  }
  body_ = &body;
  active_ = active;
  error_ = nullptr;
  for (int w = 0; w < active; ++w) {
    ranges_[w].next.store(n * w / active, std::memory_order_relaxed);
    ranges_[w].end = n * (w + 1) / active;
  }
  pending_.store(int(workers_.size()), std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++generation_;
  }
  wake_.notify_all();
  run_tasks(0);
  // Every worker acknowledges the generation (idle ones at once), so none can still read body_ or ranges_
  // when the next parallel_for rewrites them.
  while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  body_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace moe_sft
