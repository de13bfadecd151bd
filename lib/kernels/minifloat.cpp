#include "kernels/minifloat.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/dequantize.h"
#include "runtime/assert.h"

namespace moe_sft::kernels {

uint8_t e4m3_encode(float v) {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  const float a = std::fmin(std::fabs(v), kE4m3Max);
  if (a < 0x1p-6f) return uint8_t(sign | int(std::nearbyint(a * 0x1p9f)));  // subnormal quanta of 2^-9; 8 is 2^-6
  // A normal e4m3: f32's exponent and top 3 mantissa bits, rounded to nearest even on the bits below (a carry
  // moves into the exponent), the exponent re-biased from 127 to 7.
  uint32_t u;
  std::memcpy(&u, &a, sizeof u);
  u += 0x7FFFFu + ((u >> 20) & 1u);
  return uint8_t(sign | ((u >> 20) - ((127 - 7) << 3)));
}

uint8_t e2m1_encode(float v) {
  const uint8_t sign = std::signbit(v) ? 0x8 : 0x0;
  const float a = std::fabs(v);
  // Midpoints between neighbours; a tie goes to the even code (mantissa bit 0).
  static constexpr float kUpper[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  int code = 0;
  while (code < 7 && (a > kUpper[code] || (a == kUpper[code] && code % 2 == 1))) ++code;
  return uint8_t(sign | code);
}

namespace {

constexpr int64_t P = PackedMatrix::kPanelRows, kLanes = 2 * P;

// Pairs [kp0, kp1) of an fp8 panel (one byte per element at its bf16 lane), `scale` per lane.
void decode_fp8_pairs(const uint8_t* codes, int64_t kp0, int64_t kp1, const float (&scale)[kLanes], bf16* dst) {
  for (int64_t kp = kp0; kp < kp1; ++kp, dst += kLanes) {
    const uint8_t* pair = codes + kp * kLanes;
    for (int64_t lane = 0; lane < kLanes; ++lane) dst[lane] = to_bf16(e4m3_value(pair[lane]) * scale[lane]);
  }
}

// Units [kp0 / 4, kp1 / 4) of an mxfp4 panel (packed_matrix.h: lane l's 16-bit word of a unit holds its four
// pairs' nibbles), `scale` per lane.
void decode_fp4_units(const uint8_t* codes, int64_t kp0, int64_t kp1, const float (&scale)[kLanes], bf16* dst) {
  for (int64_t kp = kp0; kp < kp1; kp += 4, dst += 4 * kLanes) {
    const uint8_t* unit = codes + (kp / 4) * 4 * P;  // 64 bytes per 4 pairs
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      uint16_t word;
      std::memcpy(&word, unit + 2 * lane, sizeof word);
      for (int j = 0; j < 4; ++j)
        dst[j * kLanes + lane] = to_bf16(e2m1_value(uint8_t((word >> (4 * j)) & 0xF)) * scale[lane]);
    }
  }
}

}  // namespace

void dequantize_minifloat(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs,
                          bf16* out, int64_t out_stride) {
  MOE_SFT_ASSERT(dequantize_block_ok(w, panel0, panels, pair0, pairs) && is_minifloat(w.format()));
  const int64_t group_pairs = w.group() / 2;  // groups are whole pairs (validated at create)
  const bool fp4 = w.format() == WeightFormat::mxfp4;
  MOE_SFT_ASSERT(!fp4 || group_pairs % 4 == 0);  // mxfp4's groups are whole units of four pairs
  for (int64_t p = panel0; p < panel0 + panels; ++p) {
    const uint8_t* codes = w.codes(p);
    for (int64_t kp = pair0; kp < pair0 + pairs;) {
      const int64_t g = kp / group_pairs, stop = std::min(pair0 + pairs, (g + 1) * group_pairs);
      float scale[kLanes];  // the group's scale of each lane's row, once per group
      for (int64_t r = 0; r < P; ++r) {
        const int64_t at = w.scale_index(g, r);
        scale[2 * r] = scale[2 * r + 1] = fp4 ? e8m0_value(w.scales_e8m0(p)[at]) : w.scales_f32(p)[at];
      }
      bf16* dst = out + (p - panel0) * out_stride + (kp - pair0) * kLanes;
      if (fp4) decode_fp4_units(codes, kp, stop, scale, dst);
      else decode_fp8_pairs(codes, kp, stop, scale, dst);
      kp = stop;
    }
  }
}

}  // namespace moe_sft::kernels
