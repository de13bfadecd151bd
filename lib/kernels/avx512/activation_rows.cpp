// The SiLU-gated activation rows (gemm.h, activation.h) on 16 lanes at a time: exp by range reduction and
// a polynomial, rounding to bf16 where the scalar definition rounds.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels {

namespace avx512 {

namespace {

// exp(x) to ~1 ulp: x = n ln2 + r with |r| <= ln2/2, degree-6 polynomial for e^r, scaled by 2^n.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.5f)), _mm512_set1_ps(-88.5f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 sigmoid_ps(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

}  // namespace

void silu_mul_row(const float* g, const float* u, int64_t n, bf16* g_out, bf16* u_out, bf16* h_out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 gv = round_to_bf16(_mm512_maskz_loadu_ps(mask, g + i));
    const __m512 uv = round_to_bf16(_mm512_maskz_loadu_ps(mask, u + i));
    store_f32_as_bf16(g_out + i, gv, mask);
    store_f32_as_bf16(u_out + i, uv, mask);
    store_f32_as_bf16(h_out + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid_ps(gv)), uv), mask);
  }
}

float silu_mul_backward_row(const bf16* g, const bf16* u, const float* dh_raw, float w, int64_t n, float* h, bf16* dg,
                            bf16* du) {
  const __m512 one = _mm512_set1_ps(1.0f), wv = _mm512_set1_ps(w);
  __m512 dot = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 gv = load_bf16_as_f32(g + i, mask), uv = load_bf16_as_f32(u + i, mask);
    const __m512 d = _mm512_maskz_loadu_ps(mask, dh_raw + i);
    const __m512 s = sigmoid_ps(gv);
    const __m512 silu = _mm512_mul_ps(gv, s);
    const __m512 hv = round_to_bf16(_mm512_mul_ps(silu, uv));
    _mm512_mask_storeu_ps(h + i, mask, hv);
    dot = _mm512_fmadd_ps(d, hv, dot);
    const __m512 dh = _mm512_mul_ps(wv, d);
    // d silu / dg = s (1 + g (1 - s))
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
    store_f32_as_bf16(dg + i, _mm512_mul_ps(_mm512_mul_ps(dh, uv), dsilu), mask);
    store_f32_as_bf16(du + i, _mm512_mul_ps(dh, silu), mask);
  }
  return _mm512_reduce_add_ps(dot);
}

}  // namespace avx512

}  // namespace moe_sft::kernels

MOE_SFT_AVX512_END
