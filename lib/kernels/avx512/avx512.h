// The AVX-512 families. Their functions may only run where CPUID and XCR0 report AVX-512 BF16.
//   avx512_bf16: bf16 products by VDPBF16PS;
//   avx512_fma:  the same kernels with bf16 products by f32 FMAs on widened halves (panel_gemm.h, Products),
//                for cores that issue VDPBF16PS at a fraction of the FMA rate.
//
// One file per job: panel_gemm.cpp (the register-blocked GEMM), repack.cpp (d·W's re-pairing),
// xw_few_rows.cpp and xwt_quantized_few_rows.cpp (the few-rows paths), dequantize.cpp, activation_rows.cpp,
// low_rank.cpp, product_rate.cpp (which family to prefer) and families.cpp (the two KernelSets).
#pragma once
#include "kernels/gemm.h"

namespace moe_sft::kernels {

const KernelSet& avx512_bf16_kernels();
const KernelSet& avx512_fma_kernels();

// Measured once per process: true where VDPBF16PS issues at under half the rate of 512-bit f32 FMAs, so
// that avx512_fma is the faster family. Call only where avx512_bf16 can run.
bool vdpbf16ps_is_slow();

namespace avx512 {
void silu_mul_row(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out);
float silu_mul_backward_row(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h, bf16* dg,
                            bf16* du);
LowRankKernels low_rank_kernels();
// repack.h's re-pairing with 24 two-source permutes per 16x16 block.
void repack_transposed(const PackedMatrix& w, int64_t c0, int64_t width, bf16* out);
// dequantize.h's contract.
void dequantize(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs, bf16* out,
                int64_t out_stride);

// The few-rows kernels (FewRowsPath) and the most rows each is built for: their register blocks and stack
// buffers are sized by these, so a family may serve fewer rows with them, never more (families.cpp).
//
// x·W^T of a quantized W (groups a multiple of kFewRowsGroupMultiple), codes decoded in registers.
constexpr int64_t kXwtQuantizedFewRows = 4;
void gemm_xwt_quantized_few_rows(const GemmArgs& g);
// d·W, W in any format (quantized: groups a multiple of kFewRowsGroupMultiple), straight from the packed
// panels with f32 FMAs (xw_few_rows.cpp). Uses g.scratch for A widened to f32: xw_few_rows_scratch_elems.
constexpr int64_t kXwFewRows = 8;
void gemm_xw_few_rows(const GemmArgs& g);
int64_t xw_few_rows_scratch_elems(int64_t rows, int64_t w_rows);
}  // namespace avx512

}  // namespace moe_sft::kernels
