// Backward pass of the most recent saved forward. With dO = grad_output rows (expert-sorted, unweighted)
// and w the routing weight of each row:
//   D   = dO·Wd + s (dO·Bd)·Ad            [rows, I]  grad of h, before the routing weight
//   grad_routing_weight = <D, h>           (= <dO, y>: the router's gradient, one dot product per row)
//   dH  = w·D;  dG, dU = activation grads of dH
//   dX  = dG·Wg + dU·Wu + s (dG·Bg)·Ag + s (dU·Bu)·Au    [rows, H], summed per token into grad_input
// LoRA grads (summed over each expert's rows):
//   dAd = s (w·dO·Bd)^T h     dBd = s dO^T (w·h·Ad^T)
//   dAg = s (dG·Bg)^T x       dBg = s dG^T (x·Ag^T)        (up alike)
// Phases: 1 gather x and dO rows; 2 rank-r products of dO; 3 per (expert, block of I): D, activation
// backward, dAd/dBg/dBu; 4 rank-r products of dG/dU; 5 per (expert, block of H): dX, dAg/dAu/dBd;
// 6 per token: grad_input and grad_routing_weights. Each LoRA-grad slice is written by exactly one task.
#include <algorithm>
#include <array>
#include <string>
#include <cstring>

#include "kernels/low_rank.h"
#include "layer/finite_check.h"
#include "kernels/weight_gemm.h"
#include "layer/moe_layer.h"
#include "layer/task_grid.h"
#include "runtime/runtime.h"

namespace moe_sft::layer {

using kernels::GemmArgs;
using kernels::Strided;

namespace {

// The backward's check_finite stages, in the order they are checked.
constexpr Stage kGradOutput{1, 5, "grad_output"}, kGradIntermediate{2, 5, "grad of the intermediate"},
    kGradInput{3, 5, "grad_input"}, kGradWeights{4, 5, "grad_routing_weights"}, kLoraGrads{5, 5, "LoRA grads"};

// Zeroes the grads of experts that got no rows (no task writes them) unless accumulating. At small T that
// is nearly every expert's grads (tens of MiB), so it is spread over the pool.
void clear_idle_expert_grads(const LoraGradView& g, const Routing& routing, ThreadPool& pool, int threads) {
  const auto dims = lora_array_dims(g.s);
  const auto arrays = g.arrays();
  pool.parallel_for(routing.experts(), threads, [&](int64_t e, int) {
    if (routing.rows_of(e) > 0) return;
    for (size_t i = 0; i < dims.size(); ++i)
      std::fill_n(arrays[i] + e * dims[i].per_expert(), dims[i].per_expert(), 0.0f);
  });
}

}  // namespace

template <class T>
void MoELayer::backward_with(const LoraView<T>& lora, const BackwardCall& call) {
  const ForwardRecord& rec = cache_.top();
  const Routing& routing = rec.routing;
  const int64_t H = hidden_, I = intermediate_, r = rank_, k = routing.top_k, T_ = routing.qlen;
  const int64_t R = routing.rows();
  const float s = lora_scale_;
  const int64_t cb = kernels::kColBlock;
  const int64_t tile = routing.max_expert_rows() * cb;
  const bool want_lora_grads = r > 0 && call.lora_grads != nullptr;
  // With check_finite, every output is computed into scratch and copied out only after it passed the checks.
  const bool check = check_finite_;
  const bool acc = call.accumulate && !check;
  LoraGradView caller_grads{};
  if (want_lora_grads) {
    const moe_sft_lora_grads& lg = *call.lora_grads;
    caller_grads = LoraGradView{lg.gate_a, lg.gate_b, lg.up_a, lg.up_b, lg.down_a, lg.down_b, lora_shape()};
  }
  if (check) {
    const NonFinite hit = first_non_finite(call.grad_output, T_ * H);
    if (hit.found) throw_non_finite(hit.value, "grad_output", token_column(hit.index, H), kGradOutput);
  }
  // Every allocation a call makes happens before its first write to the caller's arrays.
  const ExpertGrid grid_i(routing, column_blocks(parts_, cb));
  const ExpertGrid grid_h(routing, column_blocks(H, cb));
  const std::vector<ExpertTask> row_tasks = row_chunks(routing, kRowChunk);
  const int64_t nbi = grid_i.block_count();

  ScratchLayout layout;
  auto xs_slot = layout.add<bf16>(want_lora_grads ? size_t(R * H) : 0);  // only dAg/dAu read x
  auto dos_slot = layout.add<bf16>(size_t(R * H));
  auto dg_slot = layout.add<bf16>(size_t(R * I));
  auto du_slot = layout.add<bf16>(size_t(R * I));
  auto dx_slot = layout.add<float>(size_t(R * H));
  auto gw_slot = layout.add<float>(size_t(R * nbi));  // per (row, block of I) partial <D, h>
  auto dob_slot = layout.add<float>(size_t(R * r));   // dO·Bd
  auto wdob_slot = layout.add<float>(size_t(R * r));  // w·dO·Bd
  auto wha_slot = layout.add<float>(size_t(R * r));   // w·h·Ad^T
  auto dgb_slot = layout.add<float>(size_t(R * r));   // dG·Bg
  auto dub_slot = layout.add<float>(size_t(R * r));   // dU·Bu
  auto tiles_slot = layout.add<float>(size_t(threads_ * 2 * tile));
  auto sums_slot = layout.add<float>(size_t(threads_ * H));
  int64_t widest_part = 0;
  for (const ExpertPart& part : parts_) widest_part = std::max(widest_part, part.width());
  // per worker
  const int64_t repack = kernels_->scratch_elems(kernels::GemmOp::xw, weight_format_, std::max(H, widest_part));
  auto repack_slot = layout.add<bf16>(size_t(threads_ * repack));
  auto staged_gi_slot = layout.add<bf16>(check ? size_t(T_ * H) : 0);
  auto staged_gw_slot = layout.add<float>(check && call.grad_weights != nullptr ? size_t(T_ * k) : 0);
  const auto lora_dims = lora_array_dims(lora_shape());
  int64_t lora_grad_elems = 0;
  for (const LoraArrayDims& d : lora_dims) lora_grad_elems += experts_ * d.per_expert();
  auto staged_lora_slot = layout.add<float>(check && want_lora_grads ? size_t(lora_grad_elems) : 0);

  auto session = Runtime::instance().session(threads_);
  ThreadPool& pool = session.pool();
  std::byte* base = session.arena().frame(layout);
  bf16* xs = xs_slot.in(base);
  bf16* dos = dos_slot.in(base);
  bf16* dg = dg_slot.in(base);
  bf16* du = du_slot.in(base);
  float* dx = dx_slot.in(base);
  float* gw = gw_slot.in(base);
  float* dob = dob_slot.in(base);
  float* wdob = wdob_slot.in(base);
  float* wha = wha_slot.in(base);
  float* dgb = dgb_slot.in(base);
  float* dub = dub_slot.in(base);
  float* tiles = tiles_slot.in(base);
  float* sums = sums_slot.in(base);
  bf16* repack_scratch = repack_slot.in(base);
  const kernels::LowRankKernels& lr = kernels_->low_rank;
  bf16* grad_input = check ? staged_gi_slot.in(base) : call.grad_input;
  float* grad_weights = check && call.grad_weights != nullptr ? staged_gw_slot.in(base) : call.grad_weights;
  LoraGradView G = caller_grads;
  if (check && want_lora_grads) {  // the same six arrays, laid out back to back in scratch
    std::array<float*, 6> staged;
    float* p = staged_lora_slot.in(base);
    for (size_t i = 0; i < staged.size(); ++i) {
      staged[i] = p;
      p += experts_ * lora_dims[i].per_expert();
    }
    G = LoraGradView{staged[0], staged[1], staged[2], staged[3], staged[4], staged[5], lora_shape()};
  }
  auto row_weight = [&](int64_t row) { return rec.weights[size_t(routing.row_pair[row])]; };

  if (want_lora_grads && !acc) clear_idle_expert_grads(G, routing, pool, threads_);

  // 1. gather x and dO rows
  pool.parallel_for(chunks(R, kRowChunk * 4), threads_, [&](int64_t task, int) {
    for (int64_t row = task * kRowChunk * 4; row < std::min(R, (task + 1) * kRowChunk * 4); ++row) {
      const int64_t tok = routing.row_pair[row] / k;
      if (want_lora_grads) std::memcpy(xs + row * H, rec.input.data() + tok * H, size_t(H) * sizeof(bf16));
      std::memcpy(dos + row * H, call.grad_output + tok * H, size_t(H) * sizeof(bf16));
    }
  });

  // 2. dO·Bd and the weighted rank-r rows the down grads need
  if (r > 0)
    pool.parallel_for(int64_t(row_tasks.size()), threads_, [&](int64_t i, int) {
      const ExpertTask& t = row_tasks[size_t(i)];
      lr.axpy<bf16, T>()(t.rows(), r, H, dos + t.row_begin * H, Strided{H, 1}, lora.db(t.expert), r, 1.0f,
                         dob + t.row_begin * r, r, false);
      for (int64_t row = t.row_begin; row < t.row_end; ++row) {
        const float wt = row_weight(row);
        for (int64_t j = 0; j < r; ++j) {
          wdob[row * r + j] = wt * dob[row * r + j];
          wha[row * r + j] = wt * rec.h_down_a[size_t(row * r + j)];
        }
      }
    });

  // 3. grad of h, router dot products, activation backward; dAd, dBg, dBu — per (expert, block of I)
  pool.parallel_for(grid_i.size(), threads_, [&](int64_t i, int worker) {
    const ExpertTask t = grid_i[i];
    const ColumnBlock& b = *t.block;
    const ExpertPart& part = parts_[size_t(b.part)];
    const int64_t m = t.rows(), w = b.width(), e = t.expert;
    float* dt = tiles + int64_t(worker) * 2 * tile;  // D block
    float* ht = dt + tile;                          // h block, as the forward rounded it
    kernels::gemm_xw(*kernels_, GemmArgs{dos + t.row_begin * H, H, m, &part.down[size_t(e)], b.local, b.local + w, dt, w, false,
                               repack_scratch + worker * repack});
    if (r > 0)
      lr.axpy<float, T>()(m, w, r, dob + t.row_begin * r, Strided{r, 1}, lora.da(e) + b.begin, I, s, dt, w, true);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t row = t.row_begin + j, at = row * I + b.begin;
      gw[row * nbi + t.block_index] = kernels_->silu_mul_backward_row(
          rec.gate.data() + at, rec.up.data() + at, dt + j * w, row_weight(row), w, ht + j * w, dg + at, du + at);
    }
    if (want_lora_grads) {
      lr.axpy<float, float>()(r, w, m, wdob + t.row_begin * r, Strided{1, r}, ht, w, s, G.da(e) + b.begin, I, acc);
      lr.axpy<bf16, float>()(w, r, m, dg + t.row_begin * I + b.begin, Strided{1, I},
                             rec.x_gate_a.data() + t.row_begin * r, r, s, G.gb(e) + b.begin * r, r, acc);
      lr.axpy<bf16, float>()(w, r, m, du + t.row_begin * I + b.begin, Strided{1, I}, rec.x_up_a.data() + t.row_begin * r,
                             r, s, G.ub(e) + b.begin * r, r, acc);
    }
  });

  if (check) {
    check_rows(dg, I, routing, "grad of gate projection output", kGradIntermediate);
    check_rows(du, I, routing, "grad of up projection output", kGradIntermediate);
  }

  // 4. dG·Bg, dU·Bu
  if (r > 0)
    pool.parallel_for(int64_t(row_tasks.size()), threads_, [&](int64_t i, int) {
      const ExpertTask& t = row_tasks[size_t(i)];
      lr.axpy<bf16, T>()(t.rows(), r, I, dg + t.row_begin * I, Strided{I, 1}, lora.gb(t.expert), r, 1.0f,
                         dgb + t.row_begin * r, r, false);
      lr.axpy<bf16, T>()(t.rows(), r, I, du + t.row_begin * I, Strided{I, 1}, lora.ub(t.expert), r, 1.0f,
                         dub + t.row_begin * r, r, false);
    });

  // 5. grad of the expert input rows; dAg, dAu, dBd — per (expert, block of H)
  pool.parallel_for(grid_h.size(), threads_, [&](int64_t i, int worker) {
    const ExpertTask t = grid_h[i];
    const ColumnBlock& b = *t.block;
    const int64_t m = t.rows(), w = b.width(), e = t.expert;
    float* dxt = dx + t.row_begin * H + b.begin;
    bf16* scratch = repack_scratch + worker * repack;
    for (size_t p = 0; p < parts_.size(); ++p) {
      const int64_t off = t.row_begin * I + parts_[p].i_begin;
      kernels::gemm_xw(*kernels_, GemmArgs{dg + off, I, m, &parts_[p].gate[size_t(e)], b.begin, b.end, dxt, H, p > 0, scratch});
      kernels::gemm_xw(*kernels_, GemmArgs{du + off, I, m, &parts_[p].up[size_t(e)], b.begin, b.end, dxt, H, true, scratch});
    }
    if (r > 0) {
      lr.axpy<float, T>()(m, w, r, dgb + t.row_begin * r, Strided{r, 1}, lora.ga(e) + b.begin, H, s, dxt, H, true);
      lr.axpy<float, T>()(m, w, r, dub + t.row_begin * r, Strided{r, 1}, lora.ua(e) + b.begin, H, s, dxt, H, true);
    }
    if (want_lora_grads) {
      const bf16* x = xs + t.row_begin * H + b.begin;
      lr.axpy<float, bf16>()(r, w, m, dgb + t.row_begin * r, Strided{1, r}, x, H, s, G.ga(e) + b.begin, H, acc);
      lr.axpy<float, bf16>()(r, w, m, dub + t.row_begin * r, Strided{1, r}, x, H, s, G.ua(e) + b.begin, H, acc);
      lr.axpy<bf16, float>()(w, r, m, dos + t.row_begin * H + b.begin, Strided{1, H}, wha + t.row_begin * r, r, s,
                             G.db(e) + b.begin * r, r, acc);
    }
  });

  // 6. per token: grad_input = sum of its rows' dX; grad_routing_weights = the rows' dot products
  pool.parallel_for(chunks(T_, kTokenChunk), threads_, [&](int64_t task, int worker) {
    float* sum = sums + int64_t(worker) * H;
    for (int64_t tok = task * kTokenChunk; tok < std::min(T_, (task + 1) * kTokenChunk); ++tok) {
      std::fill(sum, sum + H, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t row = routing.pair_row[tok * k + j];
        float gwt = 0.0f;
        if (row >= 0) {
          for (int64_t c = 0; c < H; ++c) sum[c] += dx[row * H + c];
          for (int64_t bi = 0; bi < nbi; ++bi) gwt += gw[row * nbi + bi];
        }
        if (grad_weights != nullptr) grad_weights[tok * k + j] = gwt;
      }
      for (int64_t c = 0; c < H; ++c) grad_input[tok * H + c] = to_bf16(sum[c]);
    }
  });

  if (check) {
    NonFinite hit = first_non_finite(grad_input, T_ * H);
    if (hit.found) throw_non_finite(hit.value, "grad_input", token_column(hit.index, H), kGradInput);
    hit = grad_weights != nullptr ? first_non_finite(grad_weights, T_ * k) : NonFinite{};
    if (hit.found)
      throw_non_finite(hit.value, "grad_routing_weights",
                       "token " + std::to_string(hit.index / k) + ", slot " + std::to_string(hit.index % k), kGradWeights);
    if (want_lora_grads)
      for (size_t i = 0; i < lora_dims.size(); ++i)
        check_expert_array(G.arrays()[i], experts_, lora_dims[i].rows, lora_dims[i].cols,
                           std::string("LoRA grad ") + lora_dims[i].name, kLoraGrads);
    // All checks passed: only now do the caller's arrays change.
    if (T_ > 0) {  // (empty arrays may be NULL)
      std::memcpy(call.grad_input, grad_input, size_t(T_ * H) * sizeof(bf16));
      if (call.grad_weights != nullptr) std::memcpy(call.grad_weights, grad_weights, size_t(T_ * k) * sizeof(float));
    }
    if (want_lora_grads) {
      const auto staged = G.arrays(), out = caller_grads.arrays();
      for (size_t i = 0; i < staged.size(); ++i) {
        const int64_t n = experts_ * lora_dims[i].per_expert();
        if (call.accumulate)
          for (int64_t j = 0; j < n; ++j) out[i][j] += staged[i][j];
        else
          std::memcpy(out[i], staged[i], size_t(n) * sizeof(float));
      }
    }
  }

  cache_.pop();
}

template void MoELayer::backward_with<float>(const LoraView<float>&, const BackwardCall&);
template void MoELayer::backward_with<bf16>(const LoraView<bf16>&, const BackwardCall&);

}  // namespace moe_sft::layer
