// Re-pairing a block of a PackedMatrix for d·W products. The packed layout pairs W's elements along its
// columns (what x·W^T contracts over); d·W contracts over W's rows, so a kernel re-pairs the block of
// columns [c0, c0 + width) it is about to produce into panels of the same format, transposed:
//
//   out panel q (columns c0 + 16q .. c0 + 16q + 15), row pair j, column c, a in {0, 1}:
//     out[q * padded_rows * 16 + j * 32 + c * 2 + a] = W[2j + a][c0 + 16q + c]
//
// so the one x·W^T micro-kernel serves both directions. The block is amortized over all rows of A.
#pragma once
#include <cstdint>

#include "kernels/packed_matrix.h"

namespace moe_sft::kernels {

// Panel stride of repacked blocks (elements).
inline int64_t repacked_panel_stride(const PackedMatrix& w) { return w.padded_rows() * PackedMatrix::kPanelRows; }

// A family's re-pairing of columns [c0, c0 + width) of w into `out` (repacked_panel_stride(w) per output
// panel): c0 a multiple of 32; writes ceil(width / 16) panels. generic/ and avx512/ define one each.
using RepackFn = void (*)(const PackedMatrix& w, int64_t c0, int64_t width, bf16* out);

// The bounds above, for MOE_SFT_ASSERT in each family's re-pairing.
inline bool repack_block_ok(const PackedMatrix& w, int64_t c0, int64_t width) {
  return w.format() == WeightFormat::bf16 && c0 >= 0 && c0 % (2 * PackedMatrix::kPanelRows) == 0 && width >= 0 &&
         c0 + width <= w.padded_cols();
}

}  // namespace moe_sft::kernels
