// The avx512_bf16 family (VDPBF16PS). Its functions may only run where CPUID and XCR0 report AVX-512 BF16.
#pragma once
#include "kernels/gemm.h"

namespace moe_sft::kernels {

const KernelSet& avx512_bf16_kernels();

namespace avx512 {
void silu_mul_row(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out);
void gemm_xwt_quantized_few_rows(const GemmArgs& g);  // quantized W, g.m <= kQuantizedFewRows
float silu_mul_backward_row(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h, bf16* dg,
                            bf16* du);
}  // namespace avx512

}  // namespace moe_sft::kernels
