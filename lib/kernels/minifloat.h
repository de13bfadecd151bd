// The small floating-point codes of the block-scaled formats, and the one decoder of their packed blocks that
// every kernel family calls (dequantize.h's contract): ISA-neutral C++, so the code that turns these formats
// into bf16 is the same on every machine and is tested wherever the tests run.
//
//   e4m3fn (OCP FP8 E4M3, fp8_e4m3_block's codes): sign, 4 exponent bits (bias 7), 3 mantissa bits; no
//          infinities; S.1111.111 is NaN; largest 448; subnormals 2^-6 · m/8.
//   e2m1   (OCP FP4, mxfp4's codes, one nibble): sign in bit 3, 2 exponent bits (bias 1), 1 mantissa bit:
//          magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
//   e8m0   (OCP MX scale, mxfp4's scales, one byte s): 2^(s - 127); 255 is NaN.
//
// Every e4m3 value and every e2m1 value times 2^(s - 127) within bf16's range is exactly a bf16; fp8's scales
// are arbitrary f32, so code·scale is rounded to bf16 once, as every other format's dequantized value is.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/packed_matrix.h"

namespace moe_sft::kernels {

// Each decode moves the code's exponent and mantissa bits into f32's fields: that is the value times a fixed
// power of two (an f32 subnormal for the code's subnormals, still exact), undone by one exact multiplication.
// Plain integer and f32 operations, which the compiler vectorizes for any target.
inline float f32_of_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline bool e4m3_is_nan(uint8_t code) { return (code & 0x7F) == 0x7F; }
inline float e4m3_value(uint8_t code) {
  const uint32_t c = code, magnitude = (c & 0x7Fu) == 0x7Fu ? 0x7FC00000u : (c & 0x7Fu) << 20;  // NaN stays NaN
  return f32_of_bits(((c & 0x80u) << 24) | magnitude) * 0x1p120f;  // bias 127 - 7
}
inline float e2m1_value(uint8_t nibble) {
  const uint32_t c = nibble;
  return f32_of_bits(((c & 0x8u) << 28) | ((c & 0x7u) << 22)) * 0x1p126f;  // bias 127 - 1
}
inline float e8m0_value(uint8_t s) {  // 2^(s - 127): f32's exponent field; 2^-127 is f32's largest subnormal
  return f32_of_bits(s == 0 ? 0x00400000u : s == 255 ? 0x7FC00000u : uint32_t(s) << 23);
}

constexpr float kE4m3Max = 448.0f;
// Round to nearest, ties to even, saturating at the largest finite value (v must not be NaN).
uint8_t e4m3_encode(float v);
uint8_t e2m1_encode(float v);

// A stored code of a minifloat format (e4m3 byte, e2m1 nibble) as its f32 value.
inline float minifloat_code_value(WeightFormat f, int code) {
  return f == WeightFormat::mxfp4 ? e2m1_value(uint8_t(code)) : e4m3_value(uint8_t(code));
}

// dequantize.h's contract for fp8_e4m3_block and mxfp4 (weight_gemm.cpp calls it for every family).
void dequantize_minifloat(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs,
                          bf16* out, int64_t out_stride);

}  // namespace moe_sft::kernels
