#include "api/to_layer.h"

namespace moe_sft::api {

layer::LayerConfig to_layer_config(const moe_sft_config& c) {
  layer::LayerConfig out;
  out.experts = c.expert_num;
  out.hidden = c.hidden_size;
  out.intermediate = c.intermediate_size;
  out.rank = c.lora_rank;
  out.lora_alpha = c.lora_alpha;
  out.max_cache_depth = c.max_cache_depth;
  out.num_threads = c.num_threads;
  out.tp_count = c.tp_count;
  out.check_finite = c.check_finite != 0;
  out.weight_format = kernels::WeightFormat(c.weight_format);
  out.group_size = c.group_size;
  out.block_rows = c.block_rows;
  out.block_cols = c.block_cols;
  out.fp8_scale_type = c.scale_dtype == MOE_SFT_DTYPE_BF16 ? kernels::ScaleType::bf16 : kernels::ScaleType::f32;
  out.prequantized = c.prequantized != 0;
  out.gate = {c.gate_proj, c.gate_scale, c.gate_zero};
  out.up = {c.up_proj, c.up_scale, c.up_zero};
  out.down = {c.down_proj, c.down_scale, c.down_zero};
  out.activation = {c.activation == MOE_SFT_ACTIVATION_SWIGLU_CLAMPED ? kernels::ActivationKind::swiglu_clamped
                                                                      : kernels::ActivationKind::silu,
                    c.swiglu_alpha, c.swiglu_limit};
  out.gate_bias = c.gate_bias;
  out.up_bias = c.up_bias;
  out.down_bias = c.down_bias;
  return out;
}

layer::LoraBinding to_lora_binding(const moe_sft_lora& l) {
  return {l.dtype == MOE_SFT_DTYPE_BF16 ? layer::LoraDtype::bf16 : layer::LoraDtype::f32,
          {l.gate_a, l.gate_b, l.up_a, l.up_b, l.down_a, l.down_b}};
}

layer::LoraGradArrays to_lora_grads(const moe_sft_lora_grads& g) {
  return {g.gate_a, g.gate_b, g.up_a, g.up_b, g.down_a, g.down_b};
}

}  // namespace moe_sft::api
