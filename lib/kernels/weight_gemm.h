// gemm_xwt / gemm_xw (gemm.h) for a W in any stored format: bf16 goes straight to the family's kernel;
// a quantized W is dequantized block by block into the worker's scratch (dequantize.h) and each block
// goes through the same bf16 kernel. Nothing larger than a block is ever dequantized.
//
//   x·W^T: blocks of the task's <= kColBlock output columns x kXwtBlockPairs column pairs of W (L1-sized),
//          accumulated into C one block of K after the other;
//   d·W:   the task's <= kColBlock columns of W over all its rows (the family's re-pairing reads it next).
#pragma once
#include <cstdint>

#include "kernels/gemm.h"

namespace moe_sft::kernels {

constexpr int64_t kXwtBlockPairs = 128;
// Up to this many rows, x·W^T of a quantized W takes the family's few-rows kernel where it has one
// (KernelSet::gemm_xwt_quantized_few_rows): codes decoded in registers, no block written to scratch. It
// walks int4 units of four pairs, so it serves groups that are a multiple of 8 (all the usual ones).
constexpr int64_t kQuantizedFewRows = 4;
// Up to this many rows, d·W of a quantized W takes the family's few-rows kernel where it has one
// (KernelSet::gemm_xw_quantized_few_rows): the scale folded into A, codes converted in registers.
constexpr int64_t kQuantizedXwFewRows = 8;

void gemm_xwt(const KernelSet& kernels, const GemmArgs& args);
void gemm_xw(const KernelSet& kernels, const GemmArgs& args);

// bf16 elements of GemmArgs::scratch a call needs for a W of format f with `rows` rows (d·W) or for x·W^T.
int64_t xw_scratch_elems(WeightFormat f, int64_t rows);
int64_t xwt_scratch_elems(WeightFormat f);

}  // namespace moe_sft::kernels
