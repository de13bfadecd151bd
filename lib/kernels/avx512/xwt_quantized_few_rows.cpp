// x·W^T for a quantized W and a few rows of A (KernelSet::xwt_quantized_few_rows), straight from the codes.
//
// With few rows, dequantizing a block to scratch and reading it back costs more than the products. Here
// each B vector is decoded in registers to exact small integers in bf16 and multiplied into per-group f32
// accumulators; the group's scale is applied once per group:
//   int8: the code q itself (|q| <= 128 is exact in bf16), and C += scale ⊙ acc.
//   int4: 128 + code, by OR-ing the code into the mantissa of 128.0 (0x4300), four pairs per 64-byte load;
//         since
//         code·s + bias = (128 + code)·s + (bias - 128·s), C += s ⊙ acc + (bias - 128·s) ⊙ (sum of A's
//         group), with A's group sums taken once per row.
// The tail masks and A's pair words are spelled out here rather than taken from vector.h's tail_mask and
// a_pair: with the helpers GCC allocates this kernel's accumulators differently; keep the explicit forms.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"
#include "runtime/assert.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels::avx512 {

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows;
constexpr int kMaxPanels = int(kColBlock / P);
static_assert(kColBlock % P == 0, "a column block must be whole panels");
static_assert(kFewRowsGroupMultiple % 8 == 0, "int4 is decoded in units of four pairs: groups must be whole units");

// Pair kp of a panel's codes as exact bf16 integers (see the file comment).
inline __m512bh decode_int8(const uint8_t* codes, int64_t kp) {
  const uint8_t* pair = codes + kp * 2 * P;
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + P))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}
// The four pairs of an int4 unit (packed_matrix.h): nibble i of every word, OR-ed into 128.0's mantissa.
inline void decode_int4_unit(const uint8_t* codes, int64_t unit, __m512bh (&out)[4]) {
  const __m512i words = _mm512_loadu_si512(codes + unit * 4 * P);
  const __m512i low = _mm512_set1_epi16(0x000F), exponent = _mm512_set1_epi16(0x4300);
  // (A & B) | C as one ternary logic op: A = shifted words, B = 0x000F, C = 0x4300
  out[0] = (__m512bh)_mm512_ternarylogic_epi32(words, low, exponent, 0xEA);
  out[1] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), low, exponent, 0xEA);
  out[2] = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), low, exponent, 0xEA);
  out[3] = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 12), exponent);
}

inline float sum_bf16(const bf16* p, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    acc = _mm512_add_ps(acc, load_bf16_as_f32(p + i, n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1)));
  }
  return _mm512_reduce_add_ps(acc);
}

// bias - 128·scale: the constant the 128 offset of int4's decoded codes calls for.
inline __m512 group_offset(const PackedMatrix& w, int64_t panel, int64_t g, __m512 scale) {
  return _mm512_fnmadd_ps(scale, _mm512_set1_ps(128.0f), group_bias(w, panel, g, scale));
}

template <bool INT4, int ROWS, int PANELS>
void few_rows(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  const int64_t K = w.cols(), pairs = (K + 1) / 2, full_pairs = K / 2, group_pairs = w.group() / 2;
  const int64_t panel0 = g.c0 / P, width = g.c1 - g.c0;
  const __mmask16 last = width - (PANELS - 1) * P >= P ? __mmask16(0xffff) : __mmask16((1u << (width - (PANELS - 1) * P)) - 1);
  const uint8_t* codes[PANELS];
  for (int q = 0; q < PANELS; ++q) codes[q] = w.codes(panel0 + q);
  if (!g.accumulate)
    for (int r = 0; r < ROWS; ++r)
      for (int q = 0; q < PANELS; ++q) _mm512_mask_storeu_ps(g.c + r * g.ldc + q * P, q == PANELS - 1 ? last : 0xffff, _mm512_setzero_ps());

  for (int64_t g0 = 0; g0 < pairs; g0 += group_pairs) {
    const int64_t gend = g0 + group_pairs < pairs ? g0 + group_pairs : pairs;
    __m512 acc[ROWS][PANELS];
    for (int r = 0; r < ROWS; ++r)
      for (int q = 0; q < PANELS; ++q) acc[r][q] = _mm512_setzero_ps();
    // int4 walks whole units of four pairs (the caller guarantees groups of them); int8 one pair at a time.
    for (int64_t kp = g0; kp < gend; kp += INT4 ? 4 : 1) {
      __m512bh b[PANELS][4];
      for (int q = 0; q < PANELS; ++q) {
        if (INT4) decode_int4_unit(codes[q], kp / 4, b[q]);
        else b[q][0] = decode_int8(codes[q], kp);
      }
      for (int i = 0; i < (INT4 ? 4 : 1); ++i)
        for (int r = 0; r < ROWS; ++r) {
          const int64_t at = kp + i;
          // Beyond K: 0, so the padding's codes contribute nothing.
          int32_t pair = 0;
          if (at < full_pairs) std::memcpy(&pair, g.a + r * g.lda + 2 * at, sizeof pair);
          else if (at < pairs) pair = int32_t(g.a[r * g.lda + 2 * at].bits);  // odd K: one element, partner 0
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
          for (int q = 0; q < PANELS; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, b[q][i]);
        }
    }
    float a_sum[ROWS] = {};
    if (INT4)
      for (int r = 0; r < ROWS; ++r) a_sum[r] = sum_bf16(g.a + r * g.lda + 2 * g0, (2 * gend < K ? 2 * gend : K) - 2 * g0);
    const int64_t group = g0 / group_pairs;
    for (int q = 0; q < PANELS; ++q) {
      const __m512 scale = group_scale(w, panel0 + q, group);
      const __m512 offset = INT4 ? group_offset(w, panel0 + q, group, scale) : _mm512_setzero_ps();
      const __mmask16 mask = q == PANELS - 1 ? last : __mmask16(0xffff);
      for (int r = 0; r < ROWS; ++r) {
        float* cp = g.c + r * g.ldc + q * P;
        __m512 c = _mm512_fmadd_ps(scale, acc[r][q], _mm512_maskz_loadu_ps(mask, cp));
        if (INT4) c = _mm512_fmadd_ps(offset, _mm512_set1_ps(a_sum[r]), c);
        _mm512_mask_storeu_ps(cp, mask, c);
      }
    }
  }
}

using FewRowsFn = void (*)(const GemmArgs&);
template <bool INT4>
struct FewRowsInstances {
  template <int ROWS, int PANELS>
  static constexpr FewRowsFn at() { return &few_rows<INT4, ROWS, PANELS>; }
};
// .fn[rows - 1][panels - 1]
constexpr auto kInt8 = Instances<FewRowsInstances<false>, FewRowsFn, int(kXwtQuantizedFewRows), kMaxPanels>;
constexpr auto kInt4 = Instances<FewRowsInstances<true>, FewRowsFn, int(kXwtQuantizedFewRows), kMaxPanels>;

}  // namespace

void gemm_xwt_quantized_few_rows(const GemmArgs& g) {
  MOE_SFT_ASSERT(g.m <= kXwtQuantizedFewRows && g.c1 - g.c0 <= kColBlock);
  MOE_SFT_ASSERT(g.w->format() != WeightFormat::bf16 && g.w->group() % kFewRowsGroupMultiple == 0);
  if (g.m == 0) return;
  const int panels = int((g.c1 - g.c0 + P - 1) / P);
  MOE_SFT_ASSERT(panels >= 1);
  (is_int4(g.w->format()) ? kInt4.fn : kInt8.fn)[g.m - 1][panels - 1](g);
}

}  // namespace moe_sft::kernels::avx512

MOE_SFT_AVX512_END
