#include "kernels/weight_gemm.h"

#include <algorithm>

#include "kernels/minifloat.h"
#include "runtime/assert.h"

namespace moe_sft::kernels {

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows;
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// x·W^T's dequantized block: kColBlock columns x kXwtBlockPairs column pairs.
constexpr int64_t kXwtBlockElems = kColBlock * 2 * kXwtBlockPairs;
// Whole int4 units of four pairs, so the block's K can be cut anywhere dequantize.h allows.
static_assert(kXwtBlockPairs % 4 == 0, "x·W^T blocks must be whole int4 units");
static_assert(kColBlock % P == 0, "a column block must be whole panels");
static_assert(kColBlock % PackedMatrix::kColAlign == 0, "d·W's dequantized block must be whole AMX tiles");

// A quantized few-rows path decodes the integer formats only: the minifloat formats always take the
// dequantized-block path through the shared decoder.
bool serves(const FewRowsPath& path, const GemmArgs& g) {
  return path.run != nullptr && g.m <= path.max_rows && !is_minifloat(g.w->format()) &&
         (g.w->format() == WeightFormat::bf16 || g.w->group() % kFewRowsGroupMultiple == 0);
}

// The decoder of a quantized W's blocks: the family's for the integer formats, the one ISA-neutral decoder
// (minifloat.h) for the minifloat formats, whatever the family.
DequantizeFn dequantizer(const KernelSet& k, WeightFormat f) {
  return is_minifloat(f) ? dequantize_minifloat : k.dequantize;
}

int64_t few_rows_scratch(const FewRowsPath& path, int64_t w_rows) {
  return path.run != nullptr && path.scratch_elems != nullptr ? path.scratch_elems(path.max_rows, w_rows) : 0;
}

// The scratch of d·W on a bf16 W (stored so or a dequantized block): the family's gemm_xw or its few-rows path.
int64_t xw_bf16_scratch(const KernelSet& k, int64_t w_rows) {
  return std::max(k.xw_repairs ? xw_block_elems(w_rows) : 0, few_rows_scratch(k.xw_few_rows, w_rows));
}

// What every call must satisfy (gemm.h).
void check_call(const GemmArgs& g, int64_t out_cols) {
  MOE_SFT_ASSERT(g.m >= 0 && g.c0 >= 0 && g.c0 <= g.c1 && g.c1 <= out_cols);
  MOE_SFT_ASSERT(g.c0 % kColBlock == 0);
  MOE_SFT_ASSERT(g.c1 - g.c0 <= kColBlock);
  MOE_SFT_ASSERT(MOE_SFT_ALIGNED(g.scratch, 64));
  (void)out_cols;
}

void xw_bf16(const KernelSet& k, const GemmArgs& g) {
  if (serves(k.xw_few_rows, g)) return k.xw_few_rows.run(g);
  k.gemm_xw(g);
}

}  // namespace

int64_t KernelSet::scratch_elems(GemmOp op, WeightFormat f, int64_t w_rows) const {
  const bool bf16 = f == WeightFormat::bf16;
  if (op == GemmOp::xwt) return bf16 ? 0 : kXwtBlockElems;
  if (bf16) return xw_bf16_scratch(*this, w_rows);
  // The dequantized block and, behind it, what d·W on it needs; or the few-rows path's.
  return std::max(xw_block_elems(w_rows) + xw_bf16_scratch(*this, w_rows),
                  is_minifloat(f) ? 0 : few_rows_scratch(xw_quantized_few_rows, w_rows));
}

void gemm_xwt(const KernelSet& kernels, const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  check_call(g, w.rows());
  if (w.format() == WeightFormat::bf16) return kernels.gemm_xwt(g);
  if (serves(kernels.xwt_quantized_few_rows, g)) return kernels.xwt_quantized_few_rows.run(g);
  MOE_SFT_ASSERT(g.scratch_elems < 0 || g.scratch_elems >= kXwtBlockElems);
  const int64_t width = g.c1 - g.c0, panels = (width + P - 1) / P, K = w.cols();
  const int64_t pairs = (K + 1) / 2;
  const int64_t stride = 2 * P * kXwtBlockPairs;  // panel stride of the block
  for (int64_t kp0 = 0; kp0 < pairs; kp0 += kXwtBlockPairs) {
    const int64_t n = std::min(kXwtBlockPairs, pairs - kp0);
    // Whole kColAlign columns: the AMX kernel reads B in tiles of that K, and the pad must be zeros, not scratch.
    dequantizer(kernels, w.format())(w, g.c0 / P, panels, kp0, round_up(n, PackedMatrix::kColAlign / 2), g.scratch,
                                     stride);
    const PackedMatrix block = PackedMatrix::view(g.scratch, width, std::min(2 * kXwtBlockPairs, K - 2 * kp0),
                                                  round_up(width, PackedMatrix::kColAlign), 2 * kXwtBlockPairs);
    kernels.gemm_xwt(GemmArgs{g.a + 2 * kp0, g.lda, g.m, &block, 0, width, g.c, g.ldc, g.accumulate || kp0 > 0,
                              nullptr, 0});
  }
}

void gemm_xw(const KernelSet& kernels, const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  check_call(g, w.cols());
  if (w.format() == WeightFormat::bf16) return xw_bf16(kernels, g);
  if (serves(kernels.xw_quantized_few_rows, g)) return kernels.xw_quantized_few_rows.run(g);
  const int64_t width = g.c1 - g.c0, block_cols = round_up(width, PackedMatrix::kColAlign);
  const int64_t block_elems = xw_block_elems(w.rows());
  MOE_SFT_ASSERT(g.scratch_elems < 0 || g.scratch_elems >= block_elems);
  MOE_SFT_ASSERT(w.panels() * P * block_cols <= block_elems);
  bf16* block_data = g.scratch;
  dequantizer(kernels, w.format())(w, 0, w.panels(), g.c0 / 2, block_cols / 2, block_data, P * block_cols);
  const PackedMatrix block = PackedMatrix::view(block_data, w.rows(), width, w.padded_rows(), block_cols);
  const GemmArgs on_block{g.a, g.lda, g.m, &block, 0, width, g.c, g.ldc, g.accumulate, g.scratch + block_elems,
                          g.scratch_elems < 0 ? -1 : g.scratch_elems - block_elems};
  // The minifloat formats' blocks go to the general d·W kernel at every row count: the one path the integer
  // formats' blocks also take (above their few-rows limits), never a family's few-rows kernel on a block.
  if (is_minifloat(w.format())) return kernels.gemm_xw(on_block);
  xw_bf16(kernels, on_block);
}

}  // namespace moe_sft::kernels
