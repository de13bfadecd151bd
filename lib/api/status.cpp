// The thread-local last-error message, the version call, and the names of the ABI's enums (status, dtype,
// scoring), which Python and the tests take from here rather than copying them.
#include <string>

#include "api/status.h"

namespace moe_sft::api {

namespace {
thread_local std::string last_error_message;
}

void set_last_error(const std::string& message) { last_error_message = message; }
void clear_last_error() { last_error_message.clear(); }
const char* last_error() { return last_error_message.c_str(); }

}  // namespace moe_sft::api

extern "C" {

const char* moe_sft_status_string(moe_sft_status status) {
  switch (status) {
    case MOE_SFT_OK: return "MOE_SFT_OK";
    case MOE_SFT_ERR_INVALID_ARGUMENT: return "MOE_SFT_ERR_INVALID_ARGUMENT";
    case MOE_SFT_ERR_OUT_OF_MEMORY: return "MOE_SFT_ERR_OUT_OF_MEMORY";
    case MOE_SFT_ERR_CACHE_FULL: return "MOE_SFT_ERR_CACHE_FULL";
    case MOE_SFT_ERR_CACHE_EMPTY: return "MOE_SFT_ERR_CACHE_EMPTY";
    case MOE_SFT_ERR_NON_FINITE: return "MOE_SFT_ERR_NON_FINITE";
    case MOE_SFT_ERR_UNSUPPORTED: return "MOE_SFT_ERR_UNSUPPORTED";
    case MOE_SFT_ERR_INTERNAL: return "MOE_SFT_ERR_INTERNAL";
  }
  return "unknown status";
}

const char* moe_sft_dtype_name(moe_sft_dtype dtype) {
  switch (dtype) {
    case MOE_SFT_DTYPE_BF16: return "bf16";
    case MOE_SFT_DTYPE_F32: return "f32";
  }
  return nullptr;
}

const char* moe_sft_scoring_name(moe_sft_scoring scoring) {
  switch (scoring) {
    case MOE_SFT_SCORING_SOFTMAX: return "softmax";
    case MOE_SFT_SCORING_SIGMOID: return "sigmoid";
  }
  return nullptr;
}

const char* moe_sft_last_error(void) { return moe_sft::api::last_error(); }

uint32_t moe_sft_version(void) { return MOE_SFT_VERSION_NUMBER; }

}  // extern "C"
