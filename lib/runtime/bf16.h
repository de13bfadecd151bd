// bf16: a distinct 16-bit type (not uint16_t) so that a bf16 buffer can never be mistaken for an integer
// or half buffer at compile time. Conversions round to nearest even and keep NaN a NaN.
#pragma once
#include <cstdint>
#include <cstring>

namespace moe_sft {

struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be 16 bits: it aliases the caller's uint16_t arrays");

inline float to_float(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float v) { return v; }

inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN, sign kept
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return bf16{uint16_t(u >> 16)};
}

// The ABI passes bf16 arrays as uint16_t words; this is the one place that reinterprets them.
inline const bf16* as_bf16(const uint16_t* p) { return reinterpret_cast<const bf16*>(p); }
inline bf16* as_bf16(uint16_t* p) { return reinterpret_cast<bf16*>(p); }

}  // namespace moe_sft
