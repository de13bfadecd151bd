// What a forward(save_for_backward=1) keeps for its backward, owned by the layer (never in the scratch
// arena) and sized by the call's actual T·k. Backward consumes the most recent record (LIFO, as gradient
// checkpointing replays). One spent record is kept as a spare so that a steady training loop reuses its
// memory instead of faulting in fresh pages every step.
#pragma once
#include <cstdint>
#include <vector>

#include "layer/routing.h"
#include "runtime/bf16.h"

namespace moe_sft::layer {

struct ForwardRecord {
  Routing routing;
  bool with_adapters = false;            // false: the forward ran the base layer only (rank 0, or none bound)
  std::vector<float> routing_weights;    // [T, k] as given
  std::vector<bf16> input;               // [T, H] in token order
  std::vector<bf16> gate;                // [rows, I] gate projection before the activation (bf16-rounded, as used)
  std::vector<bf16> up;                  // [rows, I] up projection
  std::vector<float> input_gate_a;       // [rows, r] x·Ag^T  (LoRA down-projections as the forward saw them)
  std::vector<float> input_up_a;         // [rows, r] x·Au^T
  std::vector<float> activation_down_a;  // [rows, r] h·Ad^T
};

class ForwardCache {
 public:
  int64_t depth() const { return int64_t(stack_.size()); }
  bool empty() const { return stack_.empty(); }
  void reserve(int64_t depth) { stack_.reserve(size_t(depth)); }

  // A record to fill (the spare, if any); it joins the stack only through push().
  ForwardRecord take_spare() {
    ForwardRecord r = std::move(spare_);
    spare_ = ForwardRecord{};
    return r;
  }
  void push(ForwardRecord&& r) { stack_.push_back(std::move(r)); }
  const ForwardRecord& top() const { return stack_.back(); }
  void pop() {
    spare_ = std::move(stack_.back());
    stack_.pop_back();
  }
  // Drops the n most recent records (0 <= n <= depth, checked by the caller).
  void discard(int64_t n) {
    for (int64_t i = 0; i < n; ++i) pop();
  }

 private:
  std::vector<ForwardRecord> stack_;
  ForwardRecord spare_;
};

}  // namespace moe_sft::layer
