// The portable rank-r products (low_rank.h): the reference the vectorized families are tested against.
#include "kernels/generic/generic.h"

namespace moe_sft::kernels {

namespace {

template <class TA, class TB>
void axpy_portable(int64_t M, int64_t N, int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb, float alpha,
                   float* c, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    float* crow = c + m * ldc;
    if (!accumulate)
      for (int64_t n = 0; n < N; ++n) crow[n] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float s = alpha * to_float(a[m * as.row_stride + k * as.col_stride]);
      const TB* brow = b + k * ldb;
      for (int64_t n = 0; n < N; ++n) crow[n] += s * to_float(brow[n]);
    }
  }
}

template <class TY>
void dot_portable(int64_t M, int64_t J, int64_t K, const bf16* x, int64_t ldx, const TY* y, int64_t ldy, float alpha,
                  float* c, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < J; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += to_float(x[m * ldx + k]) * to_float(y[j * ldy + k]);
      c[m * ldc + j] = (accumulate ? c[m * ldc + j] : 0.0f) + alpha * acc;
    }
}

}  // namespace

LowRankKernels portable_low_rank() {
  return LowRankKernels{axpy_portable<float, float>, axpy_portable<float, bf16>, axpy_portable<bf16, float>,
                        axpy_portable<bf16, bf16>,  dot_portable<float>,         dot_portable<bf16>};
}

}  // namespace moe_sft::kernels
