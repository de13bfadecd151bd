// The layer's config across ABI versions: moe_sft_config_init's defaults, a caller's struct of any
// published size upgraded to this library's, and the checks of every field (shapes, formats, the
// pre-quantized arrays) before create packs anything.
#include "api/config.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>

#include "api/validate.h"
#include "kernels/quantize.h"
#include "runtime/error.h"

namespace moe_sft::api {

namespace {

void require_product_fits(std::initializer_list<int64_t> dims, const char* what) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d != 0 && n > kMaxElements / d) invalid(std::string(what) + " is too large (more than 2^50 elements)");
    n *= d;
  }
}

// One projection of the config, [E, rows, cols] with K = cols, named as the config's fields.
struct ProjectionFields {
  const char *weights_name, *scale_name, *zero_name;
  const void* weights;
  const void* scale;
  const uint8_t* zero;
  int64_t rows, cols;
};

std::string format_label(kernels::WeightFormat f) {
  return std::string("weight_format ") + kernels::weight_format_name(f);
}

// The K of every projection (H and I), named as the config's fields.
struct KDim {
  const char* name;
  int64_t k;
};

void require_zero_field(int32_t v, const char* field, const std::string& label, const char* why) {
  if (v != 0) invalid(std::string("cfg->") + field + " = " + std::to_string(v) + " must be 0 with " + label + why);
}

void validate_fp8_blocks(const moe_sft_config& c, const std::string& label) {
  require_zero_field(c.group_size, "group_size", label, " (its scales are per block_rows x block_cols)");
  using Field = std::pair<const char*, int32_t>;
  for (const auto& [field, v] : {Field{"block_rows", c.block_rows}, Field{"block_cols", c.block_cols}})
    if (v <= 0)
      invalid(std::string("cfg->") + field + " = " + std::to_string(v) + " with " + label +
              ": set the checkpoint's quantization_config.weight_block_size (usually 128 x 128)");
  if (c.block_cols % 2 != 0)
    invalid("cfg->block_cols = " + std::to_string(c.block_cols) +
            " is odd: the packed layout keeps pairs of K under one scale");
  const int64_t scale_dtype = enum_value(c.scale_dtype);
  if (scale_dtype != MOE_SFT_DTYPE_F32 && scale_dtype != MOE_SFT_DTYPE_BF16)
    invalid("cfg->scale_dtype = " + std::to_string(scale_dtype) + " is not a moe_sft_dtype (0 bf16, 1 f32)");
  // A part boundary splits gate/up's rows and down's columns: whole blocks of both.
  const int64_t unit = std::lcm(int64_t(c.block_rows), int64_t(c.block_cols));
  const int64_t max_parts = (c.intermediate_size + unit - 1) / unit;
  if (c.tp_count > max_parts)
    invalid("cfg->tp_count = " + std::to_string(c.tp_count) + " cannot split cfg->intermediate_size = " +
            std::to_string(c.intermediate_size) + " into parts of whole " + std::to_string(c.block_rows) + " x " +
            std::to_string(c.block_cols) + " blocks (at most " + std::to_string(max_parts) + " parts)");
}

void validate_group_size(const moe_sft_config& c, kernels::WeightFormat f) {
  using kernels::WeightFormat;
  const std::string label = format_label(f);
  if (f != WeightFormat::fp8_e4m3_block) {
    require_zero_field(c.block_rows, "block_rows", label, " (only fp8_e4m3_block has scale blocks)");
    require_zero_field(c.block_cols, "block_cols", label, " (only fp8_e4m3_block has scale blocks)");
    if (enum_value(c.scale_dtype) != MOE_SFT_DTYPE_F32)
      invalid("cfg->scale_dtype = " + std::to_string(enum_value(c.scale_dtype)) + " must stay MOE_SFT_DTYPE_F32 with " +
              label + " (only fp8_e4m3_block's scales come in a chosen dtype)");
  }
  if (f == WeightFormat::fp8_e4m3_block) return validate_fp8_blocks(c, label);
  if (!kernels::has_groups(f)) {
    if (c.group_size != 0)
      invalid("cfg->group_size = " + std::to_string(c.group_size) + " must be 0 with " + label +
              (f == WeightFormat::int8 ? " (one scale per output channel)" : " (no scales)"));
    return;
  }
  const int64_t g = c.group_size;
  if (f == WeightFormat::mxfp4 && g != 32)
    invalid("cfg->group_size = " + std::to_string(g) + " with " + label + ": MXFP4 scales groups of 32 along K");
  if (g <= 0)
    invalid("cfg->group_size = " + std::to_string(g) + " with " + label +
            ": set the elements per scale along K (" +
            (f == WeightFormat::int4_awq ? "AWQ's usual is 128)" : "Kimi-K2's is 32)"));
  if (g % 2 != 0)
    invalid("cfg->group_size = " + std::to_string(g) + " is odd: the packed layout keeps pairs of K in one group");
  const KDim dims[] = {{"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size}};
  for (const KDim& d : dims) {
    if (d.k % g != 0)
      invalid("cfg->group_size = " + std::to_string(g) + " does not divide cfg->" + d.name + " = " +
              std::to_string(d.k) + " (the K of a projection; groups run along K" +
              (f == WeightFormat::mxfp4 ? ": MXFP4 needs K a multiple of 32)" : ")"));
    if (f == WeightFormat::int4_k2 && d.k % 8 != 0)
      invalid("cfg->" + std::string(d.name) + " = " + std::to_string(d.k) +
              " is not a multiple of 8: int4_k2 packs 8 values of K per int32 word");
  }
  if (c.tp_count > c.intermediate_size / g)
    invalid("cfg->tp_count = " + std::to_string(c.tp_count) + " cannot split cfg->intermediate_size = " +
            std::to_string(c.intermediate_size) + " into parts of whole groups of group_size = " + std::to_string(g) +
            " (at most " + std::to_string(c.intermediate_size / g) + " parts)");
}

}  // namespace

kernels::QuantizedSource source_shape(const moe_sft_config& c, int64_t rows, int64_t cols) {
  const auto f = kernels::WeightFormat(enum_value(c.weight_format));
  const auto scale_type =
      enum_value(c.scale_dtype) == MOE_SFT_DTYPE_BF16 ? kernels::ScaleType::bf16 : kernels::ScaleType::f32;
  return kernels::QuantizedSource::shape(f, rows, cols, c.group_size, c.block_rows, c.block_cols, scale_type);
}

namespace {

void validate_zero_points(const ProjectionFields& p, int64_t experts, int64_t groups) {
  const int64_t n = experts * p.rows * groups;
  for (int64_t i = 0; i < n; ++i)
    if (p.zero[i] > 15)
      invalid(std::string(p.zero_name) + "[" + std::to_string(i / (p.rows * groups)) + ", " +
              std::to_string(i / groups % p.rows) + ", " + std::to_string(i % groups) + "] = " +
              std::to_string(int(p.zero[i])) + " is not a 4-bit zero point (0 to 15)");
}

void validate_weights(const moe_sft_config& c) {
  using kernels::WeightFormat;
  const auto f = WeightFormat(enum_value(c.weight_format));
  if (kernels::weight_format_name(f) == nullptr)
    invalid("cfg->weight_format = " + std::to_string(enum_value(c.weight_format)) +
            " is not a moe_sft_weight_format (0 bf16, 1 int8, 2 int4_awq, 3 int4_k2, 4 fp8_e4m3_block, 5 mxfp4)");
  const std::string label = format_label(f);
  if (c.prequantized != 0 && c.prequantized != 1)
    invalid("cfg->prequantized = " + std::to_string(c.prequantized) + " must be 0 (bf16 weights) or 1 (quantized)");
  if (f == WeightFormat::bf16 && c.prequantized) invalid("cfg->prequantized = 1 with " + label + ": nothing to dequantize");
  if (f == WeightFormat::int4_k2 && !c.prequantized)
    invalid("cfg->prequantized = 0 with " + label +
            ": K2 weights are taken pre-quantized only (weight_packed and weight_scale); int4_awq quantizes from bf16");
  validate_group_size(c, f);

  const int64_t E = c.expert_num, H = c.hidden_size, I = c.intermediate_size;
  const ProjectionFields projections[] = {
      {"cfg->gate_proj", "cfg->gate_scale", "cfg->gate_zero", c.gate_proj, c.gate_scale, c.gate_zero, I, H},
      {"cfg->up_proj", "cfg->up_scale", "cfg->up_zero", c.up_proj, c.up_scale, c.up_zero, I, H},
      {"cfg->down_proj", "cfg->down_scale", "cfg->down_zero", c.down_proj, c.down_scale, c.down_zero, H, I}};
  for (const ProjectionFields& p : projections) {
    if (!c.prequantized) {
      if (p.scale != nullptr) invalid(std::string(p.scale_name) + " is set, but cfg->prequantized = 0 (weights are bf16)");
      if (p.zero != nullptr) invalid(std::string(p.zero_name) + " is set, but cfg->prequantized = 0 (weights are bf16)");
      require_array(p.weights, p.weights_name, E * p.rows * p.cols, 2);
      continue;
    }
    const kernels::QuantizedSource shape = source_shape(c, p.rows, p.cols);
    const int64_t word = f == WeightFormat::int4_k2 ? 4 : 1;
    require_array(p.weights, p.weights_name, E * shape.weight_bytes() / word, word);
    require_array(p.scale, p.scale_name, E * shape.scale_count(),
                  kernels::QuantizedSource::scale_bytes(shape.scale_type));
    if (f == WeightFormat::int4_awq) {
      require_array(p.zero, p.zero_name, E * shape.scale_count(), 1);
      validate_zero_points(p, E, shape.groups());
    } else if (p.zero != nullptr) {
      invalid(std::string(p.zero_name) + " is set, but " + label + " is symmetric: it has no zero points");
    }
  }
}

void validate_activation(const moe_sft_config& c) {
  const int32_t kind = enum_value(c.activation);
  if (kind != MOE_SFT_ACTIVATION_SILU && kind != MOE_SFT_ACTIVATION_SWIGLU_CLAMPED)
    invalid("cfg->activation = " + std::to_string(kind) +
            " is not a moe_sft_activation (0 silu, 1 swiglu_clamped)");
  if (kind == MOE_SFT_ACTIVATION_SWIGLU_CLAMPED) {
    const struct {
      const char* name;
      float value;
    } params[] = {{"cfg->swiglu_alpha", c.swiglu_alpha}, {"cfg->swiglu_limit", c.swiglu_limit}};
    for (const auto& p : params)
      if (!(std::isfinite(p.value) && p.value > 0.0f))
        invalid(std::string(p.name) + " = " + format_number(p.value) +
                " with activation swiglu_clamped: it must be finite and > 0 (gpt-oss: alpha 1.702, limit 7)");
  }
  const int64_t E = c.expert_num;
  require_array(c.gate_bias, "cfg->gate_bias", c.gate_bias ? E * c.intermediate_size : 0, sizeof(float));
  require_array(c.up_bias, "cfg->up_bias", c.up_bias ? E * c.intermediate_size : 0, sizeof(float));
  require_array(c.down_bias, "cfg->down_bias", c.down_bias ? E * c.hidden_size : 0, sizeof(float));
}

}  // namespace

moe_sft_config read_config(const moe_sft_config* cfg) {
  require_non_null(cfg, "cfg");
  // The published sizes: each version appends fields to the one before. A caller compiled against an older
  // header passes a shorter struct and gets the defaults for the rest (an older struct's tail padding, which
  // a newer version's fields may occupy, is not read); a newer caller's struct is accepted only if every
  // field this library does not know is zero (its padding included, which moe_sft_config_init zeroes).
  struct Version {
    size_t size, known;  // sizeof that version's struct, and the bytes of its fields
  };
  constexpr size_t kAlign = alignof(moe_sft_config);
  constexpr size_t kV1 = offsetof(moe_sft_config, down_proj) + sizeof(cfg->down_proj);
  constexpr size_t kV2 = offsetof(moe_sft_config, check_finite) + sizeof(cfg->check_finite);
  constexpr size_t kV3 = offsetof(moe_sft_config, down_zero) + sizeof(cfg->down_zero);
  constexpr size_t kV4 = offsetof(moe_sft_config, down_bias) + sizeof(cfg->down_bias);
  constexpr auto padded = [](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  constexpr Version kVersions[] = {
      {kV1, kV1}, {padded(kV2), kV2}, {padded(kV3), kV3}, {sizeof(moe_sft_config), kV4}};
  if (cfg->struct_size == 0)
    invalid("cfg->struct_size = 0: initialize the config with moe_sft_config_init before setting fields");
  size_t known = 0;
  for (const Version& v : kVersions)
    if (cfg->struct_size == v.size) known = v.known;
  if (cfg->struct_size > sizeof(moe_sft_config)) known = kV4;
  if (known == 0)
    invalid("cfg->struct_size = " + std::to_string(cfg->struct_size) + " is not the size of any moe_sft_config (" +
            std::to_string(kVersions[0].size) + ", " + std::to_string(kVersions[1].size) + ", " +
            std::to_string(kVersions[2].size) + " or at least " + std::to_string(sizeof(moe_sft_config)) + ")");
  require_unknown_fields_zero(cfg, cfg->struct_size, sizeof(moe_sft_config));
  moe_sft_config out;
  moe_sft_config_init(&out);
  std::memcpy(&out, cfg, known);
  out.struct_size = sizeof(moe_sft_config);
  return out;
}

void validate_config(const moe_sft_config& c) {
  require_range(c.expert_num, 1, INT32_MAX, "cfg->expert_num");
  require_range(c.hidden_size, 1, INT32_MAX, "cfg->hidden_size");
  require_range(c.intermediate_size, 1, INT32_MAX, "cfg->intermediate_size");
  require_range(c.lora_rank, 0, INT32_MAX, "cfg->lora_rank");
  if (c.lora_rank > 0 && !std::isfinite(c.lora_alpha))
    invalid("cfg->lora_alpha = " + format_number(c.lora_alpha) + " is not finite");
  require_range(c.max_cache_depth, 0, INT32_MAX, "cfg->max_cache_depth");
  require_range(c.num_threads, 0, 4096, "cfg->num_threads");
  require_range(c.tp_count, 1, c.intermediate_size, "cfg->tp_count");
  require_product_fits({c.expert_num, c.hidden_size, c.intermediate_size}, "expert_num * hidden_size * intermediate_size");
  require_product_fits({c.expert_num, c.lora_rank, std::max(c.hidden_size, c.intermediate_size)},
                       "expert_num * lora_rank * max(hidden_size, intermediate_size)");
  validate_weights(c);
  validate_activation(c);
}

bool check_finite_default() {
  const char* v = std::getenv("MOE_SFT_CHECK_FINITE");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

}  // namespace moe_sft::api

extern "C" {

void moe_sft_config_init(moe_sft_config* cfg) {
  if (cfg == nullptr) return;
  std::memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->lora_rank = 16;
  cfg->lora_alpha = 32.0f;
  cfg->max_cache_depth = 1;
  cfg->num_threads = 0;
  cfg->tp_count = 1;
  cfg->check_finite = moe_sft::api::check_finite_default();
  cfg->scale_dtype = MOE_SFT_DTYPE_F32;
  cfg->activation = MOE_SFT_ACTIVATION_SILU;
  cfg->swiglu_alpha = 1.702f;
  cfg->swiglu_limit = 7.0f;
}

}  // extern "C"
