// One tensor-parallel part of the layer: the slice [i_begin, i_end) of the intermediate dimension, with
// its own packed slices of every expert's base weights (packed from the caller's full arrays at create:
// the caller never partitions anything). With tp_count = 1 there is one part covering all of I. On a
// machine with several NUMA nodes, part p lives on node p mod nodes.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/packed_matrix.h"
#include "layer/layer_config.h"

namespace moe_sft::layer {

struct ExpertPart {
  int64_t i_begin = 0, i_end = 0;
  int numa_node = -1;  // node holding this part's weights and running its tasks (-1: one-node machine)
  kernels::PackedStorage storage;           // one block holding all the matrices below
  std::vector<kernels::PackedMatrix> gate;  // per expert: rows [i_begin, i_end) of gate_proj[e], [I_p, H]
  std::vector<kernels::PackedMatrix> up;    // per expert: rows of up_proj[e], [I_p, H]
  std::vector<kernels::PackedMatrix> down;  // per expert: columns [i_begin, i_end) of down_proj[e], [H, I_p]

  int64_t width() const { return i_end - i_begin; }
};

// The frozen biases, copied at create: each empty (no bias) or all experts' stacked, f32. Every tensor-parallel
// part reads them at its global columns.
struct FrozenBiases {
  std::vector<float> gate, up;  // [E, I]
  std::vector<float> down;      // [E, H]
};

// cfg's biases copied; with cfg.check_finite a NaN/Inf is Error(NON_FINITE) naming the bias, expert and column.
FrozenBiases copy_biases(const LayerConfig& cfg);

// The tp_count parts of a validated config, every expert's weights packed (and, from bf16, quantized)
// in cfg.weight_format, on `threads` workers. Throws Error(NON_FINITE) for a non-finite weight (or scale)
// when cfg.check_finite is set, and always for bf16 weights that are to be quantized.
std::vector<ExpertPart> pack_expert_parts(const LayerConfig& cfg, int threads);

}  // namespace moe_sft::layer
