// Widening to f32 vectors, shared by the AVX-512 kernel files: bf16 values, the two halves of packed bf16
// pairs, and the per-panel scale and bias of a quantized PackedMatrix group (packed_matrix.h).
//
// Include it inside a file's AVX-512 target region, after <immintrin.h> and the kernel headers (which
// bring PackedMatrix in outside the region). The helpers sit in an unnamed namespace: every file keeps its
// own copy, compiled under its own target, so the linker never has to pick one.
#pragma once

namespace moe_sft::kernels::avx512 {
namespace {

inline __m512 load_bf16_as_f32(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_bf16_as_f32(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// A packed bf16 pair word (32-bit lane: element 2c in the low half, 2c + 1 in the high half) as f32.
inline __m512 low_half_f32(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 high_half_f32(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xffff0000u))));
}

// Scale and bias of group g for the 16 rows of panel p: W = code·scale + bias (int4_k2's bias is -8·scale,
// int8's zero).
inline __m512 group_scale(const PackedMatrix& w, int64_t p, int64_t g) {
  if (w.format() == WeightFormat::int4_k2) return load_bf16_as_f32(w.scales_bf16(p) + g * PackedMatrix::kPanelRows);
  return _mm512_loadu_ps(w.scales_f32(p) + g * PackedMatrix::kPanelRows);
}
inline __m512 group_bias(const PackedMatrix& w, int64_t p, int64_t g, __m512 scale) {
  switch (w.format()) {
    case WeightFormat::int4_awq: return _mm512_loadu_ps(w.biases(p) + g * PackedMatrix::kPanelRows);
    case WeightFormat::int4_k2: return _mm512_mul_ps(scale, _mm512_set1_ps(-8.0f));
    default: return _mm512_setzero_ps();
  }
}

}  // namespace
}  // namespace moe_sft::kernels::avx512
