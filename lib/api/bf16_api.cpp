// C ABI of the bf16 array converters (runtime/bf16_arrays.h): a C program needs nothing but moe_sft.h to make
// the layer's bf16 inputs and read its outputs. Checked before the first write.
#include <cstdint>
#include <string>

#include "api/status.h"
#include "api/validate.h"
#include "moe_sft.h"
#include "runtime/bf16_arrays.h"

using moe_sft::api::guard;
using moe_sft::api::invalid;
using moe_sft::api::require_array;

namespace {

void validate(const void* src, int64_t src_size, const void* dst, int64_t dst_size, int64_t n) {
  if (n < 0) invalid("n = " + std::to_string(n) + " is negative");
  if (n > moe_sft::api::kMaxElements) invalid("n = " + std::to_string(n) + " is too large (more than 2^50 elements)");
  require_array(src, "src", n, src_size);
  require_array(dst, "dst", n, dst_size);
  if (n == 0) return;
  const uintptr_t s = reinterpret_cast<uintptr_t>(src), d = reinterpret_cast<uintptr_t>(dst);
  if (s < d + uintptr_t(n * dst_size) && d < s + uintptr_t(n * src_size))
    invalid("src and dst overlap: convert into a separate array");
}

}  // namespace

extern "C" {

moe_sft_status moe_sft_bf16_from_f32(const float* src, uint16_t* dst, int64_t n) {
  return guard("moe_sft_bf16_from_f32", [&] {
    validate(src, 4, dst, 2, n);
    moe_sft::bf16_from_f32_array(src, dst, n);
  });
}

moe_sft_status moe_sft_bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  return guard("moe_sft_bf16_to_f32", [&] {
    validate(src, 2, dst, 4, n);
    moe_sft::bf16_to_f32_array(src, dst, n);
  });
}

}  // extern "C"
