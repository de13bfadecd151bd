// moe_sft_config across ABI versions, and its validation (config.cpp).
#pragma once
#include "kernels/quantize.h"
#include "moe_sft.h"

namespace moe_sft::api {

// The caller's config, upgraded to this library's struct: fields a shorter (older) struct lacks keep
// their defaults; a longer (newer) one is refused unless its extra bytes are all zero.
moe_sft_config read_config(const moe_sft_config* cfg);
// Every field in range and consistent; throws Error(INVALID_ARGUMENT) naming the first that is not.
void validate_config(const moe_sft_config& cfg);

// A projection's [rows, cols] in the config's (validated) weight format: its sizes and scale layout.
kernels::QuantizedSource source_shape(const moe_sft_config& cfg, int64_t rows, int64_t cols);

// The process default of check_finite: MOE_SFT_CHECK_FINITE set to anything but "" or "0".
bool check_finite_default();

}  // namespace moe_sft::api
