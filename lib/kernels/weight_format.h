// Formats the frozen base weights can be stored in (moe_sft_weight_format in the ABI, same values).
#pragma once
#include <cstdint>

namespace moe_sft::kernels {

enum class WeightFormat : int32_t { bf16 = 0, int8 = 1, int4_awq = 2, int4_k2 = 3, fp8_e4m3_block = 4, mxfp4 = 5 };

// "bf16", "int8", "int4_awq", "int4_k2", "fp8_e4m3_block", "mxfp4"; nullptr for a value outside the enum.
inline const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::bf16: return "bf16";
    case WeightFormat::int8: return "int8";
    case WeightFormat::int4_awq: return "int4_awq";
    case WeightFormat::int4_k2: return "int4_k2";
    case WeightFormat::fp8_e4m3_block: return "fp8_e4m3_block";
    case WeightFormat::mxfp4: return "mxfp4";
  }
  return nullptr;
}

// The integer 4-bit formats (code·scale + bias); their few-rows kernels decode nibbles as integers.
inline bool is_int4(WeightFormat f) { return f == WeightFormat::int4_awq || f == WeightFormat::int4_k2; }
// Small floating-point codes times a scale (minifloat.h): decoded by the one ISA-neutral decoder every family
// calls, never by a family's integer paths.
inline bool is_minifloat(WeightFormat f) { return f == WeightFormat::fp8_e4m3_block || f == WeightFormat::mxfp4; }
// Formats packed two codes per byte (packed_matrix.h's nibble layout).
inline bool packs_nibbles(WeightFormat f) { return is_int4(f) || f == WeightFormat::mxfp4; }
// Scales per group along K (else one per row).
inline bool has_groups(WeightFormat f) { return is_int4(f) || is_minifloat(f); }

// How a format's scales are stored: f32, bf16 (int4_k2; fp8_e4m3_block's may come so), e8m0 bytes (mxfp4).
enum class ScaleType : int32_t { f32 = 0, bf16 = 1, e8m0 = 2 };

}  // namespace moe_sft::kernels
