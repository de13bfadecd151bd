// Persistent worker pool with work stealing. No OpenMP: its runtime clashes with torch's in one process.
//
// parallel_for(n, workers, body) splits [0, n) into one contiguous range per worker, so neighbouring tasks
// (e.g. the column blocks of one expert) stay on one core and in its cache; a worker that finishes its
// range steals the remaining tasks of the others, so one hot expert still keeps every core busy.
// The calling thread works as worker 0. Not re-entrant: callers serialize on the runtime lock.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moe_sft {

// A non-owning reference to a callable taking (task, worker): unlike std::function it never allocates, so
// starting a parallel loop cannot fail half-way through a call that has begun writing its outputs.
class TaskRef {
 public:
  template <class Fn>
  TaskRef(const Fn& fn)  // NOLINT: implicit, so that a lambda can be passed where a TaskRef is expected
      : object_(&fn), call_([](const void* f, int64_t task, int worker) { (*static_cast<const Fn*>(f))(task, worker); }) {}
  void operator()(int64_t task, int worker) const { call_(object_, task, worker); }

 private:
  const void* object_;
  void (*call_)(const void*, int64_t, int);
};

class ThreadPool {
 public:
  using Body = TaskRef;

  // threads >= 1, including the caller. Throws Error(UNSUPPORTED) if the OS refuses a thread (every thread
  // already started is stopped and joined first).
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Runs body(task, worker) once for every task in [0, n) on min(workers, size()) threads and returns when
  // all are done. The first exception thrown by a task is rethrown here after the others finished.
  void parallel_for(int64_t n, int workers, const Body& body);

 private:
  struct alignas(64) Range {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };

  void worker_loop(int worker, int threads);
  void stop_and_join();
  void run_tasks(int worker);
  bool claim(int worker, int64_t* task);

  std::vector<std::thread> workers_;
  std::unique_ptr<Range[]> ranges_;

  std::mutex mutex_;
  std::condition_variable wake_;
  uint64_t generation_ = 0;  // bumped for each parallel_for; guarded by mutex_
  bool stopping_ = false;

  // State of the parallel_for in flight.
  const Body* body_ = nullptr;
  int active_ = 0;
  std::atomic<int> pending_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace moe_sft
