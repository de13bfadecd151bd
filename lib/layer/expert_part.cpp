#include "layer/expert_part.h"

#include "kernels/gemm.h"
#include "kernels/quantize.h"
#include "checks/finite_check.h"
#include "runtime/numa.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

using checks::check_expert_array;
using kernels::PackedMatrix;
using kernels::QuantizedSource;
using kernels::WeightFormat;

namespace {

// Splits [0, I) into `count` parts on multiples of `granule` (the int4 formats' group: down_proj's groups
// run along I and must not straddle parts), and on multiples of `block` too when that leaves no part
// empty (the kernels then never see a partial block inside a part); validation guarantees I / granule >=
// count.
std::vector<int64_t> part_bounds(int64_t I, int64_t count, int64_t block, int64_t granule) {
  int64_t unit = block;
  while (unit % granule != 0) unit += block;  // lcm(block, granule)
  if (I / unit < count) unit = granule;
  std::vector<int64_t> bounds(size_t(count) + 1);
  for (int64_t p = 0; p <= count; ++p) bounds[size_t(p)] = p < count ? I * p / count / unit * unit : I;
  return bounds;
}

// One projection [E, rows, cols] as the caller gave it.
struct Projection {
  const char* name;
  int64_t rows, cols;
  BaseWeights source;
};

// Base weights are frozen: checked once, here. Weights about to be quantized are always checked: a NaN
// has no quantized value.
void check_base_weights(const LayerConfig& cfg, const Projection (&projections)[3]) {
  const checks::Stage stage{1, 1, "base weights, checked at create"};
  const WeightFormat f = cfg.weight_format;
  for (const Projection& p : projections) {
    if (!cfg.prequantized) {
      check_expert_array(static_cast<const bf16*>(p.source.weights), cfg.experts, p.rows, p.cols, p.name, stage);
    } else if (cfg.check_finite) {
      const int64_t per_row = QuantizedSource::scale_row_elems(f, p.cols, cfg.group_size);
      const std::string name = std::string(p.name) + " scales";
      if (f == WeightFormat::int4_k2)
        check_expert_array(static_cast<const bf16*>(p.source.scale), cfg.experts, p.rows, per_row, name, stage);
      else
        check_expert_array(static_cast<const float*>(p.source.scale), cfg.experts, p.rows, per_row, name, stage);
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
  const int64_t group = kernels::has_groups(f) ? cfg.group_size : p.cols;
  const int64_t row_bytes = QuantizedSource::weight_row_bytes(f, p.cols);
  const int64_t scales = p.rows * QuantizedSource::scale_row_elems(f, p.cols, cfg.group_size);
  if (cfg.prequantized) {
    return {f, p.rows, p.cols, group, static_cast<const uint8_t*>(p.source.weights) + e * p.rows * row_bytes,
            static_cast<const uint8_t*>(p.source.scale) + e * scales * QuantizedSource::scale_bytes(f), p.source.zero ? p.source.zero + e * scales : nullptr};
  }
  buffers.weights.assign(size_t(p.rows * row_bytes), 0);
  buffers.scale.resize(size_t(scales));
  buffers.zero.resize(f == WeightFormat::int4_awq ? size_t(scales) : 0);
  kernels::quantize(f, cfg.group_size, p.rows, p.cols, static_cast<const bf16*>(p.source.weights) + e * p.rows * p.cols,
                    buffers.weights.data(), buffers.scale.data(), buffers.zero.empty() ? nullptr : buffers.zero.data());
  return {f, p.rows, p.cols, group, buffers.weights.data(), buffers.scale.data(),
          buffers.zero.empty() ? nullptr : buffers.zero.data()};
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

  const int64_t group = kernels::has_groups(f) ? cfg.group_size : 1;
  const std::vector<int64_t> bounds = part_bounds(I, cfg.tp_count, kernels::kColBlock, group);
  std::vector<ExpertPart> parts(size_t(cfg.tp_count));
  const int nodes = numa_topology().nodes();
  auto bytes = [&](int64_t rows, int64_t cols) { return PackedMatrix::storage_bytes(f, rows, cols, cfg.group_size); };
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
