#include "layer/moe_layer.h"

#include <algorithm>
#include <string>

#include "runtime/error.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

namespace {

// Everything but the packed weights.
LayerParts fixed_parts(const LayerConfig& cfg) {
  const kernels::KernelSet& family = kernels::select_kernels();
  return {cfg.experts,
          cfg.hidden,
          cfg.intermediate,
          cfg.rank,
          cfg.rank > 0 ? cfg.lora_alpha / float(cfg.rank) : 0.0f,
          Runtime::resolve_threads(cfg.num_threads),
          cfg.check_finite,
          cfg.weight_format,
          &family,
          kernels::ActivationRows(family, cfg.activation),
          copy_biases(cfg),
          {}};
}

}  // namespace

MoELayer::MoELayer(const LayerConfig& cfg) : layer_(fixed_parts(cfg)), max_cache_depth_(cfg.max_cache_depth) {
  layer_.parts = pack_expert_parts(cfg, layer_.threads);
}

void MoELayer::bind_lora(const LoraBinding& lora) {
  if (layer_.rank == 0)
    throw Error(MOE_SFT_ERR_INVALID_ARGUMENT, "the layer was created with lora_rank = 0: it has no LoRA weights to bind");
  lora_ = lora;
  lora_bound_ = true;
}

template <class Fn>
void MoELayer::with_lora(bool with_adapters, Fn&& fn) const {
  if (!with_adapters) {
    fn(LoraView<float>({}, LoraShape{layer_.hidden, layer_.intermediate, 0}));
    return;
  }
  with_lora_view(lora_, LoraShape{layer_.hidden, layer_.intermediate, layer_.rank}, fn);
}

void MoELayer::forward(const ForwardCall& call) {
  if (call.save_for_backward && cache_.depth() >= max_cache_depth_)
    throw Error(MOE_SFT_ERR_CACHE_FULL, "save_for_backward = 1, but " + std::to_string(cache_.depth()) +
                                            " saved forward(s) already await backward (max_cache_depth = " +
                                            std::to_string(max_cache_depth_) + ")");
  with_lora(layer_.rank > 0 && lora_bound_, [&](const auto& lora) { run_forward(layer_, lora, call, cache_); });
}

void MoELayer::backward(const BackwardCall& call) {
  if (cache_.empty())
    throw Error(MOE_SFT_ERR_CACHE_EMPTY,
                "no saved forward awaits backward (call forward with save_for_backward = 1 first)");
  const bool with_adapters = cache_.top().with_adapters;
  if (with_adapters && !lora_bound_)
    throw Error(MOE_SFT_ERR_INVALID_ARGUMENT,
                "the adapters this forward ran with were unbound; bind them again or discard_saved");
  with_lora(with_adapters, [&](const auto& lora) { run_backward(layer_, lora, call, cache_); });
}

}  // namespace moe_sft::layer
