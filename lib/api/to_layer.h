// The ABI's structs converted into the layer's own types, after validation: lib/layer never sees
// moe_sft_config, moe_sft_lora or moe_sft_lora_grads.
#pragma once
#include "layer/layer_config.h"
#include "layer/lora_view.h"
#include "moe_sft.h"

namespace moe_sft::api {

layer::LayerConfig to_layer_config(const moe_sft_config& cfg);
layer::LoraBinding to_lora_binding(const moe_sft_lora& lora);
layer::LoraGradArrays to_lora_grads(const moe_sft_lora_grads& grads);

}  // namespace moe_sft::api
