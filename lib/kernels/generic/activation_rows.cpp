// The SiLU-gated activation rows (gemm.h) element by element, straight from their scalar definition
// (activation.h), through the row loops every scalar activation shares (activation_rows.h).
#include "kernels/activation_rows.h"
#include "kernels/generic/generic.h"

namespace moe_sft::kernels {

void silu_mul_row_generic(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out) {
  activation_row(SiluGated{}, g, u, n, g_out, u_out, h_out);
}

float silu_mul_backward_row_generic(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                                    bf16* dg, bf16* du) {
  return activation_backward_row(SiluGated{}, g, u, dh_raw, w, n, h, dg, du);
}

}  // namespace moe_sft::kernels
