// Formats the frozen base weights can be stored in (moe_sft_weight_format in the ABI, same values).
#pragma once
#include <cstdint>

namespace moe_sft::kernels {

enum class WeightFormat : int32_t { bf16 = 0, int8 = 1, int4_awq = 2, int4_k2 = 3 };

// "bf16", "int8", "int4_awq", "int4_k2"; nullptr for a value outside the enum.
inline const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::bf16: return "bf16";
    case WeightFormat::int8: return "int8";
    case WeightFormat::int4_awq: return "int4_awq";
    case WeightFormat::int4_k2: return "int4_k2";
  }
  return nullptr;
}

inline bool is_int4(WeightFormat f) { return f == WeightFormat::int4_awq || f == WeightFormat::int4_k2; }
inline bool has_groups(WeightFormat f) { return is_int4(f); }  // scales per group along K, else per row

}  // namespace moe_sft::kernels
