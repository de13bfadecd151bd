// The process-wide compute runtime: the worker pool and the scratch arena that all layers share.
// A compute call holds the runtime lock for its whole duration (layers run one at a time), which is what
// makes sharing one arena safe and two layers driven from two threads equal to running them in turn.
#pragma once
#include <memory>
#include <mutex>

#include "scratch_arena.h"
#include "thread_pool.h"

namespace moe_sft {

class Runtime {
 public:
  static Runtime& instance();

  // Threads a layer asking for `requested` (0 = all cores) gets.
  static int resolve_threads(int requested);

  class Session {  // exclusive use of pool and arena while alive
   public:
    ThreadPool& pool() { return *runtime_.pool_; }
    ScratchArena& arena() { return runtime_.arena_; }

   private:
    friend class Runtime;
    Session(Runtime& rt, int threads);
    Runtime& runtime_;
    std::unique_lock<std::mutex> lock_;
  };
  Session session(int threads) { return Session(*this, threads); }

  // fork() support (registered with pthread_atfork): see runtime.cpp.
  void lock_for_fork();
  void unlock_after_fork(bool in_child);

 private:
  Runtime() = default;
  std::mutex mutex_;
  std::unique_ptr<ThreadPool> pool_;
  ScratchArena arena_;
};

}  // namespace moe_sft
