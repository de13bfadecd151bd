#include "api/validate.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime/error.h"

namespace moe_sft::api {

namespace {

// Bound on every element count: keeps all index arithmetic (in int64, and byte sizes) from overflowing.
constexpr int64_t kMaxElements = int64_t(1) << 50;

void require_product_fits(std::initializer_list<int64_t> dims, const char* what) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d != 0 && n > kMaxElements / d) invalid(std::string(what) + " is too large (more than 2^50 elements)");
    n *= d;
  }
}

}  // namespace

void invalid(const std::string& message) { throw Error(MOE_SFT_ERR_INVALID_ARGUMENT, message); }

void require_dtype(moe_sft_dtype dtype, const char* name) {
  if (dtype != MOE_SFT_DTYPE_BF16 && dtype != MOE_SFT_DTYPE_F32)
    invalid(std::string(name) + " = " + std::to_string(int(dtype)) +
            " is not a dtype (MOE_SFT_DTYPE_BF16 = 0, MOE_SFT_DTYPE_F32 = 1)");
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

moe_sft_config read_config(const moe_sft_config* cfg) {
  require_non_null(cfg, "cfg");
  // The published sizes: the first version ended with down_proj; each later version appends fields. A
  // caller compiled against an older header passes a shorter struct and gets the defaults for the rest; a
  // newer caller's struct is accepted only if every field this library does not know is zero (its padding
  // included, which moe_sft_config_init zeroes).
  constexpr size_t kFirstVersionSize = offsetof(moe_sft_config, down_proj) + sizeof(cfg->down_proj);
  constexpr size_t kKnownBytes = offsetof(moe_sft_config, check_finite) + sizeof(cfg->check_finite);
  if (cfg->struct_size == 0)
    invalid("cfg->struct_size = 0: initialize the config with moe_sft_config_init before setting fields");
  if (cfg->struct_size != kFirstVersionSize && cfg->struct_size < sizeof(moe_sft_config))
    invalid("cfg->struct_size = " + std::to_string(cfg->struct_size) + " is not the size of any moe_sft_config (" +
            std::to_string(kFirstVersionSize) + " or at least " + std::to_string(sizeof(moe_sft_config)) + ")");
  const size_t known = std::min(cfg->struct_size, kKnownBytes);
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(cfg);
  for (size_t i = known; i < cfg->struct_size; ++i)
    if (bytes[i] != 0)
      throw Error(MOE_SFT_ERR_UNSUPPORTED, "cfg->struct_size = " + std::to_string(cfg->struct_size) +
                                               ": the config sets fields this library (struct size " +
                                               std::to_string(sizeof(moe_sft_config)) + ") does not know");
  moe_sft_config out;
  moe_sft_config_init(&out);
  std::memcpy(&out, cfg, known);
  out.struct_size = sizeof(moe_sft_config);
  return out;
}

void validate_config(const moe_sft_config& c) {
  require_range(c.expert_num, 1, INT32_MAX, "cfg->expert_num");
  require_range(c.hidden_size, 1, INT32_MAX, "cfg->hidden_size");
  require_range(c.intermediate_size, 1, INT32_MAX, "cfg->intermediate_size");
  require_range(c.lora_rank, 0, INT32_MAX, "cfg->lora_rank");
  if (c.lora_rank > 0 && !std::isfinite(c.lora_alpha))
    invalid("cfg->lora_alpha = " + std::to_string(c.lora_alpha) + " is not finite");
  require_range(c.max_cache_depth, 0, INT32_MAX, "cfg->max_cache_depth");
  require_range(c.num_threads, 0, 4096, "cfg->num_threads");
  require_range(c.tp_count, 1, c.intermediate_size, "cfg->tp_count");
  require_product_fits({c.expert_num, c.hidden_size, c.intermediate_size}, "expert_num * hidden_size * intermediate_size");
  require_product_fits({c.expert_num, c.lora_rank, std::max(c.hidden_size, c.intermediate_size)},
                       "expert_num * lora_rank * max(hidden_size, intermediate_size)");
  const int64_t weights = int64_t(c.expert_num) * c.hidden_size * c.intermediate_size;
  require_array(c.gate_proj, "cfg->gate_proj", weights, 2);
  require_array(c.up_proj, "cfg->up_proj", weights, 2);
  require_array(c.down_proj, "cfg->down_proj", weights, 2);
}

bool check_finite_default() {
  const char* v = std::getenv("MOE_SFT_CHECK_FINITE");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
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
