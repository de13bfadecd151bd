#include "checks/finite_check.h"

#include <cmath>
#include <cstring>

#include "runtime/error.h"

namespace moe_sft::checks {

namespace {

// Exponent all ones: Inf or NaN. Tested on the bits so the loops vectorize and no FP compare is involved.
inline bool bad(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u;
}
inline bool bad(bf16 v) { return (v.bits & 0x7f80u) == 0x7f80u; }

template <class T>
NonFinite first_in(const T* p, int64_t n) {
  constexpr int64_t kChunk = 1024;  // test a chunk branch-free, locate inside it only when it holds a hit
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = i0 + kChunk < n ? i0 + kChunk : n;
    bool any = false;
    for (int64_t i = i0; i < i1; ++i) any |= bad(p[i]);
    if (!any) continue;
    for (int64_t i = i0; i < i1; ++i)
      if (bad(p[i])) return {true, i, to_float(p[i])};
  }
  return {};
}

}  // namespace

NonFinite first_non_finite(const float* p, int64_t n) { return first_in(p, n); }
NonFinite first_non_finite(const bf16* p, int64_t n) { return first_in(p, n); }

void throw_non_finite(float value, const std::string& tensor, const std::string& where, Stage stage) {
  const char* text = std::isnan(value) ? "nan" : value > 0 ? "inf" : "-inf";
  throw Error(MOE_SFT_ERR_NON_FINITE, std::string("non-finite value ") + text + " in " + tensor + " at " + where +
                                          " (stage " + std::to_string(stage.number) + " of " +
                                          std::to_string(stage.of) + ": " + stage.name + ")");
}

std::string token_column(int64_t index, int64_t cols) {
  return "token " + std::to_string(index / cols) + ", column " + std::to_string(index % cols);
}

std::string token_slot(int64_t index, int64_t top_k) {
  return "token " + std::to_string(index / top_k) + ", slot " + std::to_string(index % top_k);
}

std::string expert_row_column(int64_t index, int64_t rows, int64_t cols) {
  return "expert " + std::to_string(index / (rows * cols)) + ", row " + std::to_string(index / cols % rows) +
         ", column " + std::to_string(index % cols);
}

}  // namespace moe_sft::checks
