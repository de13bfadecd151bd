// ActivationRows: the family's SiLU rows, or the shared clamped SwiGLU rows.
#include "kernels/activation_rows.h"

namespace moe_sft::kernels {

void ActivationRows::forward(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out,
                             bf16* h_out) const {
  if (params_.kind == ActivationKind::silu)
    kernels_->silu_mul_row(g, u, n, g_out, u_out, h_out);
  else
    activation_row(ClampedSwiGlu{params_.alpha, params_.limit}, g, u, n, g_out, u_out, h_out);
}

float ActivationRows::backward(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                               bf16* dg, bf16* du) const {
  if (params_.kind == ActivationKind::silu) return kernels_->silu_mul_backward_row(g, u, dh_raw, w, n, h, dg, du);
  return activation_backward_row(ClampedSwiGlu{params_.alpha, params_.limit}, g, u, dh_raw, w, n, h, dg, du);
}

}  // namespace moe_sft::kernels
