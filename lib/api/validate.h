// Argument checks for the ABI entry points. Each throws moe_sft::Error(INVALID_ARGUMENT or UNSUPPORTED)
// with a message naming the argument, the index and the value at fault. They run before anything is
// written, which is what lets every failing call leave its outputs untouched.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "moe_sft.h"

namespace moe_sft::api {

[[noreturn]] void invalid(const std::string& message);  // throws Error(INVALID_ARGUMENT, message)

// A number as error messages show it: %.9g (every float and the doubles of a config told apart; nan, inf).
std::string format_number(double x);

// The integer behind an ABI enum a caller passed. A C caller may pass any int32 where a moe_sft_* enum is
// expected, but in C++ reading an enum object whose value lies outside its enumerators' range is undefined
// (UBSan's -fsanitize=enum reports it): entry points read such values through this until they are validated.
template <class Enum>
int32_t enum_value(const Enum& e) {
  static_assert(std::is_enum_v<Enum> && sizeof(Enum) == sizeof(int32_t), "an ABI enum is 32 bits");
  int32_t value;
  std::memcpy(&value, &e, sizeof value);
  return value;
}

// Bound on every element count the ABI accepts: keeps all index arithmetic (in int64, and byte sizes) from
// overflowing.
constexpr int64_t kMaxElements = int64_t(1) << 50;

// A config struct from a newer caller (struct_size beyond the `known` bytes this library has): accepted only when
// every byte it does not know is zero, else UNSUPPORTED naming cfg->struct_size.
void require_unknown_fields_zero(const void* cfg, size_t struct_size, size_t known);

void require_non_null(const void* p, const char* name);
void require_dtype(int32_t dtype, const char* name);  // MOE_SFT_DTYPE_BF16 or MOE_SFT_DTYPE_F32
// p non-null and aligned for its element type (null allowed when `count` is 0).
void require_array(const void* p, const char* name, int64_t count, int64_t element_size);
void require_range(int64_t value, int64_t lo, int64_t hi, const char* name);  // lo <= value <= hi

// Every id in [lowest, experts): lowest -1 where "no expert" is allowed (the layer), 0 where it is not.
void validate_expert_ids(const int64_t* ids, int64_t qlen, int64_t top_k, int64_t experts, int64_t lowest = -1);

}  // namespace moe_sft::api
