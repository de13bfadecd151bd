// The MoE SFT layer: routing, forward (optionally saving for backward), backward, LoRA binding.
// Arguments reaching this class are already validated by lib/api; it throws moe_sft::Error or
// std::bad_alloc only for conditions that depend on its own state or on memory.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/activation_rows.h"
#include "kernels/gemm.h"
#include "layer/expert_part.h"
#include "layer/forward_cache.h"
#include "layer/layer_config.h"
#include "layer/lora_view.h"
#include "runtime/bf16.h"

namespace moe_sft::layer {

struct ForwardCall {
  int64_t tokens;
  int64_t top_k;
  const int64_t* expert_ids;     // [tokens, top_k], each in [-1, E)
  const float* routing_weights;  // [tokens, top_k]
  const bf16* input;             // [tokens, H]
  bf16* output;                  // [tokens, H]
  bool save_for_backward;
};

struct BackwardCall {
  const bf16* grad_output;        // [tokens, H] of the saved forward
  bf16* grad_input;               // [tokens, H]
  float* grad_routing_weights;    // [tokens, top_k], or null
  const LoraGradArrays* lora_grads;  // null: not wanted
  bool accumulate;                // add into lora_grads instead of overwriting them
};

// The layer's fixed parts, as the passes read them.
struct LayerParts {
  int64_t experts, hidden, intermediate, rank;
  float lora_scale;
  int threads;
  bool check_finite;
  kernels::WeightFormat weight_format;
  const kernels::KernelSet* kernels;
  kernels::ActivationRows activation;
  FrozenBiases biases;
  std::vector<ExpertPart> parts;  // tensor-parallel parts of the intermediate dimension
};

class MoELayer {
 public:
  explicit MoELayer(const LayerConfig& cfg);  // packs the base weights

  int64_t experts() const { return layer_.experts; }
  int64_t hidden() const { return layer_.hidden; }
  int64_t intermediate() const { return layer_.intermediate; }
  int64_t rank() const { return layer_.rank; }
  int64_t max_cache_depth() const { return max_cache_depth_; }
  const ForwardCache& cache() const { return cache_; }
  const kernels::KernelSet& kernels() const { return *layer_.kernels; }
  bool lora_bound() const { return lora_bound_; }

  void bind_lora(const LoraBinding& lora);
  void unbind_lora() { lora_bound_ = false; }
  void discard_saved(int64_t n) { cache_.discard(n); }
  void forward(const ForwardCall& call);
  void backward(const BackwardCall& call);

 private:
  // fn(LoraView<bf16 or float>) of the bound adapters, or a null view of rank 0 for a base-only pass.
  template <class Fn>
  void with_lora(bool with_adapters, Fn&& fn) const;

  LayerParts layer_;
  int64_t max_cache_depth_;
  LoraBinding lora_;
  bool lora_bound_ = false;
  ForwardCache cache_;
};

// The passes (forward.cpp, backward.cpp). Forward pushes its record onto `cache` when saving; backward
// consumes cache.top() (popping it only on success).
template <class T>
void run_forward(const LayerParts& layer, const LoraView<T>& lora, const ForwardCall& call, ForwardCache& cache);
template <class T>
void run_backward(const LayerParts& layer, const LoraView<T>& lora, const BackwardCall& call, ForwardCache& cache);

}  // namespace moe_sft::layer
