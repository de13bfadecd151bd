// The AVX-512 panel GEMM of the avx512 families (both directions), nothing MoE-specific:
//
//   C[m, 0:width] (=|+=) A[m, 0:K] · B,  B given as panels of 16 columns in the packed pair layout
//   (panel q at b + q * panel_stride, pair kp of it at + kp * 32).
//
// Register blocking: up to 6 rows x 4 panels (24 zmm accumulators). K is cut into blocks whose B slice
// (4 panels) fits L1, so B is read from L1 for every row block.
// Declared here, defined in a file compiled for AVX-512 BF16; call only when the CPU has it.
#pragma once
#include <cstdint>

#include "runtime/bf16.h"

namespace moe_sft::kernels::avx512 {

// How a bf16 x bf16 product is formed. Both are exact in f32 and accumulate in f32:
//   dpbf16: VDPBF16PS, one instruction per pair of products: the faster where a core issues it at its f32
//           FMA rate;
//   fma:    B's bf16 halves widened to f32 (a shift, a mask), A's widened once per register block, and
//           two VFMADD231PS: the faster where a core issues VDPBF16PS at a fraction of its FMA rate
//           (vdpbf16ps_is_slow decides at run time).
enum class Products { dpbf16, fma };

template <Products kProducts>
void panel_gemm(const bf16* a, int64_t lda, int64_t m, int64_t k, const bf16* b, int64_t panel_stride, int64_t width,
                float* c, int64_t ldc, bool accumulate);

}  // namespace moe_sft::kernels::avx512
