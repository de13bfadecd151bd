// gemm_xwt / gemm_xw (gemm.h) for a W in any stored format, and the one place that picks which of a
// family's kernels serves a call, from the format and the rows of A:
//
//   x·W^T  bf16 W:       gemm_xwt
//          quantized W:  xwt_quantized_few_rows while it serves the rows (and the groups), else blocks of
//                        the task's <= kColBlock output columns x kXwtBlockPairs column pairs of W (L1-sized),
//                        each dequantized into scratch and fed to gemm_xwt, accumulated one block of K after
//                        the other;
//   d·W    bf16 W:       xw_few_rows while it serves the rows, else gemm_xw;
//          quantized W:  xw_quantized_few_rows while it serves the rows (and the groups), else the task's
//                        <= kColBlock columns of W over all its rows dequantized into scratch, then as bf16.
//
// Quantized W's blocks are dequantized by the family's decoder for the integer formats and by the one shared
// ISA-neutral decoder (minifloat.h) for fp8_e4m3_block and mxfp4, which never take a few-rows path: their
// blocks go to gemm_xwt / gemm_xw at every row count (the kernels the integer formats' blocks use above their
// few-rows limits), so the only code they add to any family is the shared decoder.
// Nothing larger than a block is ever dequantized.
#pragma once
#include <cstdint>

#include "kernels/gemm.h"

namespace moe_sft::kernels {

constexpr int64_t kXwtBlockPairs = 128;

void gemm_xwt(const KernelSet& kernels, const GemmArgs& args);
void gemm_xw(const KernelSet& kernels, const GemmArgs& args);

}  // namespace moe_sft::kernels
