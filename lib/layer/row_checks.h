// check_finite over the layer's expert-sorted rows: the first NaN/Inf in the caller's order (token, then
// slot, then column), named with its token, expert and column, whatever order the rows are stored in.
#pragma once
#include <cstdint>

#include "checks/finite_check.h"
#include "layer/routing.h"
#include "runtime/bf16.h"

namespace moe_sft::layer {

// For a [rows, cols] block in expert-sorted row order: throws at its first bad element in the caller's order.
void check_rows(const float* p, int64_t cols, const Routing& routing, const char* tensor, checks::Stage stage);
void check_rows(const bf16* p, int64_t cols, const Routing& routing, const char* tensor, checks::Stage stage);

}  // namespace moe_sft::layer
