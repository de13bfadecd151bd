// The portable family: the reference every other family is checked against. Its pieces also serve the
// families that have nothing faster for a job (amx-emulated on a CPU without AVX-512).
#pragma once
#include "kernels/gemm.h"
#include "kernels/repack.h"

namespace moe_sft::kernels {

const KernelSet& generic_kernels();

void gemm_xwt_generic(const GemmArgs& g);
void gemm_xw_generic(const GemmArgs& g);

void silu_mul_row_generic(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out);
float silu_mul_backward_row_generic(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                                    bf16* dg, bf16* du);
LowRankKernels portable_low_rank();
void repack_transposed_scalar(const PackedMatrix& w, int64_t c0, int64_t width, bf16* out);  // repack.h
void dequantize_scalar(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs, bf16* out,
                       int64_t out_stride);  // dequantize.h

}  // namespace moe_sft::kernels
