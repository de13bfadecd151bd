// The AVX-512 BF16 panel GEMM shared by the avx512_bf16 family (both directions) and nothing MoE-specific:
//
//   C[m, 0:width] (=|+=) A[m, 0:K] · B,  B given as panels of 16 columns in the packed pair layout
//   (panel q at b + q * panel_stride, pair kp of it at + kp * 32).
//
// Register blocking: up to 6 rows x 4 panels (24 zmm accumulators), one VDPBF16PS per (row, panel, pair).
// K is cut into blocks whose B slice (4 panels) fits L1, so B is read from L1 for every row block.
// Declared here, defined in a file compiled for AVX-512 BF16; call only when the CPU has it.
#pragma once
#include <cstdint>

#include "runtime/bf16.h"

namespace moe_sft::kernels::avx512 {

void panel_gemm(const bf16* a, int64_t lda, int64_t m, int64_t k, const bf16* b, int64_t panel_stride, int64_t width,
                float* c, int64_t ldc, bool accumulate);

}  // namespace moe_sft::kernels::avx512
