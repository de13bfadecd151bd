// Forward pass. Phases (each one parallel_for over the shared pool):
//   1. gather the routed input rows into expert-sorted order            xs [rows, H]
//   2. LoRA down-projections of x (rank r)                             x·Ag^T, x·Au^T
//   3. per (expert, block of I): gate and up GEMMs + LoRA, then h = silu(g)·u
//   4. LoRA down-projection of h                                       h·Ad^T
//   5. per (expert, block of H): down GEMM over every part + LoRA        y [rows, H]
//   6. per token: out[t] = sum_j weight[t, j] · y[row(t, j)]
// Everything a call needs is laid out in the scratch arena before the first write, so a failure to get
// memory leaves the caller's output untouched.
#include <algorithm>
#include <cmath>
#include <string>
#include <cstring>

#include "kernels/low_rank.h"
#include "kernels/weight_gemm.h"
#include "layer/finite_check.h"
#include "layer/moe_layer.h"
#include "layer/task_grid.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

using kernels::GemmArgs;
using kernels::Strided;
using kernels::transpose_to_f32;

namespace {

// The forward's check_finite stages, in the order they are checked.
constexpr Stage kInput{1, 7, "input"}, kRoutingWeights{2, 7, "routing weights"}, kLoraWeights{3, 7, "LoRA weights"},
    kGateUp{4, 7, "gate/up projection"}, kActivation{5, 7, "activation"}, kDown{6, 7, "down projection"},
    kOutput{7, 7, "layer output"};
}  // namespace

template <class T>
void MoELayer::check_forward_inputs(const LoraView<T>& lora, const ForwardCall& call, const Routing& routing) const {
  const int64_t H = hidden_, r = rank_, E = experts_, k = call.top_k;
  NonFinite hit = first_non_finite(call.input, call.qlen * H);
  if (hit.found) throw_non_finite(hit.value, "input", token_column(hit.index, H), kInput);
  for (int64_t pair = 0; pair < call.qlen * k; ++pair)  // slots without an expert may hold anything
    if (routing.pair_row[pair] >= 0 && !std::isfinite(call.weights[pair]))
      throw_non_finite(call.weights[pair], "routing weights",
                       "token " + std::to_string(pair / k) + ", slot " + std::to_string(pair % k), kRoutingWeights);
  if (r == 0) return;
  const auto dims = lora_array_dims(lora_shape());
  const auto arrays = lora.arrays();
  for (size_t i = 0; i < dims.size(); ++i)
    check_expert_array(arrays[i], E, dims[i].rows, dims[i].cols, std::string("LoRA weight ") + dims[i].name,
                       kLoraWeights);
}

template <class T>
void MoELayer::forward_with(const LoraView<T>& lora, const ForwardCall& call) {
  const int64_t H = hidden_, I = intermediate_, r = rank_, k = call.top_k;
  const float s = lora_scale_;
  Routing routing = Routing::build(call.qlen, k, experts_, call.expert_ids);
  if (check_finite_) check_forward_inputs(lora, call, routing);
  const int64_t R = routing.rows();
  const int64_t cb = kernels::kColBlock;
  const int64_t tile = routing.max_expert_rows() * cb;

  // Saved tensors live in the cache record when saving, in scratch otherwise.
  ForwardRecord rec;
  ScratchLayout layout;
  auto xs_slot = layout.add<bf16>(size_t(R * H));
  auto h_slot = layout.add<bf16>(size_t(R * I));
  auto y_slot = layout.add<float>(size_t(R * H));
  auto tiles_slot = layout.add<float>(size_t(threads_ * 2 * tile));
  auto sums_slot = layout.add<float>(size_t(threads_ * H));
  auto lora_t_slot = layout.add<float>(size_t(threads_ * r * cb));  // a LoRA B block transposed, per worker
  const int64_t dequant = kernels_->scratch_elems(kernels::GemmOp::xwt, weight_format_, std::max(H, I));  // per worker
  auto dequant_slot = layout.add<bf16>(size_t(threads_ * dequant));
  // With check_finite the output is assembled here and copied out only once it passed the check.
  auto staged_out_slot = layout.add<bf16>(check_finite_ ? size_t(call.qlen * H) : 0);
  const bool save = call.save_for_backward;
  auto g_slot = layout.add<bf16>(save ? 0 : size_t(R * I));
  auto u_slot = layout.add<bf16>(save ? 0 : size_t(R * I));
  auto xga_slot = layout.add<float>(save ? 0 : size_t(R * r));
  auto xua_slot = layout.add<float>(save ? 0 : size_t(R * r));
  auto hda_slot = layout.add<float>(save ? 0 : size_t(R * r));
  if (save) {
    rec = cache_.take_spare();
    rec.weights.assign(call.weights, call.weights + call.qlen * k);
    rec.input.assign(call.input, call.input + call.qlen * H);
    rec.gate.resize(size_t(R * I));
    rec.up.resize(size_t(R * I));
    rec.x_gate_a.resize(size_t(R * r));
    rec.x_up_a.resize(size_t(R * r));
    rec.h_down_a.resize(size_t(R * r));
  }

  // Every allocation a call makes happens before its first write to the caller's arrays.
  const std::vector<ExpertTask> row_tasks = row_chunks(routing, kRowChunk);
  const ExpertGrid grid_i(routing, column_blocks(parts_, cb));
  const ExpertGrid grid_h(routing, column_blocks(H, cb));
  if (save) cache_.reserve(cache_.depth() + 1);  // so that the final push cannot fail

  auto session = Runtime::instance().session(threads_);
  ThreadPool& pool = session.pool();
  std::byte* base = session.arena().frame(layout);
  bf16* xs = xs_slot.in(base);
  bf16* h = h_slot.in(base);
  float* y = y_slot.in(base);
  float* tiles = tiles_slot.in(base);
  float* sums = sums_slot.in(base);
  float* lora_t = lora_t_slot.in(base);
  bf16* dequant_scratch = dequant_slot.in(base);
  bf16* output = check_finite_ ? staged_out_slot.in(base) : call.output;
  const kernels::LowRankKernels& lr = kernels_->low_rank;
  bf16* gate = save ? rec.gate.data() : g_slot.in(base);
  bf16* up = save ? rec.up.data() : u_slot.in(base);
  float* x_gate_a = save ? rec.x_gate_a.data() : xga_slot.in(base);
  float* x_up_a = save ? rec.x_up_a.data() : xua_slot.in(base);
  float* h_down_a = save ? rec.h_down_a.data() : hda_slot.in(base);

  // 1. gather
  pool.parallel_for(chunks(R, kRowChunk * 4), threads_, [&](int64_t task, int) {
    for (int64_t row = task * kRowChunk * 4; row < std::min(R, (task + 1) * kRowChunk * 4); ++row)
      std::memcpy(xs + row * H, call.input + routing.row_pair[row] / k * H, size_t(H) * sizeof(bf16));
  });

  // 2. x·A^T for gate and up
  if (r > 0)
    pool.parallel_for(int64_t(row_tasks.size()), threads_, [&](int64_t i, int) {
      const ExpertTask& t = row_tasks[size_t(i)];
      const bf16* x = xs + t.row_begin * H;
      lr.dot<T>()(t.rows(), r, H, x, H, lora.ga(t.expert), H, 1.0f, x_gate_a + t.row_begin * r, r, false);
      lr.dot<T>()(t.rows(), r, H, x, H, lora.ua(t.expert), H, 1.0f, x_up_a + t.row_begin * r, r, false);
    });

  // 3. gate/up projections and activation, per (expert, block of I)
  pool.parallel_for(grid_i.size(), threads_, [&](int64_t i, int worker) {
    const ExpertTask t = grid_i[i];
    const ColumnBlock& b = *t.block;
    const ExpertPart& part = parts_[size_t(b.part)];
    const int64_t m = t.rows(), w = b.width(), e = t.expert;
    float* gt = tiles + int64_t(worker) * 2 * tile;
    float* ut = gt + tile;
    const bf16* x = xs + t.row_begin * H;
    bf16* scratch = dequant_scratch + worker * dequant;
    kernels::gemm_xwt(*kernels_, GemmArgs{x, H, m, &part.gate[size_t(e)], b.local, b.local + w, gt, w, false, scratch});
    kernels::gemm_xwt(*kernels_, GemmArgs{x, H, m, &part.up[size_t(e)], b.local, b.local + w, ut, w, false, scratch});
    if (r > 0) {  // + s (x·A^T)·B^T for this block of B's rows, made row-contiguous first
      float* bt = lora_t + int64_t(worker) * r * cb;
      transpose_to_f32(lora.gb(e) + b.begin * r, w, r, r, bt);
      lr.axpy<float, float>()(m, w, r, x_gate_a + t.row_begin * r, Strided{r, 1}, bt, w, s, gt, w, true);
      transpose_to_f32(lora.ub(e) + b.begin * r, w, r, r, bt);
      lr.axpy<float, float>()(m, w, r, x_up_a + t.row_begin * r, Strided{r, 1}, bt, w, s, ut, w, true);
    }
    for (int64_t j = 0; j < m; ++j) {
      const int64_t at = (t.row_begin + j) * I + b.begin;
      kernels_->silu_mul_row(gt + j * w, ut + j * w, w, gate + at, up + at, h + at);
    }
  });

  if (check_finite_) {
    check_rows(gate, I, routing, "gate projection output", kGateUp);
    check_rows(up, I, routing, "up projection output", kGateUp);
    check_rows(h, I, routing, "activation output", kActivation);
  }

  // 4. h·Ad^T
  if (r > 0)
    pool.parallel_for(int64_t(row_tasks.size()), threads_, [&](int64_t i, int) {
      const ExpertTask& t = row_tasks[size_t(i)];
      lr.dot<T>()(t.rows(), r, I, h + t.row_begin * I, I, lora.da(t.expert), I, 1.0f, h_down_a + t.row_begin * r, r,
                  false);
    });

  // 5. down projection, per (expert, block of H), summing the parts' slices of I
  pool.parallel_for(grid_h.size(), threads_, [&](int64_t i, int worker) {
    const ExpertTask t = grid_h[i];
    const ColumnBlock& b = *t.block;
    const int64_t m = t.rows(), e = t.expert;
    float* yt = y + t.row_begin * H + b.begin;
    for (size_t p = 0; p < parts_.size(); ++p)
      kernels::gemm_xwt(*kernels_, GemmArgs{h + t.row_begin * I + parts_[p].i_begin, I, m, &parts_[p].down[size_t(e)],
                                            b.begin, b.end, yt, H, p > 0, dequant_scratch + worker * dequant});
    if (r > 0) {
      float* bt = lora_t + int64_t(worker) * r * cb;
      transpose_to_f32(lora.db(e) + b.begin * r, b.width(), r, r, bt);
      lr.axpy<float, float>()(m, b.width(), r, h_down_a + t.row_begin * r, Strided{r, 1}, bt, b.width(), s, yt, H, true);
    }
  });

  if (check_finite_) check_rows(y, H, routing, "down projection output", kDown);

  // 6. weighted sum of each token's expert outputs
  pool.parallel_for(chunks(call.qlen, kTokenChunk), threads_, [&](int64_t task, int worker) {
    float* acc = sums + int64_t(worker) * H;
    for (int64_t tok = task * kTokenChunk; tok < std::min(call.qlen, (task + 1) * kTokenChunk); ++tok) {
      std::fill(acc, acc + H, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = routing.pair_row[tok * k + j];
        if (row < 0) continue;
        const float wt = call.weights[tok * k + j];
        for (int64_t c = 0; c < H; ++c) acc[c] += wt * y[row * H + c];
      }
      for (int64_t c = 0; c < H; ++c) output[tok * H + c] = to_bf16(acc[c]);
    }
  });

  if (check_finite_) {
    const NonFinite hit = first_non_finite(output, call.qlen * H);
    if (hit.found) throw_non_finite(hit.value, "layer output", token_column(hit.index, H), kOutput);
    if (call.qlen > 0) std::memcpy(call.output, output, size_t(call.qlen * H) * sizeof(bf16));  // may be NULL if empty
  }

  if (save) {
    rec.routing = std::move(routing);
    cache_.push(std::move(rec));
  }
}

template void MoELayer::forward_with<float>(const LoraView<float>&, const ForwardCall&);
template void MoELayer::forward_with<bf16>(const LoraView<bf16>&, const ForwardCall&);

}  // namespace moe_sft::layer
