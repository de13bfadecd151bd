// The MoE SFT layer: routing, forward (optionally saving for backward), backward, LoRA binding.
// Arguments reaching this class are already validated by lib/api; it throws moe_sft::Error or
// std::bad_alloc only for conditions that depend on its own state or on memory.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/gemm.h"
#include "layer/expert_part.h"
#include "layer/forward_cache.h"
#include "layer/lora_view.h"
#include "moe_sft.h"
#include "runtime/bf16.h"

namespace moe_sft::layer {

struct ForwardCall {
  int64_t qlen;
  int64_t top_k;
  const int64_t* expert_ids;
  const float* weights;
  const bf16* input;
  bf16* output;
  bool save_for_backward;
};

struct BackwardCall {
  const bf16* grad_output;
  bf16* grad_input;
  float* grad_weights;      // may be null
  const moe_sft_lora_grads* lora_grads;  // may be null
  bool accumulate;
};

class MoELayer {
 public:
  explicit MoELayer(const moe_sft_config& cfg);  // packs the base weights

  int64_t experts() const { return experts_; }
  int64_t hidden() const { return hidden_; }
  int64_t intermediate() const { return intermediate_; }
  int64_t rank() const { return rank_; }
  int64_t max_cache_depth() const { return max_cache_depth_; }
  const ForwardCache& cache() const { return cache_; }
  const kernels::KernelSet& kernels() const { return *kernels_; }
  bool lora_bound() const { return lora_bound_; }

  void bind_lora(const moe_sft_lora& lora);
  void unbind_lora() { lora_bound_ = false; }
  void discard_saved(int64_t n) { cache_.discard(n); }
  void forward(const ForwardCall& call);
  void backward(const BackwardCall& call);

 private:
  LoraShape lora_shape() const { return LoraShape{hidden_, intermediate_, rank_}; }
  template <class T>
  void forward_with(const LoraView<T>& lora, const ForwardCall& call);    // forward.cpp
  template <class T>
  void backward_with(const LoraView<T>& lora, const BackwardCall& call);  // backward.cpp
  // fn(LoraView<bf16 or float>) of the bound adapters, or a null view of rank 0 for a base-only pass.
  template <class Fn>
  void with_lora(bool with_adapters, Fn&& fn) const;
  template <class T>
  void check_forward_inputs(const LoraView<T>& lora, const ForwardCall& call, const Routing& routing) const;

  int64_t experts_, hidden_, intermediate_, rank_;
  float lora_scale_;
  int64_t max_cache_depth_;
  int threads_;
  bool check_finite_;
  kernels::WeightFormat weight_format_;
  const kernels::KernelSet* kernels_;
  std::vector<ExpertPart> parts_;
  moe_sft_lora lora_{};
  bool lora_bound_ = false;
  ForwardCache cache_;
};

}  // namespace moe_sft::layer
