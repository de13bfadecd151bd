// The two AVX-512 KernelSets: avx512_bf16 and avx512_fma differ only in how the panel GEMM forms its
// products (panel_gemm.h) and so in how many rows d·W's few-rows path is worth; every other kernel is shared.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/panel_gemm.h"
#include "kernels/avx512/target.h"
#include "kernels/repack.h"
#include "runtime/assert.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

namespace moe_sft::kernels {

namespace {

template <avx512::Products kProducts>
void gemm_xwt(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  const int64_t stride = PackedMatrix::kPanelRows * w.padded_cols();
  avx512::panel_gemm<kProducts>(g.a, g.lda, g.m, w.cols(), w.panel(g.c0 / PackedMatrix::kPanelRows), stride,
                                g.c1 - g.c0, g.c, g.ldc, g.accumulate);
}

// d·W for any number of rows: W's block re-paired once into scratch, then the panel GEMM over it.
template <avx512::Products kProducts>
void gemm_xw(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  MOE_SFT_ASSERT(g.scratch_elems < 0 || g.scratch_elems >= xw_block_elems(w.rows()));
  avx512::repack_transposed(w, g.c0, g.c1 - g.c0, g.scratch);
  avx512::panel_gemm<kProducts>(g.a, g.lda, g.m, w.rows(), g.scratch, repacked_panel_stride(w), g.c1 - g.c0, g.c,
                                g.ldc, g.accumulate);
}

// Up to this many rows bf16 d·W takes the few-rows path (no re-pairing, f32 FMAs); above, the block is
// re-paired once and the panel GEMM runs over it. Where VDPBF16PS issues at a fraction of the FMA rate
// (avx512_fma is chosen there) the few-rows path is the faster one up to the size of its accumulator
// buffer. Where VDPBF16PS issues at the FMA rate it spends two FMAs where the panel GEMM spends one
// VDPBF16PS, so it stops paying off at about 4 rows, where the re-pairing's 3 permutes per vector are shared
// by enough rows (an estimate from instruction counts).
template <avx512::Products kProducts>
constexpr int64_t kBf16XwFewRows = kProducts == avx512::Products::fma ? avx512::kXwFewRows : 4;
static_assert(kBf16XwFewRows<avx512::Products::fma> <= avx512::kXwFewRows &&
                  kBf16XwFewRows<avx512::Products::dpbf16> <= avx512::kXwFewRows,
              "gemm_xw_few_rows' buffers hold avx512::kXwFewRows rows");
// Quantized d·W: the scale folded into A and the codes converted in registers beat dequantizing a block up
// to the kernel's row limit for both ways of forming products.
constexpr int64_t kQuantizedXwFewRows = avx512::kXwFewRows;
// The few-rows path's widened A must fit where a re-paired block would go, so the d·W scratch a family
// states for its general path covers it (scratch_elems takes the larger anyway).
static_assert(2 * avx512::kXwFewRows <= kColBlock, "widened A of the few-rows path outgrows a re-paired block");

template <avx512::Products kProducts>
KernelSet make_family(const char* name) {
  KernelSet s{};
  s.name = name;
  s.gemm_xwt = gemm_xwt<kProducts>;
  s.gemm_xw = gemm_xw<kProducts>;
  s.xw_repairs = true;
  s.xw_few_rows = {avx512::gemm_xw_few_rows, kBf16XwFewRows<kProducts>, avx512::xw_few_rows_scratch_elems};
  s.xw_quantized_few_rows = {avx512::gemm_xw_few_rows, kQuantizedXwFewRows, avx512::xw_few_rows_scratch_elems};
  s.xwt_quantized_few_rows = {avx512::gemm_xwt_quantized_few_rows, avx512::kXwtQuantizedFewRows, nullptr};
  s.silu_mul_row = avx512::silu_mul_row;
  s.silu_mul_backward_row = avx512::silu_mul_backward_row;
  s.low_rank = avx512::low_rank_kernels();
  s.dequantize = avx512::dequantize;
  return s;
}

}  // namespace

const KernelSet& avx512_bf16_kernels() {
  static const KernelSet set = make_family<avx512::Products::dpbf16>("avx512_bf16");
  return set;
}

const KernelSet& avx512_fma_kernels() {
  static const KernelSet set = make_family<avx512::Products::fma>("avx512_fma");
  return set;
}

}  // namespace moe_sft::kernels

MOE_SFT_AVX512_END
