// Backward pass of the most recent saved forward. With dO = grad_output rows (expert-sorted, unweighted)
// and w the routing weight of each row:
//   D   = dO·Wd + s (dO·Bd)·Ad            [rows, I]  grad of h, before the routing weight
//   grad_routing_weight = <D, h> (+ <dO, bd> with a down bias)   (= <dO, y>: the router's gradient)
//   dH  = w·D;  dG, dU = activation grads of dH
//   dX  = dG·Wg + dU·Wu + s (dG·Bg)·Ag + s (dU·Bu)·Au    [rows, H], summed per token into grad_input
// LoRA grads (summed over each expert's rows):
//   dAd = s (w·dO·Bd)^T h     dBd = s dO^T (w·h·Ad^T)
//   dAg = s (dG·Bg)^T x       dBg = s dG^T (x·Ag^T)        (up alike)
// Phases over one BackwardFrame (each one parallel_for over the shared pool):
//   1. gather_rows                 x and dO rows in expert-sorted order
//   2. lora_products_of_grad_output   dO·Bd, and w·dO·Bd, w·h·Ad^T for the down grads; <dO, bd> per row
//   3. activation_backward         per (expert, block of I): D, the router's partial dot products, dG and dU;
//                                  dAd, dBg, dBu
//   4. lora_products_of_grad_gate_up  dG·Bg, dU·Bu
//   5. input_grads                 per (expert, block of H): dX; dAg, dAu, dBd
//   6. combine_tokens              per token: grad_input and grad_routing_weights
// Each LoRA-grad slice is written by exactly one task. With check_finite, every output is computed into
// scratch and copied out only after it passed the checks.
#include <algorithm>
#include <array>
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

namespace {

// The backward's check_finite stages, in the order they are checked.
constexpr Stage kGradOutput{1, 5, "grad_output"}, kGradIntermediate{2, 5, "grad of the intermediate"},
    kGradInput{3, 5, "grad_input"}, kGradWeights{4, 5, "grad_routing_weights"}, kLoraGrads{5, 5, "LoRA grads"};

template <class T>
struct BackwardFrame {
  const LayerParts& layer;
  const BackwardCall& call;
  const LoraView<T> lora;  // rank 0 for the backward of a base-only forward
  const ForwardRecord& saved;
  const Routing& routing;
  const int64_t hidden, intermediate, rank, top_k, tokens, rows;
  const int64_t tile_elems;  // one tile: an expert's rows x kColBlock columns
  const bool want_lora_grads;
  const bool accumulate;  // add into lora_grads (false with check_finite: the staged grads start from zero)
  const ExpertGrid intermediate_grid, hidden_grid;
  const std::vector<ExpertTask> row_tasks;
  const int64_t intermediate_blocks;
  const int64_t repack_elems;  // per worker, for d·W
  const LoraShape lora_shape;  // of the caller's grad arrays
  ThreadPool* pool = nullptr;

  // Temporaries in scratch.
  bf16* input_rows;                 // [rows, H] x (only when LoRA grads are wanted: dAg, dAu read it)
  bf16* grad_output_rows;           // [rows, H] dO
  bf16* grad_gate;                  // [rows, I] dG
  bf16* grad_up;                    // [rows, I] dU
  float* grad_input_rows;           // [rows, H] dX
  float* routing_grad_parts;        // [rows, intermediate_blocks] <D, h> over one block of I
  float* down_bias_dots;            // [rows] <dO, bd> (with a down bias only)
  float* grad_output_down_b;        // [rows, r] dO·Bd
  float* weighted_grad_output_down_b;  // [rows, r] w·dO·Bd
  float* weighted_activation_down_a;   // [rows, r] w·h·Ad^T
  float* grad_gate_gate_b;          // [rows, r] dG·Bg
  float* grad_up_up_b;              // [rows, r] dU·Bu
  float* tiles;                     // per worker: the D tile, then the h tile, of one task
  float* token_sums;                // per worker [H]
  bf16* repack_blocks;              // per worker [repack_elems]
  // The outputs: the caller's, or their staging copies with check_finite.
  bf16* grad_input;
  float* grad_routing_weights;
  LoraGradView lora_grads;

  BackwardFrame(const LayerParts& l, const BackwardCall& c, const LoraView<T>& v, const ForwardRecord& s)
      : layer(l), call(c), lora(v), saved(s), routing(s.routing), hidden(l.hidden), intermediate(l.intermediate),
        rank(v.rank), top_k(s.routing.top_k), tokens(s.routing.qlen), rows(s.routing.rows()),
        tile_elems(s.routing.max_expert_rows() * kernels::kColBlock),
        want_lora_grads(v.rank > 0 && c.lora_grads != nullptr), accumulate(c.accumulate && !l.check_finite),
        intermediate_grid(s.routing, column_blocks(l.parts, kernels::kColBlock)),
        hidden_grid(s.routing, column_blocks(l.hidden, kernels::kColBlock)), row_tasks(row_chunks(s.routing, kRowChunk)),
        intermediate_blocks(intermediate_grid.block_count()), repack_elems(repack_scratch_elems(l)),
        lora_shape{l.hidden, l.intermediate, l.rank} {}

  static int64_t repack_scratch_elems(const LayerParts& l) {
    int64_t widest_part = 0;
    for (const ExpertPart& part : l.parts) widest_part = std::max(widest_part, part.width());
    return l.kernels->scratch_elems(kernels::GemmOp::xw, l.weight_format, std::max(l.hidden, widest_part));
  }
  const kernels::LowRankKernels& low_rank() const { return layer.kernels->low_rank; }
  float routing_weight(int64_t row) const { return saved.routing_weights[size_t(routing.row_pair[row])]; }
};

template <class T>
ScratchPlan plan_scratch(BackwardFrame<T>& f) {
  const int64_t R = f.rows, H = f.hidden, I = f.intermediate, r = f.rank, threads = f.layer.threads;
  const bool check = f.layer.check_finite;
  ScratchPlan plan;
  plan.place(f.input_rows, f.want_lora_grads ? R * H : 0);
  plan.place(f.grad_output_rows, R * H);
  plan.place(f.grad_gate, R * I);
  plan.place(f.grad_up, R * I);
  plan.place(f.grad_input_rows, R * H);
  plan.place(f.routing_grad_parts, R * f.intermediate_blocks);
  plan.place(f.down_bias_dots, f.layer.biases.down.empty() ? 0 : R);
  plan.place(f.grad_output_down_b, R * r);
  plan.place(f.weighted_grad_output_down_b, R * r);
  plan.place(f.weighted_activation_down_a, R * r);
  plan.place(f.grad_gate_gate_b, R * r);
  plan.place(f.grad_up_up_b, R * r);
  plan.place(f.tiles, threads * 2 * f.tile_elems);
  plan.place(f.token_sums, threads * H);
  plan.place(f.repack_blocks, threads * f.repack_elems);
  f.grad_input = f.call.grad_input;
  f.grad_routing_weights = f.call.grad_routing_weights;
  if (f.want_lora_grads) f.lora_grads = LoraGradView(*f.call.lora_grads, f.lora_shape);
  if (!check) return plan;
  plan.place(f.grad_input, f.tokens * H);
  if (f.call.grad_routing_weights != nullptr) plan.place(f.grad_routing_weights, f.tokens * f.top_k);
  if (f.want_lora_grads)  // the same six arrays, laid out back to back
    for (int i = 0; i < kLoraArrays; ++i)
      plan.place(f.lora_grads.arrays[size_t(i)], f.layer.experts * f.lora_grads.per_expert[size_t(i)]);
  return plan;
}

// Zeroes the grads of the experts that got no rows (no task writes them), or of every expert after a
// base-only forward. At small T that is nearly every expert's grads (tens of MiB), so it is spread over
// the pool.
void zero_expert_grads(const LoraGradView& grads, const Routing& routing, bool idle_only, ThreadPool& pool,
                       int threads) {
  pool.parallel_for(routing.experts(), threads, [&](int64_t e, int) {
    if (idle_only && routing.rows_of(e) > 0) return;
    for (int i = 0; i < kLoraArrays; ++i)
      std::fill_n(grads.of(LoraArray(i), e), grads.per_expert[size_t(i)], 0.0f);
  });
}

template <class T>
void gather_rows(const BackwardFrame<T>& f) {
  const int64_t R = f.rows, H = f.hidden, chunk = kRowChunk * 4;
  f.pool->parallel_for(chunks(R, chunk), f.layer.threads, [&](int64_t task, int) {
    for (int64_t row = task * chunk; row < std::min(R, (task + 1) * chunk); ++row) {
      const int64_t tok = f.routing.row_pair[row] / f.top_k;
      if (f.want_lora_grads)
        std::memcpy(f.input_rows + row * H, f.saved.input.data() + tok * H, size_t(H) * sizeof(bf16));
      std::memcpy(f.grad_output_rows + row * H, f.call.grad_output + tok * H, size_t(H) * sizeof(bf16));
    }
  });
}

template <class T>
void lora_products_of_grad_output(const BackwardFrame<T>& f) {
  const int64_t H = f.hidden, r = f.rank;
  f.pool->parallel_for(int64_t(f.row_tasks.size()), f.layer.threads, [&](int64_t i, int) {
    const ExpertTask& t = f.row_tasks[size_t(i)];
    f.low_rank().template axpy<bf16, T>()(t.rows(), r, H, f.grad_output_rows + t.row_begin * H, Strided{H, 1},
                                          f.lora.down_b(t.expert), r, 1.0f, f.grad_output_down_b + t.row_begin * r,
                                          r, false);
    for (int64_t row = t.row_begin; row < t.row_end; ++row) {
      const float weight = f.routing_weight(row);
      for (int64_t j = 0; j < r; ++j) {
        f.weighted_grad_output_down_b[row * r + j] = weight * f.grad_output_down_b[row * r + j];
        f.weighted_activation_down_a[row * r + j] = weight * f.saved.activation_down_a[size_t(row * r + j)];
      }
    }
  });
}

// <dO, bd> of every row: the down bias's share of its routing-weight grad (y includes the bias).
template <class T>
void down_bias_dots(const BackwardFrame<T>& f) {
  const int64_t H = f.hidden;
  f.pool->parallel_for(int64_t(f.row_tasks.size()), f.layer.threads, [&](int64_t i, int) {
    const ExpertTask& t = f.row_tasks[size_t(i)];
    const float* bias = f.layer.biases.down.data() + t.expert * H;
    for (int64_t row = t.row_begin; row < t.row_end; ++row) {
      float dot = 0.0f;
      for (int64_t c = 0; c < H; ++c) dot += to_float(f.grad_output_rows[row * H + c]) * bias[c];
      f.down_bias_dots[row] = dot;
    }
  });
}

// Per (expert, block of I): D, the router's partial dot products, the activation backward; dAd, dBg, dBu.
template <class T>
void activation_backward(const BackwardFrame<T>& f) {
  const LayerParts& layer = f.layer;
  const int64_t H = f.hidden, I = f.intermediate, r = f.rank;
  const float s = layer.lora_scale;
  const bool acc = f.accumulate;
  f.pool->parallel_for(f.intermediate_grid.size(), layer.threads, [&](int64_t i, int worker) {
    const ExpertTask t = f.intermediate_grid[i];
    const ColumnBlock& b = *t.block;
    const ExpertPart& part = layer.parts[size_t(b.part)];
    const int64_t m = t.rows(), w = b.width(), e = t.expert;
    float* grad_h_tile = f.tiles + int64_t(worker) * 2 * f.tile_elems;  // D
    float* h_tile = grad_h_tile + f.tile_elems;                       // h, as the forward rounded it
    kernels::gemm_xw(*layer.kernels, GemmArgs{f.grad_output_rows + t.row_begin * H, H, m, &part.down[size_t(e)],
                                              b.local, b.local + w, grad_h_tile, w, false,
                                              f.repack_blocks + worker * f.repack_elems});
    if (r > 0)
      f.low_rank().template axpy<float, T>()(m, w, r, f.grad_output_down_b + t.row_begin * r, Strided{r, 1},
                                             f.lora.down_a(e) + b.begin, I, s, grad_h_tile, w, true);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t row = t.row_begin + j, at = row * I + b.begin;
      f.routing_grad_parts[row * f.intermediate_blocks + t.block_index] = layer.activation.backward(
          f.saved.gate.data() + at, f.saved.up.data() + at, grad_h_tile + j * w, f.routing_weight(row), w,
          h_tile + j * w, f.grad_gate + at, f.grad_up + at);
    }
    if (!f.want_lora_grads) return;
    const LoraGradView& g = f.lora_grads;
    f.low_rank().template axpy<float, float>()(r, w, m, f.weighted_grad_output_down_b + t.row_begin * r,
                                               Strided{1, r}, h_tile, w, s, g.down_a(e) + b.begin, I, acc);
    f.low_rank().template axpy<bf16, float>()(w, r, m, f.grad_gate + t.row_begin * I + b.begin, Strided{1, I},
                                              f.saved.input_gate_a.data() + t.row_begin * r, r, s,
                                              g.gate_b(e) + b.begin * r, r, acc);
    f.low_rank().template axpy<bf16, float>()(w, r, m, f.grad_up + t.row_begin * I + b.begin, Strided{1, I},
                                              f.saved.input_up_a.data() + t.row_begin * r, r, s,
                                              g.up_b(e) + b.begin * r, r, acc);
  });
}

template <class T>
void lora_products_of_grad_gate_up(const BackwardFrame<T>& f) {
  const int64_t I = f.intermediate, r = f.rank;
  f.pool->parallel_for(int64_t(f.row_tasks.size()), f.layer.threads, [&](int64_t i, int) {
    const ExpertTask& t = f.row_tasks[size_t(i)];
    const auto axpy = f.low_rank().template axpy<bf16, T>();
    axpy(t.rows(), r, I, f.grad_gate + t.row_begin * I, Strided{I, 1}, f.lora.gate_b(t.expert), r, 1.0f,
         f.grad_gate_gate_b + t.row_begin * r, r, false);
    axpy(t.rows(), r, I, f.grad_up + t.row_begin * I, Strided{I, 1}, f.lora.up_b(t.expert), r, 1.0f,
         f.grad_up_up_b + t.row_begin * r, r, false);
  });
}

// Per (expert, block of H): the grad of the expert input rows; dAg, dAu, dBd.
template <class T>
void input_grads(const BackwardFrame<T>& f) {
  const LayerParts& layer = f.layer;
  const int64_t H = f.hidden, I = f.intermediate, r = f.rank;
  const float s = layer.lora_scale;
  const bool acc = f.accumulate;
  f.pool->parallel_for(f.hidden_grid.size(), layer.threads, [&](int64_t i, int worker) {
    const ExpertTask t = f.hidden_grid[i];
    const ColumnBlock& b = *t.block;
    const int64_t m = t.rows(), w = b.width(), e = t.expert;
    float* dx = f.grad_input_rows + t.row_begin * H + b.begin;
    bf16* repack = f.repack_blocks + worker * f.repack_elems;
    for (size_t p = 0; p < layer.parts.size(); ++p) {
      const int64_t at = t.row_begin * I + layer.parts[p].i_begin;
      kernels::gemm_xw(*layer.kernels, GemmArgs{f.grad_gate + at, I, m, &layer.parts[p].gate[size_t(e)], b.begin,
                                                b.end, dx, H, p > 0, repack});
      kernels::gemm_xw(*layer.kernels, GemmArgs{f.grad_up + at, I, m, &layer.parts[p].up[size_t(e)], b.begin,
                                                b.end, dx, H, true, repack});
    }
    if (r > 0) {
      const auto axpy = f.low_rank().template axpy<float, T>();
      axpy(m, w, r, f.grad_gate_gate_b + t.row_begin * r, Strided{r, 1}, f.lora.gate_a(e) + b.begin, H, s, dx, H, true);
      axpy(m, w, r, f.grad_up_up_b + t.row_begin * r, Strided{r, 1}, f.lora.up_a(e) + b.begin, H, s, dx, H, true);
    }
    if (!f.want_lora_grads) return;
    const LoraGradView& g = f.lora_grads;
    const bf16* x = f.input_rows + t.row_begin * H + b.begin;
    const auto a_grad = f.low_rank().template axpy<float, bf16>();
    a_grad(r, w, m, f.grad_gate_gate_b + t.row_begin * r, Strided{1, r}, x, H, s, g.gate_a(e) + b.begin, H, acc);
    a_grad(r, w, m, f.grad_up_up_b + t.row_begin * r, Strided{1, r}, x, H, s, g.up_a(e) + b.begin, H, acc);
    f.low_rank().template axpy<bf16, float>()(w, r, m, f.grad_output_rows + t.row_begin * H + b.begin, Strided{1, H},
                                              f.weighted_activation_down_a + t.row_begin * r, r, s,
                                              g.down_b(e) + b.begin * r, r, acc);
  });
}

// Per token: grad_input = the sum of its rows' dX; grad_routing_weights = the rows' dot products.
template <class T>
void combine_tokens(const BackwardFrame<T>& f) {
  const int64_t H = f.hidden, k = f.top_k, blocks = f.intermediate_blocks;
  for_each_token_sum(*f.pool, f.layer.threads, f.tokens, f.token_sums, H, [&](int64_t tok, float* sum) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = f.routing.pair_row[tok * k + j];
      float routing_grad = 0.0f;
      if (row >= 0) {
        for (int64_t c = 0; c < H; ++c) sum[c] += f.grad_input_rows[row * H + c];
        for (int64_t block = 0; block < blocks; ++block) routing_grad += f.routing_grad_parts[row * blocks + block];
        if (!f.layer.biases.down.empty()) routing_grad += f.down_bias_dots[row];
      }
      if (f.grad_routing_weights != nullptr) f.grad_routing_weights[tok * k + j] = routing_grad;
    }
    for (int64_t c = 0; c < H; ++c) f.grad_input[tok * H + c] = to_bf16(sum[c]);
  });
}

// check_finite, after the last phase: the staged outputs are checked, then copied to the caller's arrays.
template <class T>
void check_and_publish(const BackwardFrame<T>& f) {
  const int64_t H = f.hidden, k = f.top_k, tokens = f.tokens;
  checks::check_tokens(f.grad_input, tokens, H, "grad_input", kGradInput);
  if (f.grad_routing_weights != nullptr) {
    const checks::NonFinite hit = checks::first_non_finite(f.grad_routing_weights, tokens * k);
    if (hit.found)
      checks::throw_non_finite(hit.value, "grad_routing_weights", checks::token_slot(hit.index, k), kGradWeights);
  }
  const auto dims = lora_array_dims(f.lora_shape);
  if (f.want_lora_grads)
    for (size_t i = 0; i < dims.size(); ++i)
      checks::check_expert_array(f.lora_grads.arrays[i], f.layer.experts, dims[i].rows, dims[i].cols,
                                 std::string("LoRA grad ") + dims[i].name, kLoraGrads);
  // All checks passed: only now do the caller's arrays change.
  if (tokens > 0) {  // (empty arrays may be NULL)
    std::memcpy(f.call.grad_input, f.grad_input, size_t(tokens * H) * sizeof(bf16));
    if (f.call.grad_routing_weights != nullptr)
      std::memcpy(f.call.grad_routing_weights, f.grad_routing_weights, size_t(tokens * k) * sizeof(float));
  }
  if (!f.want_lora_grads) return;
  const LoraGradArrays& out = *f.call.lora_grads;
  for (size_t i = 0; i < dims.size(); ++i) {
    const float* staged = f.lora_grads.arrays[i];
    const int64_t n = f.layer.experts * dims[i].per_expert();
    if (f.call.accumulate)
      for (int64_t j = 0; j < n; ++j) out[i][j] += staged[j];
    else
      std::memcpy(out[i], staged, size_t(n) * sizeof(float));
  }
}

template <class T>
void run_phases(const BackwardFrame<T>& f) {
  const bool check = f.layer.check_finite;
  if (f.want_lora_grads && !f.accumulate) zero_expert_grads(f.lora_grads, f.routing, true, *f.pool, f.layer.threads);
  gather_rows(f);
  if (f.rank > 0) lora_products_of_grad_output(f);
  if (!f.layer.biases.down.empty()) down_bias_dots(f);
  activation_backward(f);
  if (check) {
    check_rows(f.grad_gate, f.intermediate, f.routing, "grad of gate projection output", kGradIntermediate);
    check_rows(f.grad_up, f.intermediate, f.routing, "grad of up projection output", kGradIntermediate);
  }
  if (f.rank > 0) lora_products_of_grad_gate_up(f);
  input_grads(f);
  combine_tokens(f);
  if (check) check_and_publish(f);
  // A base-only forward's output did not depend on the adapters: their grads are zero.
  if (f.rank == 0 && f.layer.rank > 0 && f.call.lora_grads != nullptr && !f.call.accumulate)
    zero_expert_grads(LoraGradView(*f.call.lora_grads, f.lora_shape), f.routing, false, *f.pool, f.layer.threads);
}

}  // namespace

template <class T>
void run_backward(const LayerParts& layer, const LoraView<T>& lora, const BackwardCall& call, ForwardCache& cache) {
  BackwardFrame<T> frame(layer, call, lora, cache.top());
  if (layer.check_finite) checks::check_tokens(call.grad_output, frame.tokens, layer.hidden, "grad_output", kGradOutput);
  const ScratchPlan plan = plan_scratch(frame);
  auto session = Runtime::instance().session(layer.threads);
  frame.pool = &session.pool();
  plan.bind(session.arena().frame(plan.layout()));
  run_phases(frame);
  cache.pop();
}

template void run_backward<float>(const LayerParts&, const LoraView<float>&, const BackwardCall&, ForwardCache&);
template void run_backward<bf16>(const LayerParts&, const LoraView<bf16>&, const BackwardCall&, ForwardCache&);

}  // namespace moe_sft::layer
