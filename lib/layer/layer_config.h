// What a layer is made from, in the layer's own terms: lib/api builds it from the ABI's moe_sft_config
// (after validating it), so nothing below the ABI depends on the public structs' layout or versions.
#pragma once
#include <cstdint>

#include "kernels/activation.h"
#include "kernels/weight_format.h"

namespace moe_sft::layer {

// One projection's base weights as the caller gave them, all experts stacked: bf16 [E, N, K], or the
// quantized layout of LayerConfig::weight_format with its scales (and AWQ zero points).
struct BaseWeights {
  const void* weights = nullptr;
  const void* scale = nullptr;
  const uint8_t* zero = nullptr;
};

struct LayerConfig {
  int64_t experts = 0, hidden = 0, intermediate = 0;
  int64_t rank = 0;  // 0: the base layer only
  float lora_alpha = 0.0f;
  int64_t max_cache_depth = 0;
  int num_threads = 0;  // 0 = all cores
  int64_t tp_count = 1;
  bool check_finite = false;
  kernels::WeightFormat weight_format = kernels::WeightFormat::bf16;
  int64_t group_size = 0;
  // fp8_e4m3_block: the scale blocks (rows x columns) and the pre-quantized scales' type (f32 or bf16).
  int64_t block_rows = 0, block_cols = 0;
  kernels::ScaleType fp8_scale_type = kernels::ScaleType::f32;
  bool prequantized = false;  // false: every BaseWeights::weights is bf16, to be quantized if the format says so
  BaseWeights gate, up, down;  // gate, up [E, I, H]; down [E, H, I]
  kernels::ActivationParams activation;
  const float* gate_bias = nullptr;  // [E, I] f32, or null: no bias
  const float* up_bias = nullptr;    // [E, I]
  const float* down_bias = nullptr;  // [E, H]
};

}  // namespace moe_sft::layer
