// Dequantizing a block of a quantized PackedMatrix into the bf16 packed layout, so the bf16 micro-kernels
// of every family run on it unchanged (the block is small, lives in a worker's scratch and is amortized
// over all rows of A; no bf16 copy of a whole weight is ever made).
//
// Writes panels [panel0, panel0 + panels) x column pairs [pair0, pair0 + pairs) of w: pair kp of panel p
// lands at out + (p - panel0) * out_stride + (kp - pair0) * 32, each value bf16(code·scale + bias).
// pair0 and pairs are multiples of 4 (int4 keeps four pairs in one 64-byte unit) and within w's padded
// columns.
#pragma once
#include <cstdint>

#include "kernels/packed_matrix.h"

namespace moe_sft::kernels {

using DequantizeFn = void (*)(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs,
                              bf16* out, int64_t out_stride);

// The bounds above, for MOE_SFT_ASSERT in each family's dequantize.
inline bool dequantize_block_ok(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs) {
  return w.format() != WeightFormat::bf16 && pair0 % 4 == 0 && pairs % 4 == 0 && panel0 >= 0 && panels >= 0 &&
         panel0 + panels <= w.panels() && pair0 >= 0 && 2 * (pair0 + pairs) <= w.padded_cols();
}

}  // namespace moe_sft::kernels
