#include "api/validate.h"

#include <cstdint>
#include <cstdio>
#include <string>

#include "runtime/error.h"

namespace moe_sft::api {

void invalid(const std::string& message) { throw Error(MOE_SFT_ERR_INVALID_ARGUMENT, message); }

std::string format_number(double x) {
  char text[40];
  std::snprintf(text, sizeof text, "%.9g", x);
  return text;
}

void require_dtype(int32_t dtype, const char* name) {
  if (dtype != MOE_SFT_DTYPE_BF16 && dtype != MOE_SFT_DTYPE_F32)
    invalid(std::string(name) + " = " + std::to_string(dtype) +
            " is not a dtype (MOE_SFT_DTYPE_BF16 = 0, MOE_SFT_DTYPE_F32 = 1)");
}

void require_unknown_fields_zero(const void* cfg, size_t struct_size, size_t known) {
  const unsigned char* bytes = static_cast<const unsigned char*>(cfg);
  for (size_t i = known; i < struct_size; ++i)
    if (bytes[i] != 0)
      throw Error(MOE_SFT_ERR_UNSUPPORTED, "cfg->struct_size = " + std::to_string(struct_size) +
                                               ": the config sets fields this library (struct size " +
                                               std::to_string(known) + ") does not know");
}

void require_non_null(const void* p, const char* name) {
  if (p == nullptr) invalid(std::string(name) + " is NULL");
}

void require_array(const void* p, const char* name, int64_t count, int64_t element_size) {
  if (count == 0) return;
  require_non_null(p, name);
  if (reinterpret_cast<uintptr_t>(p) % uintptr_t(element_size) != 0) {
    char address[32];
    std::snprintf(address, sizeof address, "%p", p);
    invalid(std::string(name) + " (address " + address + ") is not aligned to its " + std::to_string(element_size) +
            "-byte elements");
  }
}

void require_range(int64_t value, int64_t lo, int64_t hi, const char* name) {
  if (value < lo || value > hi)
    invalid(std::string(name) + " = " + std::to_string(value) + " is out of range [" + std::to_string(lo) + ", " +
            std::to_string(hi) + "]");
}

void validate_expert_ids(const int64_t* ids, int64_t qlen, int64_t top_k, int64_t experts, int64_t lowest) {
  for (int64_t t = 0; t < qlen; ++t)
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t id = ids[t * top_k + j];
      if (id < lowest || id >= experts)
        invalid("expert_ids[" + std::to_string(t) + ", " + std::to_string(j) + "] = " + std::to_string(id) +
                " is out of range [" + std::to_string(lowest) + ", " + std::to_string(experts) + ")" +
                (lowest < 0 ? " (-1 means no expert)" : " (the router selects real experts only)"));
    }
}

}  // namespace moe_sft::api
