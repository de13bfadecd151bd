// Whole-array conversions between f32 and bf16 (16-bit words), written as plain loops the compiler
// vectorizes, with an AVX2 build of the same loops picked at run time (bit-identical results: only integer
// operations). f32 -> bf16 rounds to nearest, ties to even; a NaN becomes the quiet NaN 0x7fc0 with its sign
// (as ml_dtypes and Eigen do), Inf stays Inf, subnormals round like any other value. bf16 -> f32 is exact.
#pragma once
#include <cstdint>

namespace moe_sft {

void bf16_from_f32_array(const float* src, uint16_t* dst, int64_t n);
void bf16_to_f32_array(const uint16_t* src, float* dst, int64_t n);

// One value, the same rule as bf16_from_f32_array (NaN canonicalized; bf16.h's to_bf16 keeps a NaN's
// payload bits instead).
inline uint16_t bf16_bits_rne(uint32_t u) {
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  return uint16_t(int32_t(u & 0x7fffffffu) > int32_t(0x7f800000u) ? nan : rounded);
}

bool cpu_has_avx2();  // CPU and OS (checked once)

}  // namespace moe_sft
