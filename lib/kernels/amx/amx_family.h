// Builds the AMX kernel family around a tile implementation: the panel GEMM for x·W^T straight from the
// packed panels, re-pairing + the same panel GEMM for d·W, and the activation rows, rank-r products,
// dequantization and quantized few-rows kernels of the best vector family the CPU has (every AMX CPU has
// AVX-512 BF16; the emulated family may run anywhere).
#pragma once
#include "kernels/amx/gemm_amx.h"
#include "kernels/gemm.h"
#include "kernels/repack.h"
#include "runtime/assert.h"

namespace moe_sft::kernels::amx {

// Vector kernels the AMX families borrow, picked once from the CPU (vector_helpers.cpp).
struct VectorHelpers {
  RepackFn repack;
  decltype(KernelSet::silu_mul_row) silu_mul_row;
  decltype(KernelSet::silu_mul_backward_row) silu_mul_backward_row;
  LowRankKernels low_rank;
  DequantizeFn dequantize;
  // The vector family's few-rows kernels at the most rows they are built for; none without AVX-512.
  FewRowsPath xw_few_rows;
  FewRowsPath xwt_quantized_few_rows;
};
const VectorHelpers& vector_helpers();

template <class Tiles>
struct Family {
  static void gemm_xwt(const GemmArgs& g) {
    const PackedMatrix& w = *g.w;
    PanelGemm<Tiles>::run(g.a, g.lda, g.m, w.cols(), w.panel(g.c0 / PackedMatrix::kPanelRows),
                          PackedMatrix::kPanelRows * w.padded_cols(), g.c1 - g.c0, g.c, g.ldc, g.accumulate);
  }
  static void gemm_xw(const GemmArgs& g) {
    const PackedMatrix& w = *g.w;
    MOE_SFT_ASSERT(g.scratch_elems < 0 || g.scratch_elems >= xw_block_elems(w.rows()));
    vector_helpers().repack(w, g.c0, g.c1 - g.c0, g.scratch);
    PanelGemm<Tiles>::run(g.a, g.lda, g.m, w.rows(), g.scratch, repacked_panel_stride(w), g.c1 - g.c0, g.c, g.ldc,
                          g.accumulate);
  }
  // Tiles serve bf16 W at any number of rows; quantized W with few rows skips the dequantized block
  // through the vector family's few-rows kernels, to their full row limits.
  static KernelSet make(const char* name) {
    const VectorHelpers& v = vector_helpers();
    KernelSet s{};
    s.name = name;
    s.gemm_xwt = gemm_xwt;
    s.gemm_xw = gemm_xw;
    s.xw_repairs = true;
    s.xw_quantized_few_rows = v.xw_few_rows;
    s.xwt_quantized_few_rows = v.xwt_quantized_few_rows;
    s.silu_mul_row = v.silu_mul_row;
    s.silu_mul_backward_row = v.silu_mul_backward_row;
    s.low_rank = v.low_rank;
    s.dequantize = v.dequantize;
    return s;
  }
};

}  // namespace moe_sft::kernels::amx
