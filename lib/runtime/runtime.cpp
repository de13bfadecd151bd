#include "runtime.h"

#include <pthread.h>

#include <thread>

namespace moe_sft {

namespace {

// fork(): the child inherits the pool object but none of its threads (a parallel_for would wait for them
// forever), and would inherit the runtime lock held if a call was in flight. So a fork waits for the call
// in flight, and the child drops the parent's pool (leaked: its threads are not there to join) and builds
// its own on first use.
void before_fork() { Runtime::instance().lock_for_fork(); }
void after_fork_in_parent() { Runtime::instance().unlock_after_fork(false); }
void after_fork_in_child() { Runtime::instance().unlock_after_fork(true); }

}  // namespace

Runtime& Runtime::instance() {
  // Never destroyed: a thread still computing when the process exits must not find its pool gone.
  static Runtime* runtime = [] {
    Runtime* rt = new Runtime;
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
    return rt;
  }();
  return *runtime;
}

int Runtime::resolve_threads(int requested) {
  if (requested > 0) return requested;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

void Runtime::lock_for_fork() { mutex_.lock(); }

void Runtime::unlock_after_fork(bool in_child) {
  if (in_child) (void)pool_.release();
  mutex_.unlock();
}

Runtime::Session::Session(Runtime& rt, int threads) : runtime_(rt), lock_(rt.mutex_) {
  // The pool only grows, and only here, while no call is using it.
  if (!rt.pool_ || rt.pool_->size() < threads) {
    rt.pool_.reset();  // the old workers are joined before the new ones start
    rt.pool_ = std::make_unique<ThreadPool>(threads);
  }
}

}  // namespace moe_sft
