// The SiLU-gated activation rows (gemm.h) element by element, straight from their scalar definition
// (activation.h).
#include "kernels/activation.h"
#include "kernels/generic/generic.h"

namespace moe_sft::kernels {

void silu_mul_row_generic(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out) {
  for (int64_t i = 0; i < n; ++i) {
    const bf16 gb = to_bf16(g[i]), ub = to_bf16(u[i]);
    g_out[i] = gb;
    u_out[i] = ub;
    h_out[i] = to_bf16(activation(to_float(gb), to_float(ub)));
  }
}

float silu_mul_backward_row_generic(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                                    bf16* dg, bf16* du) {
  float dot = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float gv = to_float(g[i]), uv = to_float(u[i]);
    h[i] = to_float(to_bf16(activation(gv, uv)));
    dot += dh_raw[i] * h[i];
    const ActivationGrad ag = activation_grad(gv, uv, w * dh_raw[i]);
    dg[i] = to_bf16(ag.gate);
    du[i] = to_bf16(ag.up);
  }
  return dot;
}

}  // namespace moe_sft::kernels
