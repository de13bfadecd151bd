// The AVX-512 panel GEMM (panel_gemm.h) with either way of forming bf16 products: register blocks of up
// to kMaxRows rows x kMaxPanels panels, K cut into L1-sized blocks.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"
#include "kernels/avx512/panel_gemm.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels {

namespace avx512 {

namespace {

constexpr int kMaxRows = 6;     // rows per register block
constexpr int kMaxPanels = 4;   // 16-column panels per register block
constexpr int64_t kPairsPerBlock = 128;  // K block: 4 panels x 128 pairs x 64 B = 32 KiB of B stays in L1
constexpr int64_t kPrefetchPairs = 32;  // B lines fetched this many pairs (2 KiB of a panel) ahead

// acc[r][p] += A[r, 2kp..2kp+1] · B pair kp of panel p by VDPBF16PS.
template <int ROWS, int PANELS>
inline void pair_step_dpbf16(__m512 (&acc)[ROWS][PANELS], const bf16* a, int64_t lda, int64_t kp, int64_t full_pairs,
                             const bf16* b, int64_t panel_stride) {
  __m512bh bv[PANELS];
#pragma GCC unroll 4
  for (int p = 0; p < PANELS; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(b + p * panel_stride + kp * 32);
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    const __m512bh av = (__m512bh)_mm512_set1_epi32(a_pair(a + r * lda, kp, full_pairs));
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], av, bv[p]);
  }
}

// The same by two f32 FMAs on B's widened halves, with A already widened (a_f32: row r's pair i at
// a_f32[r * lda + 2i], 2i + 1). Even elements first, then odd, so only PANELS widened B vectors are live next
// to the accumulators; A's values are broadcast straight from memory (a load, no ALU work).
template <int ROWS, int PANELS>
inline void pair_step_fma(__m512 (&acc)[ROWS][PANELS], const float* a_f32, int64_t lda, int64_t i, const bf16* b,
                          int64_t panel_stride, int64_t kp) {
  __m512 bv[PANELS];
#pragma GCC unroll 4
  for (int p = 0; p < PANELS; ++p) bv[p] = low_half_f32(_mm512_loadu_si512(b + p * panel_stride + kp * 32));
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    const __m512 lo = _mm512_set1_ps(a_f32[r * lda + 2 * i]);
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_fmadd_ps(lo, bv[p], acc[r][p]);
  }
#pragma GCC unroll 4
  for (int p = 0; p < PANELS; ++p) bv[p] = high_half_f32(_mm512_loadu_si512(b + p * panel_stride + kp * 32));
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    const __m512 hi = _mm512_set1_ps(a_f32[r * lda + 2 * i + 1]);
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) acc[r][p] = _mm512_fmadd_ps(hi, bv[p], acc[r][p]);
  }
}

// A's elements [2 kp0, 2 kp0 + n) of ROWS rows widened to f32 into a_f32 (row stride 2 kPairsPerBlock), with
// zeros up to a whole pair: the partner of an odd K's lone last element.
template <int ROWS>
inline void widen_a(const bf16* a, int64_t lda, int64_t kp0, int64_t n, float* a_f32) {
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
    for (int64_t e = 0; e < n; e += 16)
      _mm512_store_ps(a_f32 + r * 2 * kPairsPerBlock + e,
                      load_bf16_as_f32(a + r * lda + 2 * kp0 + e, tail_mask(n - e)));
}

// One register block: ROWS rows x PANELS panels over pairs [kp0, kp1) (at most kPairsPerBlock of them).
template <Products kProducts, int ROWS, int PANELS>
void block(const bf16* a, int64_t lda, int64_t kp0, int64_t kp1, int64_t full_pairs, const bf16* b,
           int64_t panel_stride, float* c, int64_t ldc, __mmask16 last_mask, bool load_c) {
  __m512 acc[ROWS][PANELS];
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) {
      const __mmask16 mask = p == PANELS - 1 ? last_mask : __mmask16(0xffff);
      acc[r][p] = load_c ? _mm512_maskz_loadu_ps(mask, c + r * ldc + 16 * p) : _mm512_setzero_ps();
    }
  alignas(64) float a_f32[kProducts == Products::fma ? ROWS : 1][2 * kPairsPerBlock];
  if constexpr (kProducts == Products::fma) {
    const int64_t elements = (kp1 > full_pairs ? 2 * full_pairs + 1 : 2 * kp1) - 2 * kp0;
    widen_a<ROWS>(a, lda, kp0, elements, a_f32[0]);
  }
  auto step = [&](int64_t kp) {
    if constexpr (kProducts == Products::fma)
      pair_step_fma(acc, a_f32[0], 2 * kPairsPerBlock, kp - kp0, b, panel_stride, kp);
    else
      pair_step_dpbf16(acc, a, lda, kp, full_pairs, b, panel_stride);
  };
  const int64_t kend = kp1 < full_pairs ? kp1 : full_pairs;
  for (int64_t kp = kp0; kp < kend; ++kp) {
    // B streams from memory with little work per line when rows are few: fetch the panels' lines ahead
    // (with many rows they are in L1 already, and the prefetch costs a load slot per 2·ROWS FMAs).
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p)
      _mm_prefetch(reinterpret_cast<const char*>(b + p * panel_stride + (kp + kPrefetchPairs) * 32), _MM_HINT_T0);
    step(kp);
  }
  if (kp1 > full_pairs) step(full_pairs);  // odd K
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < PANELS; ++p) {
      const __mmask16 mask = p == PANELS - 1 ? last_mask : __mmask16(0xffff);
      _mm512_mask_storeu_ps(c + r * ldc + 16 * p, mask, acc[r][p]);
    }
}

using BlockFn = void (*)(const bf16*, int64_t, int64_t, int64_t, int64_t, const bf16*, int64_t, float*, int64_t,
                         __mmask16, bool);
template <Products kProducts>
struct BlockInstances {
  template <int ROWS, int PANELS>
  static constexpr BlockFn at() { return &block<kProducts, ROWS, PANELS>; }
};
// kBlocks<products>.fn[rows - 1][panels - 1]
template <Products kProducts>
constexpr auto kBlocks = Instances<BlockInstances<kProducts>, BlockFn, kMaxRows, kMaxPanels>;

}  // namespace

template <Products kProducts>
void panel_gemm(const bf16* a, int64_t lda, int64_t m, int64_t k, const bf16* b, int64_t panel_stride, int64_t width,
                float* c, int64_t ldc, bool accumulate) {
  const int64_t full_pairs = k / 2, pairs = (k + 1) / 2;
  for (int64_t kp0 = 0; kp0 < pairs || kp0 == 0; kp0 += kPairsPerBlock) {
    const int64_t kp1 = kp0 + kPairsPerBlock < pairs ? kp0 + kPairsPerBlock : pairs;
    const bool load_c = accumulate || kp0 > 0;
    for (int64_t n0 = 0; n0 < width; n0 += 16 * kMaxPanels) {
      const int64_t cols = width - n0 < 16 * kMaxPanels ? width - n0 : 16 * kMaxPanels;
      const int panels = int((cols + 15) / 16);
      const __mmask16 last_mask = tail_mask(cols - 16 * (panels - 1));
      const bf16* bp = b + (n0 / 16) * panel_stride;
      for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
        const int rows = int(m - m0 < kMaxRows ? m - m0 : kMaxRows);
        kBlocks<kProducts>.fn[rows - 1][panels - 1](a + m0 * lda, lda, kp0, kp1, full_pairs, bp, panel_stride,
                                                    c + m0 * ldc + n0, ldc, last_mask, load_c);
      }
    }
    if (pairs == 0) break;
  }
}

template void panel_gemm<Products::dpbf16>(const bf16*, int64_t, int64_t, int64_t, const bf16*, int64_t, int64_t,
                                           float*, int64_t, bool);
template void panel_gemm<Products::fma>(const bf16*, int64_t, int64_t, int64_t, const bf16*, int64_t, int64_t,
                                        float*, int64_t, bool);

}  // namespace avx512

}  // namespace moe_sft::kernels

MOE_SFT_AVX512_END
