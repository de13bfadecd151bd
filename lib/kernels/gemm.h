// The kernel interface every ISA family implements. Kernels know nothing about MoE, routing or threads: a
// call is one serial block of work that the caller schedules.
//
//   gemm_xwt:  C[m, c0:c1] (=|+=) A[m, :W.cols] · W^T[:, c0:c1]     output columns index W's rows
//   gemm_xw:   C[m, c0:c1] (=|+=) A[m, :W.rows] · W[:, c0:c1]       output columns index W's cols
//
// A is bf16 row-major (lda); C is f32 row-major (ldc) and `c` points at C[0, c0]: the kernel writes exactly
// c1 - c0 columns of m rows there. c0 must be a multiple of kColBlock and c1 - c0 at most kColBlock.
// A call may use `scratch` (64-byte aligned, KernelSet::scratch_elems of it) to re-pair W's block along its
// rows, dequantize a block, or widen a few rows of A; it never allocates, so a call cannot fail half-way
// through its writes.
//
// A family's KernelSet says which code serves which call: gemm_xwt / gemm_xw for bf16 W and any number of
// rows, and optional few-rows paths (FewRowsPath) that serve up to their own row limit. weight_gemm.cpp
// is the one place that picks among them for a (format, rows) and serves the quantized formats through
// the bf16 kernels and `dequantize`; the layer asks scratch_elems how much scratch a call needs.
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
  // bf16 elements `scratch` holds, for MOE_SFT_ASSERT builds to check against what a call uses; -1: not said.
  int64_t scratch_elems = -1;
};

constexpr int64_t kColBlock = 64;  // output columns per task, the same for every family

// One block of W's kColBlock columns over all its `rows` rows in the packed layout (rows padded to whole
// kColAlign): what d·W re-pairs (repack.h) or dequantizes (dequantize.h) into scratch.
constexpr int64_t xw_block_elems(int64_t rows) {
  return (rows + PackedMatrix::kColAlign - 1) / PackedMatrix::kColAlign * PackedMatrix::kColAlign * kColBlock;
}

// Quantized W reaches a few-rows path only when its groups are a multiple of this many columns (int4's
// units of four pairs; the d·W kernel's per-group accumulators are sized by it).
constexpr int64_t kFewRowsGroupMultiple = 8;

// A kernel that serves calls of 0 .. max_rows rows of A in place of the general one. A family without
// such a path leaves `run` null.
struct FewRowsPath {
  void (*run)(const GemmArgs&) = nullptr;
  int64_t max_rows = 0;
  // bf16 elements of scratch a call of `rows` rows needs for a W with `w_rows` rows; null: none.
  int64_t (*scratch_elems)(int64_t rows, int64_t w_rows) = nullptr;
};

enum class GemmOp { xwt, xw };

struct KernelSet {
  const char* name;
  // bf16 W, any number of rows. gemm_xw re-pairs W's block into scratch where xw_repairs says so.
  void (*gemm_xwt)(const GemmArgs&);
  void (*gemm_xw)(const GemmArgs&);
  bool xw_repairs;
  // Taken instead for few rows (weight_gemm.cpp decides; each family states its limits):
  FewRowsPath xw_few_rows;             // d·W, bf16 W (stored so or a dequantized block)
  FewRowsPath xw_quantized_few_rows;   // d·W, quantized W: scale folded into A, codes converted in registers
  FewRowsPath xwt_quantized_few_rows;  // x·W^T, quantized W: codes decoded in registers
  void (*silu_mul_row)(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out);
  float (*silu_mul_backward_row)(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h,
                                 bf16* dg, bf16* du);
  LowRankKernels low_rank;
  DequantizeFn dequantize;

  // bf16 elements of GemmArgs::scratch one call of `op` needs, for any number of rows of A and any W of
  // format f with at most w_rows rows (weight_gemm.cpp).
  int64_t scratch_elems(GemmOp op, WeightFormat f, int64_t w_rows) const;
};

// The kernel set for this machine, or the one MOE_SFT_ISA names. Throws moe_sft::Error when the variable
// names an unknown family (INVALID_ARGUMENT) or one this machine or build cannot run (UNSUPPORTED).
const KernelSet& select_kernels();

}  // namespace moe_sft::kernels
