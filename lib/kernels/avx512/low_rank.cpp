// The rank-r products of the LoRA terms (low_rank.h), vectorized along the contiguous operand.
#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"

MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

#include "kernels/avx512/vector.h"

namespace moe_sft::kernels {

namespace avx512 {

namespace {

// ROWS rows of C x VECS vectors of 16 columns, over all K: A elements broadcast, B rows loaded once per k
// and shared by the ROWS rows.
template <int ROWS, int VECS, class TA, class TB>
void axpy_block(int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, __mmask16 last, float alpha, float* c,
                int64_t ldc, bool accumulate) {
  __m512 acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[VECS];
    for (int v = 0; v < VECS; ++v) bv[v] = load_f32(b + k * ldb + 16 * v, v == VECS - 1 ? last : __mmask16(0xffff));
    for (int r = 0; r < ROWS; ++r) {
      const __m512 av = _mm512_set1_ps(to_float(a[r * as.row_stride + k * as.col_stride]));
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) {
      const __mmask16 mask = v == VECS - 1 ? last : __mmask16(0xffff);
      float* cp = c + r * ldc + 16 * v;
      const __m512 prior = accumulate ? _mm512_maskz_loadu_ps(mask, cp) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(cp, mask, _mm512_fmadd_ps(al, acc[r][v], prior));
    }
}

template <int ROWS, class TA, class TB>
void axpy_rows(int vecs, int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, __mmask16 last, float alpha,
               float* c, int64_t ldc, bool accumulate) {
  switch (vecs) {
    case 1: return axpy_block<ROWS, 1>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
    case 2: return axpy_block<ROWS, 2>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
    case 3: return axpy_block<ROWS, 3>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
    default: return axpy_block<ROWS, 4>(K, a, as, b, ldb, last, alpha, c, ldc, accumulate);
  }
}

template <class TA, class TB>
void axpy(int64_t M, int64_t N, int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, float alpha, float* c,
          int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t cols = N - n0 < 64 ? N - n0 : 64;
    const int vecs = int((cols + 15) / 16);
    const __mmask16 last = tail_mask(cols - 16 * (vecs - 1));
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4)
      axpy_rows<4>(vecs, K, a + m0 * as.row_stride, as, b + n0, ldb, last, alpha, c + m0 * ldc + n0, ldc, accumulate);
    for (; m0 < M; ++m0)
      axpy_rows<1>(vecs, K, a + m0 * as.row_stride, as, b + n0, ldb, last, alpha, c + m0 * ldc + n0, ldc, accumulate);
  }
}

// One row of X against up to 16 rows of Y: one accumulator per Y row, reduced at the end.
template <class TY>
void dot(int64_t M, int64_t J, int64_t K, const bf16* x, int64_t ldx, const TY* y, int64_t ldy, float alpha, float* c,
         int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j0 = 0; j0 < J; j0 += 16) {
      const int jn = int(J - j0 < 16 ? J - j0 : 16);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const __mmask16 mask = tail_mask(K - k0);
        const __m512 xv = load_bf16_as_f32(x + m * ldx + k0, mask);
        for (int j = 0; j < jn; ++j) acc[j] = _mm512_fmadd_ps(xv, load_f32(y + (j0 + j) * ldy + k0, mask), acc[j]);
      }
      for (int j = 0; j < jn; ++j) {
        float* cp = c + m * ldc + j0 + j;
        *cp = (accumulate ? *cp : 0.0f) + alpha * _mm512_reduce_add_ps(acc[j]);
      }
    }
}

}  // namespace

LowRankKernels low_rank_kernels() {
  return LowRankKernels{axpy<float, float>, axpy<float, bf16>, axpy<bf16, float>,
                        axpy<bf16, bf16>,   dot<float>,         dot<bf16>};
}

}  // namespace avx512

}  // namespace moe_sft::kernels

MOE_SFT_AVX512_END
