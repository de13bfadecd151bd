// The two AVX-512 KernelSets: avx512_bf16 and avx512_fma differ only in how the panel GEMM forms its
// products (panel_gemm.h); every other kernel is shared.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"
#include "kernels/avx512/panel_gemm.h"
#include "kernels/repack.h"

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

// Up to this many rows d·W takes the small-M path (no re-pairing, f32 FMAs); above, the block is re-paired
// once and the panel GEMM runs over it. With VDPBF16PS at a quarter of the FMA rate (measured here) the
// small-M path is the faster one up to the size of its accumulator buffer. With VDPBF16PS at the FMA rate
// (Zen 4) it spends two FMAs where the panel GEMM spends one VDPBF16PS, so it should stop paying off at
// about 4 rows, where the re-pairing's 3 permutes per vector are shared by enough rows (an estimate from
// instruction counts: no such core was at hand).
template <avx512::Products kProducts>
constexpr int64_t kSmallM = kProducts == avx512::Products::fma ? avx512::kXwFewRows : 4;

template <avx512::Products kProducts>
void gemm_xw(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  if (g.m <= kSmallM<kProducts>) return avx512::gemm_xw_few_rows(g);
  avx512::repack_transposed(w, g.c0, g.c1 - g.c0, g.scratch);
  avx512::panel_gemm<kProducts>(g.a, g.lda, g.m, w.rows(), g.scratch, repacked_panel_stride(w), g.c1 - g.c0, g.c,
                                g.ldc, g.accumulate);
}

template <avx512::Products kProducts>
KernelSet make_family(const char* name) {
  return KernelSet{name, gemm_xwt<kProducts>, gemm_xw<kProducts>, avx512::silu_mul_row,
                   avx512::silu_mul_backward_row,
                   avx512::low_rank_kernels(), avx512::dequantize, avx512::gemm_xwt_quantized_few_rows, avx512::gemm_xw_few_rows};
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
