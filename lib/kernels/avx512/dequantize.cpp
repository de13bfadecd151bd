// AVX-512 dequantization of quantized panels into bf16 panels (see dequantize.h).
//
// A bf16 pair vector holds 16 rows x 2 columns, (row r, column a) at lane 2r + a. VCVTNE2PS2BF16 writes its
// second source's 16 floats to lanes 0-15 and its first source's to lanes 16-31, so the codes are widened in
// two halves of 16 (rows 0-7 and rows 8-15, each in pair order) and every half needs its rows' scales
// duplicated per lane pair: VPERMPS from the panel's 16 per-row scales, once per group.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"
#include "kernels/dequantize.h"
#include "runtime/assert.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels::avx512 {

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows;

struct HalfScales {
  __m512 scale[2], bias[2];  // [0]: rows 0-7, [1]: rows 8-15, each row's value in two adjacent lanes
};

HalfScales group_scales(const PackedMatrix& w, int64_t p, int64_t g) {
  const __m512 s = group_scale(w, p, g), b = group_bias(w, p, g, s);
  const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  return {{_mm512_permutexvar_ps(lo, s), _mm512_permutexvar_ps(hi, s)},
          {_mm512_permutexvar_ps(lo, b), _mm512_permutexvar_ps(hi, b)}};
}

// code·scale + bias for both halves of one pair (codes as exact integers in f32), rounded to bf16 and stored.
inline void store_pair(__m512 codes_lo, __m512 codes_hi, const HalfScales& hs, bf16* dst) {
  const __m512 lo = _mm512_fmadd_ps(codes_lo, hs.scale[0], hs.bias[0]);
  const __m512 hi = _mm512_fmadd_ps(codes_hi, hs.scale[1], hs.bias[1]);
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

inline __m512 widen_i8(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 widen_u16(__m256i words) { return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(words)); }

}  // namespace

void dequantize(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs, bf16* out,
                int64_t out_stride) {
  MOE_SFT_ASSERT(dequantize_block_ok(w, panel0, panels, pair0, pairs));
  const bool int4 = is_int4(w.format());
  const __m512i nibble = _mm512_set1_epi16(0xF);
  const int64_t group_pairs = w.group() / 2;  // groups are whole pairs (validated at create)
  for (int64_t p = panel0; p < panel0 + panels; ++p) {
    const uint8_t* codes = w.codes(p);
    bf16* dst = out + (p - panel0) * out_stride - pair0 * 2 * P;
    for (int64_t kp = pair0; kp < pair0 + pairs;) {
      const int64_t g = kp / group_pairs;
      const int64_t group_end = (g + 1) * group_pairs, end = group_end < pair0 + pairs ? group_end : pair0 + pairs;
      const HalfScales hs = group_scales(w, p, g);
      for (; kp < end; ++kp) {
        if (int4) {  // pair kp's codes: bits 4 (kp % 4) of the 32 words of unit kp / 4
          const __m512i words = _mm512_loadu_si512(codes + (kp / 4) * 4 * P);
          const __m512i v = _mm512_and_si512(_mm512_srl_epi16(words, _mm_cvtsi32_si128(int(4 * (kp % 4)))), nibble);
          store_pair(widen_u16(_mm512_castsi512_si256(v)), widen_u16(_mm512_extracti64x4_epi64(v, 1)), hs,
                     dst + kp * 2 * P);
        } else {
          store_pair(widen_i8(codes + kp * 2 * P), widen_i8(codes + kp * 2 * P + P), hs, dst + kp * 2 * P);
        }
      }
    }
  }
}

}  // namespace moe_sft::kernels::avx512

MOE_SFT_AVX512_END
