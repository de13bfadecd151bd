#include "runtime.h"

#include <thread>

namespace moe_sft {

Runtime& Runtime::instance() {
  static Runtime runtime;
  return runtime;
}

int Runtime::resolve_threads(int requested) {
  if (requested > 0) return requested;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : int(hw);
}

Runtime::Session::Session(Runtime& rt, int threads) : runtime_(rt), lock_(rt.mutex_) {
  // The pool only grows, and only here, while no call is using it.
  if (!rt.pool_ || rt.pool_->size() < threads) rt.pool_ = std::make_unique<ThreadPool>(threads);
}

}  // namespace moe_sft
