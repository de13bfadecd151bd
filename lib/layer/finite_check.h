// check_finite: scans for the first NaN/Inf in the layer's inputs, intermediates and outputs, and reports
// it in the caller's coordinates (token / slot / expert / row / column) with the stage it appeared at, so
// that "where did the first NaN come from" is one error message instead of eight hand-inserted probes.
#pragma once
#include <cstdint>
#include <string>

#include "layer/routing.h"
#include "runtime/bf16.h"

namespace moe_sft::layer {

struct NonFinite {
  bool found = false;
  int64_t index = 0;  // flat index into the scanned array
  float value = 0.0f;
};

// First non-finite element of a dense array, in memory order.
NonFinite first_non_finite(const float* p, int64_t n);
NonFinite first_non_finite(const bf16* p, int64_t n);

// For [rows, cols] blocks in expert-sorted row order (ld = row stride): the non-finite element that comes
// first in the caller's order (token, then slot, then column). index = row * cols + column.
NonFinite first_non_finite_rows(const float* p, int64_t rows, int64_t cols, int64_t ld, const Routing& routing);
NonFinite first_non_finite_rows(const bf16* p, int64_t rows, int64_t cols, int64_t ld, const Routing& routing);

// A stage of a pass, as the message names it: "(stage 4 of 7: gate/up projection)".
struct Stage {
  int number, of;
  const char* name;
};

// Throws Error(MOE_SFT_ERR_NON_FINITE): "non-finite value nan in <tensor> at <where> (stage n of m: name)".
[[noreturn]] void throw_non_finite(float value, const std::string& tensor, const std::string& where, Stage stage);

// "token t, expert e, column c" for a hit in an expert-sorted block (index = row * cols + column).
std::string row_position(const Routing& routing, const NonFinite& hit, int64_t cols);
// "token t, column c" for an index into a [T, cols] array.
std::string token_column(int64_t index, int64_t cols);
// "expert e, row i, column c" for an index into an [E, rows, cols] array.
std::string expert_row_column(int64_t index, int64_t rows, int64_t cols);

// For a [rows, cols] block in expert-sorted order: throws at its first bad element in the caller's order.
template <class T>
void check_rows(const T* p, int64_t cols, const Routing& routing, const char* tensor, Stage stage) {
  const NonFinite hit = first_non_finite_rows(p, routing.rows(), cols, cols, routing);
  if (hit.found) throw_non_finite(hit.value, tensor, row_position(routing, hit, cols), stage);
}
// For an [E, rows, cols] array (base and LoRA weights, LoRA grads).
template <class T>
void check_expert_array(const T* p, int64_t experts, int64_t rows, int64_t cols, const std::string& tensor,
                        Stage stage) {
  const NonFinite hit = first_non_finite(p, experts * rows * cols);
  if (hit.found) throw_non_finite(hit.value, tensor, expert_row_column(hit.index, rows, cols), stage);
}

}  // namespace moe_sft::layer
