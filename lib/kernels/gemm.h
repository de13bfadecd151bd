// The GEMM interface every ISA implements. Kernels know nothing about MoE, routing or threads: a call is
// one serial block of work that the caller schedules.
//
//   gemm_xwt:  C[m, c0:c1] (=|+=) A[m, :W.cols] · W^T[:, c0:c1]     output columns index W's rows
//   gemm_xw:   C[m, c0:c1] (=|+=) A[m, :W.rows] · W[:, c0:c1]       output columns index W's cols
//
// A is bf16 row-major (lda); C is f32 row-major (ldc) and `c` points at C[0, c0]: the kernel writes exactly
// c1 - c0 columns of m rows there. c0 must be a multiple of KernelSet::col_block; c1 may be any end up to
// the output width.
#pragma once
#include <cstddef>
#include <cstdint>

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
};

struct KernelSet {
  const char* name;
  int64_t col_block;  // output columns per task: a multiple of PackedMatrix::kColAlign
  void (*gemm_xwt)(const GemmArgs&);
  void (*gemm_xw)(const GemmArgs&);
};

// The kernel set for this machine, or the one MOE_SFT_ISA names. Throws moe_sft::Error when the variable
// names an unknown family (INVALID_ARGUMENT) or one this machine or build cannot run (UNSUPPORTED).
const KernelSet& select_kernels();

// Portable C++ implementation; every other family is checked against it.
const KernelSet& generic_kernels();

}  // namespace moe_sft::kernels
