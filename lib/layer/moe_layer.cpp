#include "layer/moe_layer.h"

#include <algorithm>

#include "runtime/error.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

MoELayer::MoELayer(const moe_sft_config& cfg)
    : experts_(cfg.expert_num),
      hidden_(cfg.hidden_size),
      intermediate_(cfg.intermediate_size),
      rank_(cfg.lora_rank),
      lora_scale_(cfg.lora_rank > 0 ? cfg.lora_alpha / float(cfg.lora_rank) : 0.0f),
      max_cache_depth_(cfg.max_cache_depth),
      threads_(Runtime::resolve_threads(cfg.num_threads)),
      check_finite_(cfg.check_finite != 0),
      weight_format_(kernels::WeightFormat(cfg.weight_format)),
      kernels_(&kernels::select_kernels()) {
  parts_ = pack_expert_parts(cfg, threads_);
}

void MoELayer::bind_lora(const moe_sft_lora& lora) {
  if (rank_ == 0) throw Error(MOE_SFT_ERR_INVALID_ARGUMENT, "the layer was created with lora_rank = 0: it has no LoRA weights to bind");
  lora_ = lora;
  lora_bound_ = true;
}

template <class Fn>
void MoELayer::with_lora(bool with_adapters, Fn&& fn) const {
  if (!with_adapters) {
    fn(LoraView<float>{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, LoraShape{hidden_, intermediate_, 0}});
    return;
  }
  with_lora_view(lora_, lora_shape(), fn);
}

void MoELayer::forward(const ForwardCall& call) {
  if (call.save_for_backward && cache_.depth() >= max_cache_depth_)
    throw Error(MOE_SFT_ERR_CACHE_FULL, "save_for_backward = 1, but " + std::to_string(cache_.depth()) +
                                            " saved forward(s) already await backward (max_cache_depth = " +
                                            std::to_string(max_cache_depth_) + ")");
  with_lora(rank_ > 0 && lora_bound_, [&](const auto& lora) { forward_with(lora, call); });
}

void MoELayer::backward(const BackwardCall& call) {
  if (cache_.empty())
    throw Error(MOE_SFT_ERR_CACHE_EMPTY,
                "no saved forward awaits backward (call forward with save_for_backward = 1 first)");
  const bool with_adapters = cache_.top().with_adapters;
  if (with_adapters && !lora_bound_)
    throw Error(MOE_SFT_ERR_INVALID_ARGUMENT,
                "the adapters this forward ran with were unbound; bind them again or discard_saved");
  with_lora(with_adapters, [&](const auto& lora) { backward_with(lora, call); });
}

}  // namespace moe_sft::layer
