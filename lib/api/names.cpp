// The names of the ABI's enums and the library's version: Python and the tests take every name from here
// instead of keeping copies.
#include "api/validate.h"
#include "kernels/weight_format.h"
#include "moe_sft.h"

extern "C" {

const char* moe_sft_status_string(moe_sft_status status) {
  switch (moe_sft::api::enum_value(status)) {
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
  switch (moe_sft::api::enum_value(dtype)) {
    case MOE_SFT_DTYPE_BF16: return "bf16";
    case MOE_SFT_DTYPE_F32: return "f32";
  }
  return nullptr;
}

const char* moe_sft_activation_name(moe_sft_activation activation) {
  switch (moe_sft::api::enum_value(activation)) {
    case MOE_SFT_ACTIVATION_SILU: return "silu";
    case MOE_SFT_ACTIVATION_SWIGLU_CLAMPED: return "swiglu_clamped";
  }
  return nullptr;
}

const char* moe_sft_scoring_name(moe_sft_scoring scoring) {
  switch (moe_sft::api::enum_value(scoring)) {
    case MOE_SFT_SCORING_SOFTMAX: return "softmax";
    case MOE_SFT_SCORING_SIGMOID: return "sigmoid";
  }
  return nullptr;
}

const char* moe_sft_weight_format_name(moe_sft_weight_format weight_format) {
  return moe_sft::kernels::weight_format_name(moe_sft::kernels::WeightFormat(moe_sft::api::enum_value(weight_format)));
}

uint32_t moe_sft_version(void) { return MOE_SFT_VERSION_NUMBER; }

}  // extern "C"
