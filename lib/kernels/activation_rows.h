// The activation rows (gemm.h's contract) as row loops over any scalar activation of activation.h, and the rows
// a layer runs: its family's SiLU rows, or the clamped SwiGLU rows, which are one ISA-neutral implementation (these
// loops) that every family shares, so that no family carries its own untested copy.
#pragma once
#include <cstdint>

#include "kernels/activation.h"
#include "kernels/gemm.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels {

// g, u (f32) -> g, u rounded to bf16 as saved, h = act(g, u) of the rounded values, in bf16.
template <class Act>
void activation_row(const Act& act, const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out,
                    bf16* h_out) {
  for (int64_t i = 0; i < n; ++i) {
    const bf16 gb = to_bf16(g[i]), ub = to_bf16(u[i]);
    g_out[i] = gb;
    u_out[i] = ub;
    h_out[i] = to_bf16(act(to_float(gb), to_float(ub)));
  }
}

// Saved g, u and dh_raw -> h as the forward rounded it, dg and du of h at dh = w·dh_raw; returns <dh_raw, h>.
template <class Act>
float activation_backward_row(const Act& act, const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n,
                              float* h, bf16* dg, bf16* du) {
  float dot = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gv = to_float(g[i]), uv = to_float(u[i]);
    h[i] = to_float(to_bf16(act(gv, uv)));
    dot += dh_raw[i] * h[i];
    const ActivationGrad ag = act.grad(gv, uv, w * dh_raw[i]);
    dg[i] = to_bf16(ag.gate);
    du[i] = to_bf16(ag.up);
  }
  return dot;
}

// The activation rows of one layer: chosen once at create from the family and the activation.
class ActivationRows {
 public:
  ActivationRows(const KernelSet& kernels, ActivationParams params) : kernels_(&kernels), params_(params) {}

  void forward(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out) const;
  float backward(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h, bf16* dg,
                 bf16* du) const;

 private:
  const KernelSet* kernels_;
  ActivationParams params_;
};

}  // namespace moe_sft::kernels
