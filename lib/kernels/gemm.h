// The kernel interface every ISA family implements. Kernels know nothing about MoE, routing or threads: a
// call is one serial block of work that the caller schedules.
//
//   gemm_xwt:  C[m, c0:c1] (=|+=) A[m, :W.cols] · W^T[:, c0:c1]     output columns index W's rows
//   gemm_xw:   C[m, c0:c1] (=|+=) A[m, :W.rows] · W[:, c0:c1]       output columns index W's cols
//
// A is bf16 row-major (lda); C is f32 row-major (ldc) and `c` points at C[0, c0]: the kernel writes exactly
// c1 - c0 columns of m rows there. c0 must be a multiple of kColBlock and c1 - c0 at most kColBlock.
// gemm_xw may use `scratch` (xw_scratch_elems(W.rows()) bf16, 64-byte aligned) to re-pair W's
// block along its rows, or to widen a few rows of A; it never allocates, so a call cannot fail half-way
// through its writes.
//
// W is bf16 here: weight_gemm.h serves the quantized formats through these kernels and `dequantize`.
//
// low_rank holds the rank-r products of the LoRA terms (low_rank.h).
//
// The activation rows are the elementwise epilogues of the SiLU-gated MLP (see activation.h for the math):
//   silu_mul_row:           g, u (f32) -> g, u rounded to bf16 as saved, h = silu(g)·u in bf16
//   silu_mul_backward_row:  saved g, u, dh_raw (f32) and weight w -> h (f32, as forward rounded it),
//                           dg, du (bf16) of h at dh = w·dh_raw; returns <dh_raw, h>
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/dequantize.h"
#include "kernels/low_rank.h"
#include "kernels/packed_matrix.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels {

struct GemmArgs {
  const bf16* a;
  int64_t lda;
  int64_t m;
  const PackedMatrix* w;
  int64_t c0, c1;
  float* c;
  int64_t ldc;
  bool accumulate;
  bf16* scratch;
};

constexpr int64_t kColBlock = 64;  // output columns per task, the same for every family

// Scratch gemm_xw needs for a W with `rows` rows: one re-paired block of kColBlock columns.
inline int64_t xw_scratch_elems(int64_t rows) {
  return (rows + PackedMatrix::kColAlign - 1) / PackedMatrix::kColAlign * PackedMatrix::kColAlign * kColBlock;
}

struct KernelSet {
  const char* name;
  void (*gemm_xwt)(const GemmArgs&);
  void (*gemm_xw)(const GemmArgs&);
  void (*silu_mul_row)(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out);
  float (*silu_mul_backward_row)(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                                 bf16* dg, bf16* du);
  LowRankKernels low_rank;
  DequantizeFn dequantize;
  void (*gemm_xwt_quantized_few_rows)(const GemmArgs&);  // optional (nullptr): see weight_gemm.h
  void (*gemm_xw_quantized_few_rows)(const GemmArgs&);   // optional (nullptr): see weight_gemm.h
};

// The kernel set for this machine, or the one MOE_SFT_ISA names. Throws moe_sft::Error when the variable
// names an unknown family (INVALID_ARGUMENT) or one this machine or build cannot run (UNSUPPORTED).
const KernelSet& select_kernels();

}  // namespace moe_sft::kernels
