// AVX-512 dequantization of quantized panels into bf16 panels (see dequantize.h).
//
// A bf16 pair vector holds 16 rows x 2 columns, (row r, column a) at lane 2r + a. VCVTNE2PS2BF16 writes its
// second source's 16 floats to lanes 0-15 and its first source's to lanes 16-31, so the codes are widened in
// two halves of 16 (rows 0-7 and rows 8-15, each in pair order) and every half needs its rows' scales
// duplicated per lane pair: VPERMPS from the panel's 16 per-row scales, once per group. (No std:: template
// is instantiated under the target pragma: see gemm_avx512_bf16.cpp.)
#include "kernels/dequantize.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include <immintrin.h>

namespace moe_sft::kernels {

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows;

struct HalfScales {
  __m512 scale[2], bias[2];  // [0]: rows 0-7, [1]: rows 8-15, each row's value in two adjacent lanes
};

HalfScales group_scales(const PackedMatrix& w, int64_t p, int64_t g) {
  const int64_t at = g * P;
  __m512 s, b;
  switch (w.format()) {
    case WeightFormat::int4_k2:
      s = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scales_bf16(p) + at))), 16));
      b = _mm512_mul_ps(s, _mm512_set1_ps(-8.0f));
      break;
    case WeightFormat::int4_awq:
      s = _mm512_loadu_ps(w.scales_f32(p) + at);
      b = _mm512_loadu_ps(w.biases(p) + at);
      break;
    default:
      s = _mm512_loadu_ps(w.scales_f32(p) + at);
      b = _mm512_setzero_ps();
  }
  const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  return {{_mm512_permutexvar_ps(lo, s), _mm512_permutexvar_ps(hi, s)},
          {_mm512_permutexvar_ps(lo, b), _mm512_permutexvar_ps(hi, b)}};
}

// code·scale + bias for both halves of one pair, rounded to bf16 and stored.
inline void store_pair(__m512i codes_lo, __m512i codes_hi, const HalfScales& hs, bf16* dst) {
  const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes_lo), hs.scale[0], hs.bias[0]);
  const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes_hi), hs.scale[1], hs.bias[1]);
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

inline __m512i widen_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
inline __m512i widen_i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }

}  // namespace

void dequantize_avx512(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs, bf16* out,
                       int64_t out_stride) {
  const bool int4 = is_int4(w.format());
  const __m512i nibble = _mm512_set1_epi32(0xF);
  const int64_t group_pairs = w.group() / 2;  // groups are whole pairs (validated at create)
  for (int64_t p = panel0; p < panel0 + panels; ++p) {
    const uint8_t* codes = w.codes(p);
    bf16* dst = out + (p - panel0) * out_stride - pair0 * 2 * P;
    for (int64_t kp = pair0; kp < pair0 + pairs;) {
      const int64_t g = kp / group_pairs;
      const int64_t group_end = (g + 1) * group_pairs, end = group_end < pair0 + pairs ? group_end : pair0 + pairs;
      const HalfScales hs = group_scales(w, p, g);
      if (!int4) {
        for (; kp < end; ++kp)
          store_pair(widen_i8(codes + kp * 2 * P), widen_i8(codes + kp * 2 * P + P), hs, dst + kp * 2 * P);
        continue;
      }
      for (; kp < end;) {
        const uint8_t* unit = codes + (kp / 2) * 2 * P;  // pairs 2j and 2j + 1 share these 32 bytes
        const __m512i lo = widen_u8(unit), hi = widen_u8(unit + P);
        if (kp % 2 == 0) {
          store_pair(_mm512_and_si512(lo, nibble), _mm512_and_si512(hi, nibble), hs, dst + kp * 2 * P);
          if (++kp == end) break;
        }
        store_pair(_mm512_srli_epi32(lo, 4), _mm512_srli_epi32(hi, 4), hs, dst + kp * 2 * P);
        ++kp;
      }
    }
  }
}

}  // namespace moe_sft::kernels

#pragma GCC pop_options
