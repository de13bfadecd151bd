// Small dense products for the rank-r LoRA terms. Two shapes cover every term of forward and backward:
//
//   axpy:  C[M, N] (=|+=) alpha · A · B     A(m, k) = a[m * as.row_stride + k * as.col_stride] (any strides),
//                                          B's rows contiguous: B(k, n) = b[k * ldb + n]
//   dot:   C[M, J] (=|+=) alpha · X · Y^T   X (bf16) and Y rows contiguous: C[m, j] = sum_k X[m, k] Y[j, k]
//
// Operands are bf16 or f32 (LoRA arrays come in either); accumulation is f32. They are memory-bound (r is
// small), so each family vectorizes along the contiguous operand; KernelSet carries each family's
// instances (generic/low_rank_generic.cpp holds the portable reference).
#pragma once
#include <cstdint>

#include "runtime/bf16.h"

namespace moe_sft::kernels {

struct Strided {
  int64_t row_stride, col_stride;
};

template <class TA, class TB>
using LowRankAxpy = void (*)(int64_t M, int64_t N, int64_t K, const TA* a, Strided as, const TB* b, int64_t ldb,
                             float alpha, float* c, int64_t ldc, bool accumulate);
template <class TY>
using LowRankDot = void (*)(int64_t M, int64_t J, int64_t K, const bf16* x, int64_t ldx, const TY* y, int64_t ldy,
                            float alpha, float* c, int64_t ldc, bool accumulate);

struct LowRankKernels {
  LowRankAxpy<float, float> axpy_ff;
  LowRankAxpy<float, bf16> axpy_fb;
  LowRankAxpy<bf16, float> axpy_bf;
  LowRankAxpy<bf16, bf16> axpy_bb;
  LowRankDot<float> dot_f;
  LowRankDot<bf16> dot_b;

  template <class TA, class TB>
  LowRankAxpy<TA, TB> axpy() const;
  template <class TY>
  LowRankDot<TY> dot() const;
};

template <> inline LowRankAxpy<float, float> LowRankKernels::axpy<float, float>() const { return axpy_ff; }
template <> inline LowRankAxpy<float, bf16> LowRankKernels::axpy<float, bf16>() const { return axpy_fb; }
template <> inline LowRankAxpy<bf16, float> LowRankKernels::axpy<bf16, float>() const { return axpy_bf; }
template <> inline LowRankAxpy<bf16, bf16> LowRankKernels::axpy<bf16, bf16>() const { return axpy_bb; }
template <> inline LowRankDot<float> LowRankKernels::dot<float>() const { return dot_f; }
template <> inline LowRankDot<bf16> LowRankKernels::dot<bf16>() const { return dot_b; }

// dst[c * rows + r] = src[r * ld + c] in f32: makes a block of B^T row-contiguous for axpy.
template <class T>
void transpose_to_f32(const T* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = to_float(src[r * ld + c]);
}

}  // namespace moe_sft::kernels
