#include "kernels/weight_gemm.h"

#include <algorithm>

namespace moe_sft::kernels {

namespace {
constexpr int64_t P = PackedMatrix::kPanelRows;
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
}  // namespace

// d·W of a quantized W: the dequantized block (every row of W, kColBlock columns) has the size of the
// re-paired block the family's gemm_xw makes from it, xw_scratch_elems(rows); the two sit back to back.
int64_t xw_scratch_elems(WeightFormat f, int64_t rows) {
  return xw_scratch_elems(rows) * (f == WeightFormat::bf16 ? 1 : 2);
}

int64_t xwt_scratch_elems(WeightFormat f) { return f == WeightFormat::bf16 ? 0 : kColBlock * 2 * kXwtBlockPairs; }

void gemm_xwt(const KernelSet& kernels, const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  if (w.format() == WeightFormat::bf16) return kernels.gemm_xwt(g);
  if (g.m <= kQuantizedFewRows && kernels.gemm_xwt_quantized_few_rows != nullptr && w.group() % 8 == 0)
    return kernels.gemm_xwt_quantized_few_rows(g);
  const int64_t width = g.c1 - g.c0, panels = (width + P - 1) / P, K = w.cols();
  const int64_t pairs = (K + 1) / 2;
  const int64_t stride = 2 * P * kXwtBlockPairs;  // panel stride of the block
  for (int64_t kp0 = 0; kp0 < pairs; kp0 += kXwtBlockPairs) {
    const int64_t n = std::min(kXwtBlockPairs, pairs - kp0);
    // Whole kColAlign columns: the AMX kernel reads B in tiles of that K, and the pad must be zeros, not scratch.
    kernels.dequantize(w, g.c0 / P, panels, kp0, round_up(n, PackedMatrix::kColAlign / 2), g.scratch, stride);
    const PackedMatrix block = PackedMatrix::view(g.scratch, width, std::min(2 * kXwtBlockPairs, K - 2 * kp0),
                                                  round_up(width, PackedMatrix::kColAlign), 2 * kXwtBlockPairs);
    kernels.gemm_xwt(GemmArgs{g.a + 2 * kp0, g.lda, g.m, &block, 0, width, g.c, g.ldc, g.accumulate || kp0 > 0,
                              nullptr});
  }
}

void gemm_xw(const KernelSet& kernels, const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  if (w.format() == WeightFormat::bf16) return kernels.gemm_xw(g);
  if (g.m <= kQuantizedXwFewRows && kernels.gemm_xw_quantized_few_rows != nullptr && w.group() % 8 == 0)
    return kernels.gemm_xw_quantized_few_rows(g);
  const int64_t width = g.c1 - g.c0, block_cols = round_up(width, PackedMatrix::kColAlign);
  bf16* block_data = g.scratch;
  kernels.dequantize(w, 0, w.panels(), g.c0 / 2, block_cols / 2, block_data, P * block_cols);
  const PackedMatrix block = PackedMatrix::view(block_data, w.rows(), width, w.padded_rows(), block_cols);
  kernels.gemm_xw(GemmArgs{g.a, g.lda, g.m, &block, 0, width, g.c, g.ldc, g.accumulate,
                           g.scratch + xw_scratch_elems(w.rows())});
}

}  // namespace moe_sft::kernels
