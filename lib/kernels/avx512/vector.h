// Vector helpers shared by the AVX-512 kernel files: masks, bf16 <-> f32 conversions, the packed pair
// halves, A's pair words, the per-panel scale and bias of a quantized group (packed_matrix.h), and the
// table of template instances the register-blocked kernels pick their tail shapes from.
//
// Include it inside a file's target region (target.h, which brings in the standard headers it needs), after
// <immintrin.h>. The helpers sit in an unnamed
// namespace: every file keeps its own copy, compiled under its own target, so the linker never has to pick one.
#pragma once

namespace moe_sft::kernels::avx512 {
namespace {

// Lanes [0, n) of a 16-lane vector (all of them for n >= 16).
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

inline __m512 load_bf16_as_f32(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_bf16_as_f32(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
// f32 or bf16 operands alike, as f32 (the rank-r products take either).
inline __m512 load_f32(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_f32(const bf16* p, __mmask16 mask) { return load_bf16_as_f32(p, mask); }

inline void store_f32_as_bf16(bf16* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
inline __m512 round_to_bf16(__m512 v) {  // what a bf16 store and reload would give
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// A packed bf16 pair word (32-bit lane: element 2c in the low half, 2c + 1 in the high half) as f32.
inline __m512 low_half_f32(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 high_half_f32(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xffff0000u))));
}

// A's pair (2 kp, 2 kp + 1) of row `row` as one 32-bit word, for broadcasting against a packed pair vector.
// `full_pairs` is K / 2: a pair at kp == full_pairs exists only for odd K and holds a single element (its
// partner, past the row, is never read).
inline int32_t a_pair(const bf16* row, int64_t kp, int64_t full_pairs) {
  int32_t pair = 0;
  if (kp < full_pairs) std::memcpy(&pair, row + 2 * kp, sizeof pair);
  else pair = int32_t(row[2 * kp].bits);
  return pair;
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

// Every tail shape of a register-blocked kernel is its own template instance, picked by index instead of
// branching at run time: Instances<Make, Fn, kRows, kCols>.fn[r - 1][c - 1] = Make::template at<r, c>().
template <class Fn, int kRows, int kCols>
struct InstanceTable {
  Fn fn[kRows][kCols];
};
template <class Make, class Fn, int kCols, int R, int... C>
constexpr void fill_instance_row(Fn (&row)[kCols], std::integer_sequence<int, C...>) {
  ((row[C] = Make::template at<R, C + 1>()), ...);
}
template <class Make, class Fn, int kRows, int kCols, int... R>
constexpr InstanceTable<Fn, kRows, kCols> make_instance_table(std::integer_sequence<int, R...>) {
  InstanceTable<Fn, kRows, kCols> t{};
  ((fill_instance_row<Make, Fn, kCols, R + 1>(t.fn[R], std::make_integer_sequence<int, kCols>{})), ...);
  return t;
}
template <class Make, class Fn, int kRows, int kCols>
constexpr InstanceTable<Fn, kRows, kCols> Instances =
    make_instance_table<Make, Fn, kRows, kCols>(std::make_integer_sequence<int, kRows>{});

}  // namespace
}  // namespace moe_sft::kernels::avx512
