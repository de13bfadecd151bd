// The C ABI entry points: argument validation, then the layer. Every function body runs inside guard(),
// so an exception from any depth becomes a status plus a thread-local message.
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "api/config.h"
#include "api/status.h"
#include "api/to_layer.h"
#include "api/validate.h"
#include "layer/moe_layer.h"
#include "moe_sft.h"

// The handle: the layer plus the lock that makes each call on it atomic (validation that reads its cache,
// the compute, the cache push or pop), so one layer used from several threads stays consistent.
struct moe_sft_layer {
  explicit moe_sft_layer(const moe_sft::layer::LayerConfig& cfg) : impl(cfg) {}
  moe_sft::layer::MoELayer impl;
  mutable std::mutex mutex;
};

using moe_sft::as_bf16;
using moe_sft::api::guard;
using moe_sft::api::require_array;
using moe_sft::api::require_non_null;
using moe_sft::api::require_range;

namespace {

void validate_lora(const moe_sft_lora* lora) {
  require_non_null(lora, "lora");
  moe_sft::api::require_dtype(moe_sft::api::enum_value(lora->dtype), "lora->dtype");
  const int64_t size = lora->dtype == MOE_SFT_DTYPE_BF16 ? 2 : 4;
  const void* arrays[] = {lora->gate_a, lora->gate_b, lora->up_a, lora->up_b, lora->down_a, lora->down_b};
  const char* names[] = {"lora->gate_a", "lora->gate_b", "lora->up_a", "lora->up_b", "lora->down_a", "lora->down_b"};
  for (int i = 0; i < 6; ++i) require_array(arrays[i], names[i], 1, size);
}

void validate_grads(const moe_sft_lora_grads* g) {
  const float* arrays[] = {g->gate_a, g->gate_b, g->up_a, g->up_b, g->down_a, g->down_b};
  const char* names[] = {"grads->gate_a", "grads->gate_b", "grads->up_a", "grads->up_b", "grads->down_a", "grads->down_b"};
  for (int i = 0; i < 6; ++i) require_array(arrays[i], names[i], 1, 4);
}

}  // namespace

extern "C" {

moe_sft_status moe_sft_create(const moe_sft_config* cfg, moe_sft_layer** out) {
  if (out != nullptr) *out = nullptr;
  return guard("moe_sft_create", [&] {
    require_non_null(out, "out");
    const moe_sft_config config = moe_sft::api::read_config(cfg);
    moe_sft::api::validate_config(config);
    *out = new moe_sft_layer(moe_sft::api::to_layer_config(config));
  });
}

void moe_sft_destroy(moe_sft_layer* layer) { delete layer; }

moe_sft_status moe_sft_update_lora(moe_sft_layer* layer, const moe_sft_lora* lora) {
  return guard("moe_sft_update_lora", [&] {
    require_non_null(layer, "layer");
    if (lora == nullptr) {  // unbinds: later forwards run the base layer only
      std::lock_guard<std::mutex> lock(layer->mutex);
      layer->impl.unbind_lora();
      return;
    }
    validate_lora(lora);
    std::lock_guard<std::mutex> lock(layer->mutex);
    layer->impl.bind_lora(moe_sft::api::to_lora_binding(*lora));
  });
}

moe_sft_status moe_sft_forward(moe_sft_layer* layer, int64_t qlen, int32_t top_k, const int64_t* expert_ids,
                               const float* routing_weights, const uint16_t* input, uint16_t* output,
                               int32_t save_for_backward) {
  return guard("moe_sft_forward", [&] {
    require_non_null(layer, "layer");
    std::lock_guard<std::mutex> lock(layer->mutex);
    const moe_sft::layer::MoELayer& l = layer->impl;
    require_range(top_k, 1, 1 << 16, "top_k");
    // Bounds every [rows, H | I | r] index (and its byte offset) well inside int64.
    const int64_t widest = std::max({l.hidden(), l.intermediate(), l.rank()});
    require_range(qlen, 0, moe_sft::api::kMaxElements / (int64_t(top_k) * widest), "qlen");
    require_array(expert_ids, "expert_ids", qlen * top_k, 8);
    require_array(routing_weights, "routing_weights", qlen * top_k, 4);
    require_array(input, "input", qlen * l.hidden(), 2);
    require_array(output, "output", qlen * l.hidden(), 2);
    moe_sft::api::validate_expert_ids(expert_ids, qlen, top_k, l.experts());
    layer->impl.forward({qlen, top_k, expert_ids, routing_weights, as_bf16(input), as_bf16(output),
                         save_for_backward != 0});
  });
}

moe_sft_status moe_sft_backward(moe_sft_layer* layer, const uint16_t* grad_output, uint16_t* grad_input,
                                float* grad_routing_weights, const moe_sft_lora_grads* grads, int32_t accumulate) {
  return guard("moe_sft_backward", [&] {
    require_non_null(layer, "layer");
    std::lock_guard<std::mutex> lock(layer->mutex);
    const moe_sft::layer::MoELayer& l = layer->impl;
    if (!l.cache().empty()) {  // an empty cache is reported by the layer, with its own status
      const moe_sft::layer::Routing& routing = l.cache().top().routing;
      require_array(grad_output, "grad_output", routing.qlen * l.hidden(), 2);
      require_array(grad_input, "grad_input", routing.qlen * l.hidden(), 2);
      if (grad_routing_weights != nullptr)
        require_array(grad_routing_weights, "grad_routing_weights", routing.qlen * routing.top_k, 4);
    }
    if (grads != nullptr && l.rank() > 0) validate_grads(grads);
    const moe_sft::layer::LoraGradArrays lora_grads =
        grads != nullptr ? moe_sft::api::to_lora_grads(*grads) : moe_sft::layer::LoraGradArrays{};
    layer->impl.backward({as_bf16(grad_output), as_bf16(grad_input), grad_routing_weights,
                          grads != nullptr ? &lora_grads : nullptr, accumulate != 0});
  });
}

moe_sft_status moe_sft_cache_depth(const moe_sft_layer* layer, int32_t* depth) {
  return guard("moe_sft_cache_depth", [&] {
    require_non_null(layer, "layer");
    require_non_null(depth, "depth");
    std::lock_guard<std::mutex> lock(layer->mutex);
    *depth = int32_t(layer->impl.cache().depth());
  });
}

moe_sft_status moe_sft_discard_saved(moe_sft_layer* layer, int32_t n) {
  return guard("moe_sft_discard_saved", [&] {
    require_non_null(layer, "layer");
    std::lock_guard<std::mutex> lock(layer->mutex);
    const int64_t depth = layer->impl.cache().depth();
    if (n < 0 || n > depth)
      moe_sft::api::invalid("n = " + std::to_string(n) + " is out of range [0, depth = " + std::to_string(depth) +
                            "] (depth: the saved forwards awaiting backward)");
    layer->impl.discard_saved(n);
  });
}

moe_sft_status moe_sft_isa(const char** name) {
  return guard("moe_sft_isa", [&] {
    require_non_null(name, "name");
    *name = moe_sft::kernels::select_kernels().name;
  });
}

const char* moe_sft_layer_isa(const moe_sft_layer* layer) {
  return layer == nullptr ? nullptr : layer->impl.kernels().name;
}

}  // extern "C"
