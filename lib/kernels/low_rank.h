// Small dense products for the rank-r LoRA terms: C (=|+=) alpha · A · B with arbitrary element strides,
// A and B of any element type with a to_float (bf16 or f32). All six LoRA shapes of forward and backward
// (x·A^T, p·B^T, d·B, q·A, d^T·p, q^T·x) are this one template with different strides. The products are
// memory-bound (r is small), so the loop order is chosen to stream the larger operand contiguously.
#pragma once
#include <cstdint>

#include "runtime/bf16.h"

namespace moe_sft::kernels {

struct Strided {
  int64_t row_stride, col_stride;
};

// C[m, n] = alpha * sum_k A(m, k) B(k, n) (+ C[m, n] if accumulate), m < M, n < N, k < K;
// A(m, k) = a[m * as.row_stride + k * as.col_stride], likewise B; C row-major with ldc.
template <class TA, class TB>
void small_gemm(int64_t M, int64_t N, int64_t K, const TA* a, Strided as, const TB* b, Strided bs, float alpha,
                float* c, int64_t ldc, bool accumulate) {
  if (!accumulate)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) c[m * ldc + n] = 0.0f;
  if (bs.col_stride == 1) {
    // axpy order: each A element scales one contiguous row of B into one contiguous row of C.
    for (int64_t m = 0; m < M; ++m) {
      float* crow = c + m * ldc;
      for (int64_t k = 0; k < K; ++k) {
        float s = alpha * to_float(a[m * as.row_stride + k * as.col_stride]);
        const TB* brow = b + k * bs.row_stride;
        for (int64_t n = 0; n < N; ++n) crow[n] += s * to_float(brow[n]);
      }
    }
  } else {
    // dot order: both operands walk k (contiguously in the x·A^T and p·B^T cases).
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k)
          acc += to_float(a[m * as.row_stride + k * as.col_stride]) * to_float(b[k * bs.row_stride + n * bs.col_stride]);
        c[m * ldc + n] += alpha * acc;
      }
  }
}

}  // namespace moe_sft::kernels
