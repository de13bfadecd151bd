// check_finite: finds the first NaN/Inf in an array and reports it in the caller's coordinates (token,
// column, expert, row) with the stage of the pass it appeared at, so that "where did the first NaN come
// from" is one error message instead of hand-inserted probes. Serves the layer (inputs, intermediates,
// outputs, weights at create), the router (logits) and the quantizer (weights to quantize).
#pragma once
#include <cstdint>
#include <string>

#include "runtime/bf16.h"

namespace moe_sft::checks {

struct NonFinite {
  bool found = false;
  int64_t index = 0;  // flat index into the scanned array
  float value = 0.0f;
};

// First non-finite element of a dense array, in memory order.
NonFinite first_non_finite(const float* p, int64_t n);
NonFinite first_non_finite(const bf16* p, int64_t n);

// A stage of a pass, as the message names it: "(stage 4 of 7: gate/up projection)".
struct Stage {
  int number, of;
  const char* name;
};

// Throws Error(MOE_SFT_ERR_NON_FINITE): "non-finite value nan in <tensor> at <where> (stage n of m: name)".
[[noreturn]] void throw_non_finite(float value, const std::string& tensor, const std::string& where, Stage stage);

// "token t, column c" for an index into a [T, cols] array.
std::string token_column(int64_t index, int64_t cols);
// "token t, slot j" for an index into a [T, top_k] array.
std::string token_slot(int64_t index, int64_t top_k);
// "expert e, row i, column c" for an index into an [E, rows, cols] array.
std::string expert_row_column(int64_t index, int64_t rows, int64_t cols);

// For a [T, cols] array (token order): throws at its first bad element.
template <class T>
void check_tokens(const T* p, int64_t tokens, int64_t cols, const char* tensor, Stage stage) {
  const NonFinite hit = first_non_finite(p, tokens * cols);
  if (hit.found) throw_non_finite(hit.value, tensor, token_column(hit.index, cols), stage);
}
// For an [E, rows, cols] array (base and LoRA weights, LoRA grads).
template <class T>
void check_expert_array(const T* p, int64_t experts, int64_t rows, int64_t cols, const std::string& tensor,
                        Stage stage) {
  const NonFinite hit = first_non_finite(p, experts * rows * cols);
  if (hit.found) throw_non_finite(hit.value, tensor, expert_row_column(hit.index, rows, cols), stage);
}

}  // namespace moe_sft::checks
