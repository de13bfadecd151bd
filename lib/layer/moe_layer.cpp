#include "layer/moe_layer.h"

#include <algorithm>

#include "layer/finite_check.h"
#include "runtime/error.h"
#include "runtime/numa.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

namespace {

// Splits [0, I) into `count` parts, on multiples of `block` when that leaves no part empty (the kernels
// then never see a partial block inside a part), evenly otherwise. Divisibility is never required.
std::vector<int64_t> part_bounds(int64_t I, int64_t count, int64_t block) {
  std::vector<int64_t> bounds(size_t(count) + 1);
  const bool blocked = I / block >= count;
  for (int64_t p = 0; p <= count; ++p) {
    int64_t even = I * p / count;
    bounds[size_t(p)] = (blocked && p < count) ? even / block * block : even;
  }
  return bounds;
}

// Base weights are frozen: checked once, here, when check_finite is on.
void check_base_weights(const moe_sft_config& cfg) {
  const int64_t E = cfg.expert_num, H = cfg.hidden_size, I = cfg.intermediate_size;
  const struct {
    const uint16_t* data;
    const char* name;
    int64_t rows, cols;
  } weights[] = {{cfg.gate_proj, "gate_proj", I, H}, {cfg.up_proj, "up_proj", I, H}, {cfg.down_proj, "down_proj", H, I}};
  for (const auto& w : weights)
    check_expert_array(as_bf16(w.data), E, w.rows, w.cols, w.name, Stage{1, 1, "base weights, checked at create"});
}

}  // namespace

MoELayer::MoELayer(const moe_sft_config& cfg)
    : experts_(cfg.expert_num),
      hidden_(cfg.hidden_size),
      intermediate_(cfg.intermediate_size),
      rank_(cfg.lora_rank),
      lora_scale_(cfg.lora_rank > 0 ? cfg.lora_alpha / float(cfg.lora_rank) : 0.0f),
      max_cache_depth_(cfg.max_cache_depth),
      threads_(Runtime::resolve_threads(cfg.num_threads)),
      check_finite_(cfg.check_finite != 0),
      kernels_(&kernels::select_kernels()) {
  const int64_t E = experts_, H = hidden_, I = intermediate_;
  if (check_finite_) check_base_weights(cfg);
  const std::vector<int64_t> bounds = part_bounds(I, cfg.tp_count, kernels::kColBlock);
  parts_.resize(size_t(cfg.tp_count));
  const int nodes = numa_topology().nodes();
  for (size_t p = 0; p < parts_.size(); ++p) {
    ExpertPart& part = parts_[p];
    part.i_begin = bounds[p];
    part.i_end = bounds[p + 1];
    part.numa_node = nodes > 1 ? int(p) % nodes : -1;
    part.gate.resize(size_t(E));
    part.up.resize(size_t(E));
    part.down.resize(size_t(E));
    const int64_t per_expert = 2 * kernels::PackedMatrix::storage_elems(part.width(), H) +
                               kernels::PackedMatrix::storage_elems(H, part.width());
    part.storage = kernels::PackedStorage(E * per_expert, part.numa_node);
  }
  const bf16* gate = as_bf16(cfg.gate_proj);
  const bf16* up = as_bf16(cfg.up_proj);
  const bf16* down = as_bf16(cfg.down_proj);
  auto session = Runtime::instance().session(threads_);
  session.pool().parallel_for(int64_t(parts_.size()) * E, threads_, [&](int64_t task, int) {
    ExpertPart& part = parts_[size_t(task / E)];
    const int64_t e = task % E, i0 = part.i_begin, w = part.width();
    const int64_t gate_elems = kernels::PackedMatrix::storage_elems(w, H);
    bf16* at = part.storage.data() + e * (2 * gate_elems + kernels::PackedMatrix::storage_elems(H, w));
    part.gate[size_t(e)] = kernels::PackedMatrix(gate + (e * I + i0) * H, w, H, H, at);
    part.up[size_t(e)] = kernels::PackedMatrix(up + (e * I + i0) * H, w, H, H, at + gate_elems);
    part.down[size_t(e)] = kernels::PackedMatrix(down + e * H * I + i0, H, w, I, at + 2 * gate_elems);
  });
}

void MoELayer::bind_lora(const moe_sft_lora& lora) {
  if (rank_ == 0) throw Error(MOE_SFT_ERR_INVALID_ARGUMENT, "the layer was created with lora_rank = 0: it has no LoRA weights to bind");
  lora_ = lora;
  lora_bound_ = true;
}

template <class Fn>
void MoELayer::with_bound_lora(Fn&& fn) const {
  if (rank_ == 0) {
    fn(LoraView<float>{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, lora_shape()});
    return;
  }
  if (!lora_bound_)
    throw Error(MOE_SFT_ERR_INVALID_ARGUMENT,
                "LoRA weights are not bound: call moe_sft_update_lora first (lora_rank = " +
                    std::to_string(rank_) + ")");
  with_lora_view(lora_, lora_shape(), fn);
}

void MoELayer::forward(const ForwardCall& call) {
  if (call.save_for_backward && cache_.depth() >= max_cache_depth_)
    throw Error(MOE_SFT_ERR_CACHE_FULL, "save_for_backward = 1, but " + std::to_string(cache_.depth()) +
                                            " saved forward(s) already await backward (max_cache_depth = " +
                                            std::to_string(max_cache_depth_) + ")");
  with_bound_lora([&](const auto& lora) { forward_with(lora, call); });
}

void MoELayer::backward(const BackwardCall& call) {
  if (cache_.empty())
    throw Error(MOE_SFT_ERR_CACHE_EMPTY,
                "no saved forward awaits backward (call forward with save_for_backward = 1 first)");
  with_bound_lora([&](const auto& lora) { backward_with(lora, call); });
}

}  // namespace moe_sft::layer
