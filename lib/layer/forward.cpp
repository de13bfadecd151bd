// Forward pass, as phases over one ForwardFrame (each phase one parallel_for over the shared pool):
//   1. gather_input_rows        the routed input rows in expert-sorted order           input_rows [rows, H]
//   2. lora_a_of_input          the LoRA down-projections of those rows                x·Ag^T, x·Au^T [rows, r]
//   3. gate_up_activation       per (expert, block of I): gate and up projections plus LoRA (and biases),
//                               then h = act(g, u) (silu(g)·u or the clamped SwiGLU)   activation [rows, I]
//   4. lora_a_of_activation     h·Ad^T                                                 [rows, r]
//   5. down_projection          per (expert, block of H): h·Wd^T over every part plus LoRA (and bias)
//                                                                                      expert_output [rows, H]
//   6. combine_tokens           per token: out[t] = sum_j routing_weight[t, j] · expert_output[row(t, j)]
// Everything a call needs (scratch, the cache record, task lists) is allocated before the first write, so
// running out of memory leaves the caller's output untouched; with check_finite the output is assembled in
// scratch and copied out only after it passed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "checks/finite_check.h"
#include "kernels/low_rank.h"
#include "kernels/weight_gemm.h"
#include "layer/moe_layer.h"
#include "layer/row_checks.h"
#include "layer/scratch_plan.h"
#include "layer/task_grid.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

using checks::Stage;
using kernels::GemmArgs;
using kernels::Strided;
using kernels::transpose_to_f32;

namespace {

// The forward's check_finite stages, in the order they are checked.
constexpr Stage kInput{1, 7, "input"}, kRoutingWeights{2, 7, "routing weights"}, kLoraWeights{3, 7, "LoRA weights"},
    kGateUp{4, 7, "gate/up projection"}, kActivation{5, 7, "activation"}, kDown{6, 7, "down projection"},
    kOutput{7, 7, "layer output"};

template <class T>
struct ForwardFrame {
  const LayerParts& layer;
  const ForwardCall& call;
  const LoraView<T> lora;  // rank 0 for a base-only pass
  const Routing& routing;
  const int64_t hidden, intermediate, rank, top_k, rows;
  const int64_t tile_elems;     // one projection tile: an expert's rows x kColBlock columns
  const int64_t dequant_elems;  // per worker, for quantized base weights
  const std::vector<ExpertTask> row_tasks;
  const ExpertGrid intermediate_grid, hidden_grid;
  ThreadPool* pool = nullptr;

  // Temporaries in scratch.
  bf16* input_rows;         // [rows, H]
  bf16* activation;         // [rows, I] h
  float* expert_output;     // [rows, H] y, before the routing weight
  float* projection_tiles;  // per worker: the gate tile, then the up tile, of one task
  float* token_sums;        // per worker [H]
  float* lora_b_block;      // per worker [r, kColBlock]: a block of a LoRA B, transposed to f32
  bf16* dequant_blocks;     // per worker [dequant_elems]
  bf16* output;             // the caller's output, or its staging copy with check_finite
  // What backward needs: in the cache record when saving, in scratch otherwise.
  bf16* gate;                // [rows, I] gate projection, bf16-rounded as the activation used it
  bf16* up;                  // [rows, I]
  float* input_gate_a;       // [rows, r] x·Ag^T
  float* input_up_a;         // [rows, r] x·Au^T
  float* activation_down_a;  // [rows, r] h·Ad^T

  ForwardFrame(const LayerParts& l, const ForwardCall& c, const LoraView<T>& v, const Routing& r)
      : layer(l), call(c), lora(v), routing(r), hidden(l.hidden), intermediate(l.intermediate), rank(v.rank),
        top_k(c.top_k), rows(r.rows()), tile_elems(r.max_expert_rows() * kernels::kColBlock),
        dequant_elems(l.kernels->scratch_elems(kernels::GemmOp::xwt, l.weight_format, std::max(l.hidden, l.intermediate))),
        row_tasks(row_chunks(r, kRowChunk)),
        intermediate_grid(r, column_blocks(l.parts, kernels::kColBlock)),
        hidden_grid(r, column_blocks(l.hidden, kernels::kColBlock)) {}

  const kernels::LowRankKernels& low_rank() const { return layer.kernels->low_rank; }
};

// Lays out the frame's temporaries; the saved tensors go to `record` when there is one.
template <class T>
ScratchPlan plan_scratch(ForwardFrame<T>& f, ForwardRecord* record) {
  const int64_t R = f.rows, H = f.hidden, I = f.intermediate, r = f.rank, threads = f.layer.threads;
  ScratchPlan plan;
  plan.place(f.input_rows, R * H);
  plan.place(f.activation, R * I);
  plan.place(f.expert_output, R * H);
  plan.place(f.projection_tiles, threads * 2 * f.tile_elems);
  plan.place(f.token_sums, threads * H);
  plan.place(f.lora_b_block, threads * r * kernels::kColBlock);
  plan.place(f.dequant_blocks, threads * f.dequant_elems);
  if (f.layer.check_finite)
    plan.place(f.output, f.call.tokens * H);
  else
    f.output = f.call.output;
  if (record == nullptr) {
    plan.place(f.gate, R * I);
    plan.place(f.up, R * I);
    plan.place(f.input_gate_a, R * r);
    plan.place(f.input_up_a, R * r);
    plan.place(f.activation_down_a, R * r);
    return plan;
  }
  record->routing_weights.assign(f.call.routing_weights, f.call.routing_weights + f.call.tokens * f.top_k);
  record->input.assign(f.call.input, f.call.input + f.call.tokens * H);
  record->gate.resize(size_t(R * I));
  record->up.resize(size_t(R * I));
  record->input_gate_a.resize(size_t(R * r));
  record->input_up_a.resize(size_t(R * r));
  record->activation_down_a.resize(size_t(R * r));
  f.gate = record->gate.data();
  f.up = record->up.data();
  f.input_gate_a = record->input_gate_a.data();
  f.input_up_a = record->input_up_a.data();
  f.activation_down_a = record->activation_down_a.data();
  return plan;
}

template <class T>
void check_inputs(const ForwardFrame<T>& f) {
  const ForwardCall& call = f.call;
  checks::check_tokens(call.input, call.tokens, f.hidden, "input", kInput);
  for (int64_t pair = 0; pair < call.tokens * f.top_k; ++pair)  // slots without an expert may hold anything
    if (f.routing.pair_row[pair] >= 0 && !std::isfinite(call.routing_weights[pair]))
      checks::throw_non_finite(call.routing_weights[pair], "routing weights", checks::token_slot(pair, f.top_k),
                               kRoutingWeights);
  if (f.rank == 0) return;
  const auto dims = lora_array_dims(LoraShape{f.hidden, f.intermediate, f.rank});
  for (size_t i = 0; i < dims.size(); ++i)
    checks::check_expert_array(f.lora.arrays[i], f.layer.experts, dims[i].rows, dims[i].cols,
                               std::string("LoRA weight ") + dims[i].name, kLoraWeights);
}

template <class T>
void gather_input_rows(const ForwardFrame<T>& f) {
  const int64_t R = f.rows, H = f.hidden, chunk = kRowChunk * 4;
  f.pool->parallel_for(chunks(R, chunk), f.layer.threads, [&](int64_t task, int) {
    for (int64_t row = task * chunk; row < std::min(R, (task + 1) * chunk); ++row)
      std::memcpy(f.input_rows + row * H, f.call.input + f.routing.row_pair[row] / f.top_k * H,
                  size_t(H) * sizeof(bf16));
  });
}

template <class T>
void lora_a_of_input(const ForwardFrame<T>& f) {
  const int64_t H = f.hidden, r = f.rank;
  f.pool->parallel_for(int64_t(f.row_tasks.size()), f.layer.threads, [&](int64_t i, int) {
    const ExpertTask& t = f.row_tasks[size_t(i)];
    const bf16* x = f.input_rows + t.row_begin * H;
    const auto dot = f.low_rank().template dot<T>();
    dot(t.rows(), r, H, x, H, f.lora.gate_a(t.expert), H, 1.0f, f.input_gate_a + t.row_begin * r, r, false);
    dot(t.rows(), r, H, x, H, f.lora.up_a(t.expert), H, 1.0f, f.input_up_a + t.row_begin * r, r, false);
  });
}

// out (an m x w tile, row stride w) += s · (x·A^T)[rows of the task] · B[block rows]^T; B's block is made
// row-contiguous f32 first, in the worker's lora_b_block.
template <class T, class Lora>
void add_lora_b(const ForwardFrame<T>& f, const ExpertTask& t, int worker, const float* x_a, const Lora* b_rows,
                int64_t width, float* out, int64_t ld) {
  const int64_t r = f.rank;
  float* block = f.lora_b_block + int64_t(worker) * r * kernels::kColBlock;
  transpose_to_f32(b_rows, width, r, r, block);
  f.low_rank().template axpy<float, float>()(t.rows(), width, r, x_a + t.row_begin * r, Strided{r, 1}, block, width,
                                             f.layer.lora_scale, out, ld, true);
}

// tile (m rows of `width` columns, row stride ld) += biases[at .. at + width) on every row; nothing when the
// layer has no such bias (empty).
void add_bias(const std::vector<float>& biases, int64_t at, int64_t m, int64_t width, float* tile, int64_t ld) {
  if (biases.empty()) return;
  const float* bias = biases.data() + at;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t c = 0; c < width; ++c) tile[j * ld + c] += bias[c];
}

template <class T>
void gate_up_activation(const ForwardFrame<T>& f) {
  const LayerParts& layer = f.layer;
  const int64_t H = f.hidden, I = f.intermediate;
  f.pool->parallel_for(f.intermediate_grid.size(), layer.threads, [&](int64_t i, int worker) {
    const ExpertTask t = f.intermediate_grid[i];
    const ColumnBlock& b = *t.block;
    const ExpertPart& part = layer.parts[size_t(b.part)];
    const int64_t m = t.rows(), w = b.width(), e = t.expert;
    float* gate_tile = f.projection_tiles + int64_t(worker) * 2 * f.tile_elems;
    float* up_tile = gate_tile + f.tile_elems;
    const bf16* x = f.input_rows + t.row_begin * H;
    bf16* dequant = f.dequant_blocks + worker * f.dequant_elems;
    kernels::gemm_xwt(*layer.kernels, GemmArgs{x, H, m, &part.gate[size_t(e)], b.local, b.local + w, gate_tile, w,
                                               false, dequant});
    kernels::gemm_xwt(*layer.kernels, GemmArgs{x, H, m, &part.up[size_t(e)], b.local, b.local + w, up_tile, w,
                                               false, dequant});
    if (f.rank > 0) {
      add_lora_b(f, t, worker, f.input_gate_a, f.lora.gate_b(e) + b.begin * f.rank, w, gate_tile, w);
      add_lora_b(f, t, worker, f.input_up_a, f.lora.up_b(e) + b.begin * f.rank, w, up_tile, w);
    }
    add_bias(layer.biases.gate, e * I + b.begin, m, w, gate_tile, w);
    add_bias(layer.biases.up, e * I + b.begin, m, w, up_tile, w);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t at = (t.row_begin + j) * I + b.begin;
      layer.activation.forward(gate_tile + j * w, up_tile + j * w, w, f.gate + at, f.up + at, f.activation + at);
    }
  });
}

template <class T>
void lora_a_of_activation(const ForwardFrame<T>& f) {
  const int64_t I = f.intermediate, r = f.rank;
  f.pool->parallel_for(int64_t(f.row_tasks.size()), f.layer.threads, [&](int64_t i, int) {
    const ExpertTask& t = f.row_tasks[size_t(i)];
    f.low_rank().template dot<T>()(t.rows(), r, I, f.activation + t.row_begin * I, I, f.lora.down_a(t.expert), I,
                                   1.0f, f.activation_down_a + t.row_begin * r, r, false);
  });
}

// Per (expert, block of H), summing the parts' slices of I.
template <class T>
void down_projection(const ForwardFrame<T>& f) {
  const LayerParts& layer = f.layer;
  const int64_t H = f.hidden, I = f.intermediate;
  f.pool->parallel_for(f.hidden_grid.size(), layer.threads, [&](int64_t i, int worker) {
    const ExpertTask t = f.hidden_grid[i];
    const ColumnBlock& b = *t.block;
    const int64_t m = t.rows(), e = t.expert;
    float* y = f.expert_output + t.row_begin * H + b.begin;
    for (size_t p = 0; p < layer.parts.size(); ++p)
      kernels::gemm_xwt(*layer.kernels,
                        GemmArgs{f.activation + t.row_begin * I + layer.parts[p].i_begin, I, m,
                                 &layer.parts[p].down[size_t(e)], b.begin, b.end, y, H, p > 0,
                                 f.dequant_blocks + worker * f.dequant_elems});
    if (f.rank > 0) add_lora_b(f, t, worker, f.activation_down_a, f.lora.down_b(e) + b.begin * f.rank, b.width(), y, H);
    add_bias(layer.biases.down, e * H + b.begin, m, b.width(), y, H);
  });
}

template <class T>
void combine_tokens(const ForwardFrame<T>& f) {
  const int64_t H = f.hidden, k = f.top_k;
  for_each_token_sum(*f.pool, f.layer.threads, f.call.tokens, f.token_sums, H, [&](int64_t tok, float* sum) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = f.routing.pair_row[tok * k + j];
      if (row < 0) continue;
      const float weight = f.call.routing_weights[tok * k + j];
      for (int64_t c = 0; c < H; ++c) sum[c] += weight * f.expert_output[row * H + c];
    }
    for (int64_t c = 0; c < H; ++c) f.output[tok * H + c] = to_bf16(sum[c]);
  });
}

// The whole pass on a laid-out frame: the phases, with check_finite's checks where their stage ends.
template <class T>
void run_phases(const ForwardFrame<T>& f) {
  const bool check = f.layer.check_finite;
  gather_input_rows(f);
  if (f.rank > 0) lora_a_of_input(f);
  gate_up_activation(f);
  if (check) {
    check_rows(f.gate, f.intermediate, f.routing, "gate projection output", kGateUp);
    check_rows(f.up, f.intermediate, f.routing, "up projection output", kGateUp);
    check_rows(f.activation, f.intermediate, f.routing, "activation output", kActivation);
  }
  if (f.rank > 0) lora_a_of_activation(f);
  down_projection(f);
  if (check) check_rows(f.expert_output, f.hidden, f.routing, "down projection output", kDown);
  combine_tokens(f);
  if (check) {
    checks::check_tokens(f.output, f.call.tokens, f.hidden, "layer output", kOutput);
    if (f.call.tokens > 0)  // (an empty output may be NULL)
      std::memcpy(f.call.output, f.output, size_t(f.call.tokens * f.hidden) * sizeof(bf16));
  }
}

}  // namespace

template <class T>
void run_forward(const LayerParts& layer, const LoraView<T>& lora, const ForwardCall& call, ForwardCache& cache) {
  Routing routing = Routing::build(call.tokens, call.top_k, layer.experts, call.expert_ids);
  ForwardFrame<T> frame(layer, call, lora, routing);
  if (layer.check_finite) check_inputs(frame);
  const bool save = call.save_for_backward;
  ForwardRecord record = save ? cache.take_spare() : ForwardRecord{};
  const ScratchPlan plan = plan_scratch(frame, save ? &record : nullptr);
  if (save) cache.reserve(cache.depth() + 1);  // so that the final push cannot fail

  auto session = Runtime::instance().session(layer.threads);
  frame.pool = &session.pool();
  plan.bind(session.arena().frame(plan.layout()));
  run_phases(frame);

  if (save) {
    record.routing = std::move(routing);
    record.with_adapters = frame.rank > 0;
    cache.push(std::move(record));
  }
}

template void run_forward<float>(const LayerParts&, const LoraView<float>&, const ForwardCall&, ForwardCache&);
template void run_forward<bf16>(const LayerParts&, const LoraView<bf16>&, const ForwardCall&, ForwardCache&);

}  // namespace moe_sft::layer
