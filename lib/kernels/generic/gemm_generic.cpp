// Portable GEMM kernels over the packed layout: the reference every ISA-specific family is tested against.
// Plain loops the compiler can vectorize; correctness and every tail first, speed is the other families'.
#include <algorithm>

#include "kernels/gemm.h"
#include "kernels/generic/generic.h"

namespace moe_sft::kernels {

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows;

// Row m of the output block; crow[c - c0] is C[m, c].
void init_row(float* crow, int64_t width, bool accumulate) {
  if (!accumulate) std::fill(crow, crow + width, 0.0f);
}

}  // namespace

// C[m, c] += sum_k A[m, k] W[c, k]: one panel of P output columns at a time, k-pairs innermost.
void gemm_xwt_generic(const GemmArgs& g) {
  const PackedMatrix& w = *g.w;
  const int64_t K = w.cols();
  for (int64_t m = 0; m < g.m; ++m) {
    const bf16* arow = g.a + m * g.lda;
    float* crow = g.c + m * g.ldc;
    init_row(crow, g.c1 - g.c0, g.accumulate);
    for (int64_t p0 = g.c0 / P * P; p0 < g.c1; p0 += P) {
      const bf16* panel = w.panel(p0 / P);
      float acc[P] = {};
      for (int64_t k = 0; k < K; k += 2) {
        const float a0 = to_float(arow[k]);
        const float a1 = k + 1 < K ? to_float(arow[k + 1]) : 0.0f;  // odd K: the pad column is zero
        const bf16* pair = panel + (k / 2) * 2 * P;
        for (int64_t i = 0; i < P; ++i) acc[i] += a0 * to_float(pair[2 * i]) + a1 * to_float(pair[2 * i + 1]);
      }
      for (int64_t i = std::max(p0, g.c0); i < std::min(p0 + P, g.c1); ++i) crow[i - g.c0] += acc[i - p0];
    }
  }
}

// C[m, c] += sum_n A[m, n] W[n, c]: walks W's panels in storage order, summing a chunk of output columns in
// a local buffer (no allocation: a kernel call must not fail half-way through its writes).
void gemm_xw_generic(const GemmArgs& g) {
  constexpr int64_t kChunk = 256;  // even, so column pairs never straddle chunks
  const PackedMatrix& w = *g.w;
  const int64_t N = w.rows();
  for (int64_t m = 0; m < g.m; ++m) {
    const bf16* arow = g.a + m * g.lda;
    float* crow = g.c + m * g.ldc;
    init_row(crow, g.c1 - g.c0, g.accumulate);
    for (int64_t k0 = g.c0 / 2 * 2; k0 < g.c1; k0 += kChunk) {
      const int64_t k1 = std::min(k0 + kChunk, (g.c1 + 1) / 2 * 2);  // pad column of an odd width is zero
      float acc[kChunk] = {};
      for (int64_t n = 0; n < N; ++n) {
        const float a = to_float(arow[n]);
        const bf16* lane = w.panel(n / P) + (n % P) * 2;
        for (int64_t c = k0; c < k1; c += 2) {
          const bf16* pair = lane + (c / 2) * 2 * P;
          acc[c - k0] += a * to_float(pair[0]);
          acc[c - k0 + 1] += a * to_float(pair[1]);
        }
      }
      for (int64_t c = std::max(k0, g.c0); c < std::min(k1, g.c1); ++c) crow[c - g.c0] += acc[c - k0];
    }
  }
}

}  // namespace moe_sft::kernels
