// Argument checks for the ABI entry points. Each throws moe_sft::Error(INVALID_ARGUMENT or UNSUPPORTED)
// with a message naming the argument, the index and the value at fault. They run before anything is
// written, which is what lets every failing call leave its outputs untouched.
#pragma once
#include <cstdint>
#include <string>

#include "moe_sft.h"

namespace moe_sft::api {

[[noreturn]] void invalid(const std::string& message);  // throws Error(INVALID_ARGUMENT, message)

void require_non_null(const void* p, const char* name);
void require_dtype(moe_sft_dtype dtype, const char* name);  // BF16 or F32
// p non-null and aligned for its element type (null allowed when `count` is 0).
void require_array(const void* p, const char* name, int64_t count, int64_t element_size);
void require_range(int64_t value, int64_t lo, int64_t hi, const char* name);  // lo <= value <= hi

// Every id in [lowest, experts): lowest -1 where "no expert" is allowed (the layer), 0 where it is not.
void validate_expert_ids(const int64_t* ids, int64_t qlen, int64_t top_k, int64_t experts, int64_t lowest = -1);

}  // namespace moe_sft::api
