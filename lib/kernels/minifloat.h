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
#include <limits>

#include "kernels/packed_matrix.h"

namespace moe_sft::kernels {

namespace minifloat_detail {
constexpr float pow2(int e) {  // exact, subnormals included
  float v = 1.0f;
  for (; e > 0; --e) v *= 2.0f;
  for (; e < 0; ++e) v *= 0.5f;
  return v;
}
struct E4m3Table {
  float v[256];
  constexpr E4m3Table() : v() {
    for (int c = 0; c < 256; ++c) {
      const int e = (c >> 3) & 0xF, m = c & 7;
      float mag = e == 0 ? float(m) * pow2(-9) : (1.0f + float(m) / 8.0f) * pow2(e - 7);
      if ((c & 0x7F) == 0x7F) mag = std::numeric_limits<float>::quiet_NaN();
      v[c] = (c & 0x80) ? -mag : mag;
    }
  }
};
struct E8m0Table {
  float v[256];
  constexpr E8m0Table() : v() {
    for (int s = 0; s < 255; ++s) v[s] = pow2(s - 127);
    v[255] = std::numeric_limits<float>::quiet_NaN();
  }
};
constexpr E4m3Table kE4m3{};
constexpr E8m0Table kE8m0{};
constexpr float kE2m1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
}  // namespace minifloat_detail

inline float e4m3_value(uint8_t code) { return minifloat_detail::kE4m3.v[code]; }
inline bool e4m3_is_nan(uint8_t code) { return (code & 0x7F) == 0x7F; }
inline float e2m1_value(uint8_t nibble) { return minifloat_detail::kE2m1[nibble & 0xF]; }
inline float e8m0_value(uint8_t s) { return minifloat_detail::kE8m0.v[s]; }

constexpr float kE4m3Max = 448.0f;
constexpr float kE2m1Max = 6.0f;
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
