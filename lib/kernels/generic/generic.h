// The portable family: every other family is checked against it, and reuses its activation rows where it
// has nothing faster.
#pragma once
#include "kernels/gemm.h"

namespace moe_sft::kernels {

const KernelSet& generic_kernels();

void silu_mul_row_generic(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out);
float silu_mul_backward_row_generic(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                                    bf16* dg, bf16* du);

}  // namespace moe_sft::kernels
