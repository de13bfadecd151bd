#include "layer/expert_part.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "kernels/gemm.h"
#include "kernels/minifloat.h"
#include "kernels/quantize.h"
#include "checks/finite_check.h"
#include "runtime/numa.h"
#include "runtime/error.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

using checks::check_expert_array;
using kernels::PackedMatrix;
using kernels::QuantizedSource;
using kernels::WeightFormat;

namespace {

// Splits [0, I) into `count` parts on multiples of `granule` (a format's scale block along I: down_proj's
// groups run along I, gate/up's fp8 row blocks too, and must not straddle parts; the last granule may be
// partial), and on multiples of `block` too when that leaves no part empty (the kernels then never see a
// partial block inside a part); validation guarantees ceil(I / granule) >= count.
std::vector<int64_t> part_bounds(int64_t I, int64_t count, int64_t block, int64_t granule) {
  int64_t unit = std::lcm(block, granule);
  if ((I + unit - 1) / unit < count) unit = granule;
  const int64_t units = (I + unit - 1) / unit;
  std::vector<int64_t> bounds(size_t(count) + 1);
  for (int64_t p = 0; p <= count; ++p) bounds[size_t(p)] = p < count ? units * p / count * unit : I;
  return bounds;
}

// One projection [E, rows, cols] as the caller gave it.
struct Projection {
  const char* name;
  int64_t rows, cols;
  BaseWeights source;
};

// The shape of a projection's matrix (one expert's) in the config's format.
QuantizedSource source_shape(const LayerConfig& cfg, int64_t rows, int64_t cols) {
  return QuantizedSource::shape(cfg.weight_format, rows, cols, cfg.group_size, cfg.block_rows, cfg.block_cols,
                                cfg.fp8_scale_type);
}

const checks::Stage kCreateStage{1, 1, "base weights, checked at create"};

std::string hex_byte(int v) {
  const char* digits = "0123456789abcdef";
  return std::string("0x") + digits[(v >> 4) & 0xF] + digits[v & 0xF];
}

[[noreturn]] void refuse_weight(const std::string& what, const std::string& name, int64_t e, const std::string& where) {
  throw Error(MOE_SFT_ERR_NON_FINITE, what + " in " + name + " at expert " + std::to_string(e) + ", " + where +
                                          " (stage " + std::to_string(kCreateStage.number) + " of " +
                                          std::to_string(kCreateStage.of) + ": " + kCreateStage.name + ")");
}

std::string row_column(int64_t r, int64_t c) { return "row " + std::to_string(r) + ", column " + std::to_string(c); }

// "rows r0..r1, columns c0..c1" of scale (sr, g): the block of the matrix it covers.
std::string scale_block(const QuantizedSource& src, int64_t sr, int64_t g) {
  const int64_t r0 = sr * src.block_rows, r1 = std::min(src.rows, r0 + src.block_rows) - 1;
  const int64_t c0 = g * src.group, c1 = std::min(src.cols, c0 + src.group) - 1;
  const std::string rows =
      r0 == r1 ? "row " + std::to_string(r0) : "rows " + std::to_string(r0) + ".." + std::to_string(r1);
  return rows + ", columns " + std::to_string(c0) + ".." + std::to_string(c1);
}

// check_finite on one expert's matrix in a minifloat format: the first non-finite or zero scale, NaN code or
// (mxfp4) value beyond bf16's range, named by expert, row and column (a scale by the block it covers).
void check_minifloat_source(const QuantizedSource& src, const char* name, int64_t e) {
  const bool fp4 = src.format == kernels::WeightFormat::mxfp4;
  for (int64_t sr = 0; sr < src.scale_rows(); ++sr)
    for (int64_t g = 0; g < src.groups(); ++g) {
      const float s = src.scale_of(sr * src.block_rows, g);
      if (std::isfinite(s) && s != 0.0f) continue;
      const std::string value = fp4 ? "nan (e8m0 byte 255)"
                                : std::isnan(s) ? "nan"
                                : s == 0.0f     ? "0"
                                                : (s > 0 ? "inf" : "-inf");
      const std::string at = " (scale[" + std::to_string(sr) + ", " + std::to_string(g) + "])";
      refuse_weight(std::string(s == 0.0f ? "zero" : "non-finite") + " scale " + value + at,
                    std::string(name) + " scales", e, scale_block(src, sr, g));
    }
  for (int64_t r = 0; r < src.rows; ++r)
    for (int64_t c = 0; c < src.cols; ++c) {
      const int code = src.code(r, c);
      if (!fp4 && kernels::e4m3_is_nan(uint8_t(code)))
        refuse_weight("NaN code " + hex_byte(code) + " (e4m3)", name, e, row_column(r, c));
      if (!fp4) continue;
      const float v = to_float(to_bf16(kernels::e2m1_value(uint8_t(code)) * src.scale_of(r, c / src.group)));
      if (!std::isfinite(v))
        refuse_weight("non-finite value " + std::string(v > 0 ? "inf" : "-inf") + " (e2m1 code " + hex_byte(code) +
                          " times 2^(" + std::to_string(int(src.raw_scale(r, c / src.group))) +
                          " - 127) is beyond bf16)",
                      name, e, row_column(r, c));
    }
}

// Base weights are frozen: checked once, here. Weights about to be quantized are always checked: a NaN
// has no quantized value. Pre-quantized minifloat weights are checked per expert as they are packed.
void check_base_weights(const LayerConfig& cfg, const Projection (&projections)[3]) {
  const WeightFormat f = cfg.weight_format;
  for (const Projection& p : projections) {
    if (!cfg.prequantized) {
      check_expert_array(static_cast<const bf16*>(p.source.weights), cfg.experts, p.rows, p.cols, p.name, kCreateStage);
    } else if (cfg.check_finite && !kernels::is_minifloat(f)) {
      const QuantizedSource shape = source_shape(cfg, p.rows, p.cols);
      const std::string name = std::string(p.name) + " scales";
      const int64_t rows = shape.scale_rows(), cols = shape.groups();
      if (shape.scale_type == kernels::ScaleType::bf16)
        check_expert_array(static_cast<const bf16*>(p.source.scale), cfg.experts, rows, cols, name, kCreateStage);
      else
        check_expert_array(static_cast<const float*>(p.source.scale), cfg.experts, rows, cols, name, kCreateStage);
    }
  }
}

// Expert e's matrix of a projection in the pre-quantized layout: the caller's, or `quantized` filled
// from the caller's bf16.
struct QuantizedBuffers {
  std::vector<uint8_t> weights, zero;
  std::vector<float> scale;
};

QuantizedSource expert_source(const LayerConfig& cfg, const Projection& p, int64_t e, QuantizedBuffers& buffers) {
  const WeightFormat f = cfg.weight_format;
  QuantizedSource src = source_shape(cfg, p.rows, p.cols);
  const int64_t scales = src.scale_count();
  if (cfg.prequantized) {
    src.weights = static_cast<const uint8_t*>(p.source.weights) + e * src.weight_bytes();
    src.scale = static_cast<const uint8_t*>(p.source.scale) + e * scales * QuantizedSource::scale_bytes(src.scale_type);
    src.zero = p.source.zero ? p.source.zero + e * scales : nullptr;
    return src;
  }
  buffers.weights.assign(size_t(src.weight_bytes()), 0);
  buffers.scale.resize(size_t(scales));  // f32 slots: room for any scale type
  buffers.zero.resize(f == WeightFormat::int4_awq ? size_t(scales) : 0);
  src.weights = buffers.weights.data();
  src.scale = buffers.scale.data();
  src.zero = buffers.zero.empty() ? nullptr : buffers.zero.data();
  const bf16* w = static_cast<const bf16*>(p.source.weights) + e * p.rows * p.cols;
  if (kernels::is_minifloat(f)) kernels::quantize_blocks(w, src);
  else kernels::quantize(f, cfg.group_size, p.rows, p.cols, w, buffers.weights.data(), buffers.scale.data(),
                         buffers.zero.empty() ? nullptr : buffers.zero.data());
  return src;
}

}  // namespace

FrozenBiases copy_biases(const LayerConfig& cfg) {
  const checks::Stage stage{1, 1, "base weights, checked at create"};
  auto copy = [&](const float* bias, int64_t cols, const char* name) {
    if (bias == nullptr) return std::vector<float>();
    const checks::NonFinite hit = cfg.check_finite ? checks::first_non_finite(bias, cfg.experts * cols)
                                                   : checks::NonFinite{};
    if (hit.found)
      checks::throw_non_finite(hit.value, name, "expert " + std::to_string(hit.index / cols) + ", column " +
                                                    std::to_string(hit.index % cols), stage);
    return std::vector<float>(bias, bias + cfg.experts * cols);
  };
  return {copy(cfg.gate_bias, cfg.intermediate, "gate_bias"), copy(cfg.up_bias, cfg.intermediate, "up_bias"),
          copy(cfg.down_bias, cfg.hidden, "down_bias")};
}

std::vector<ExpertPart> pack_expert_parts(const LayerConfig& cfg, int threads) {
  const int64_t E = cfg.experts, H = cfg.hidden, I = cfg.intermediate;
  const WeightFormat f = cfg.weight_format;
  const Projection projections[3] = {{"gate_proj", I, H, cfg.gate}, {"up_proj", I, H, cfg.up},
                                     {"down_proj", H, I, cfg.down}};
  if (cfg.check_finite || f != WeightFormat::bf16) check_base_weights(cfg, projections);

  // Parts start on whole scale blocks: down_proj's groups along I, and fp8's row blocks of gate/up.
  const int64_t granule = f == WeightFormat::fp8_e4m3_block ? std::lcm(cfg.block_rows, cfg.block_cols)
                          : kernels::has_groups(f)          ? cfg.group_size
                                                            : 1;
  const std::vector<int64_t> bounds = part_bounds(I, cfg.tp_count, kernels::kColBlock, granule);
  const int64_t group = source_shape(cfg, 1, 1).group;
  std::vector<ExpertPart> parts(size_t(cfg.tp_count));
  const int nodes = numa_topology().nodes();
  auto bytes = [&](int64_t rows, int64_t cols) {
    return PackedMatrix::storage_bytes(f, rows, cols, group, f == WeightFormat::fp8_e4m3_block ? cfg.block_rows : 1);
  };
  for (size_t p = 0; p < parts.size(); ++p) {
    ExpertPart& part = parts[p];
    part.i_begin = bounds[p];
    part.i_end = bounds[p + 1];
    part.numa_node = nodes > 1 ? int(p) % nodes : -1;
    part.gate.resize(size_t(E));
    part.up.resize(size_t(E));
    part.down.resize(size_t(E));
    part.storage = kernels::PackedStorage(E * (2 * bytes(part.width(), H) + bytes(H, part.width())), part.numa_node);
  }

  auto session = Runtime::instance().session(threads);
  session.pool().parallel_for(E, threads, [&](int64_t e, int) {
    QuantizedBuffers buffers;  // an expert's matrix quantized from bf16, reused by its three projections
    for (int which = 0; which < 3; ++which) {
      const Projection& proj = projections[which];
      const bool quantized = f != WeightFormat::bf16;
      const QuantizedSource src = quantized ? expert_source(cfg, proj, e, buffers) : QuantizedSource{};
      if (quantized && cfg.prequantized && cfg.check_finite && kernels::is_minifloat(f))
        check_minifloat_source(src, proj.name, e);
      const bf16* src_bf16 = quantized ? nullptr : static_cast<const bf16*>(proj.source.weights) + e * proj.rows * proj.cols;
      for (ExpertPart& part : parts) {
        const int64_t i0 = part.i_begin, w = part.width(), gate_bytes = bytes(w, H);
        std::byte* at = part.storage.data() + e * (2 * gate_bytes + bytes(H, w)) + which * gate_bytes;
        std::vector<PackedMatrix>& out = which == 0 ? part.gate : which == 1 ? part.up : part.down;
        if (which < 2)  // rows [i0, i0 + w) of [I, H]
          out[size_t(e)] = quantized ? PackedMatrix(src, i0, w, 0, H, at) : PackedMatrix(src_bf16 + i0 * H, w, H, H, at);
        else  // columns [i0, i0 + w) of [H, I]
          out[size_t(e)] = quantized ? PackedMatrix(src, 0, H, i0, w, at) : PackedMatrix(src_bf16 + i0, H, w, I, at);
      }
    }
  });
  return parts;
}

}  // namespace moe_sft::layer
