#include "kernels/minifloat.h"

#include <cmath>

#include "kernels/dequantize.h"
#include "runtime/assert.h"

namespace moe_sft::kernels {

uint8_t e4m3_encode(float v) {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  const float a = std::fmin(std::fabs(v), kE4m3Max);
  if (a < 0x1p-6f) return uint8_t(sign | int(std::nearbyint(a * 0x1p9f)));  // subnormal quanta of 2^-9; 8 is 2^-6
  int e;
  std::frexp(a, &e);  // a = f · 2^e, f in [0.5, 1): the binade [2^(e-1), 2^e) has 8 steps of 2^(e-4)
  const int m = int(std::nearbyint(std::ldexp(a, 4 - e)));  // 8 .. 16; 16 carries into the next exponent
  return uint8_t(sign | (((e - 1 + 7) << 3) + (m - 8)));
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

void dequantize_minifloat(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs,
                          bf16* out, int64_t out_stride) {
  constexpr int64_t P = PackedMatrix::kPanelRows;
  MOE_SFT_ASSERT(dequantize_block_ok(w, panel0, panels, pair0, pairs) && is_minifloat(w.format()));
  const int64_t group_pairs = w.group() / 2;  // groups are whole pairs (validated at create)
  const bool fp4 = w.format() == WeightFormat::mxfp4;
  for (int64_t p = panel0; p < panel0 + panels; ++p) {
    const uint8_t* codes = w.codes(p);
    for (int64_t kp = pair0; kp < pair0 + pairs; ++kp) {
      float scale[P];  // the group's scale of each of the panel's rows
      const int64_t g = kp / group_pairs;
      for (int64_t r = 0; r < P; ++r) {
        const int64_t at = w.scale_index(g, r);
        scale[r] = fp4 ? e8m0_value(w.scales_e8m0(p)[at]) : w.scales_f32(p)[at];
      }
      bf16* dst = out + (p - panel0) * out_stride + (kp - pair0) * 2 * P;
      if (fp4) {  // packed_matrix.h's nibble layout: lane l's code in byte (kp / 4) * 64 + 2 l + (kp % 4) / 2
        const uint8_t* unit = codes + (kp / 4) * 4 * P + (kp % 4) / 2;
        const int shift = int(4 * (kp % 2));
        for (int64_t lane = 0; lane < 2 * P; ++lane)
          dst[lane] = to_bf16(e2m1_value(uint8_t(unit[2 * lane] >> shift)) * scale[lane / 2]);
      } else {  // one byte per element at its bf16 lane
        const uint8_t* pair = codes + kp * 2 * P;
        for (int64_t lane = 0; lane < 2 * P; ++lane) dst[lane] = to_bf16(e4m3_value(pair[lane]) * scale[lane / 2]);
      }
    }
  }
}

}  // namespace moe_sft::kernels
