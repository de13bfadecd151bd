#include "layer/row_checks.h"

#include <string>

namespace moe_sft::layer {

using checks::NonFinite;

namespace {

// index = row * cols + column of the hit that comes first in token order.
template <class T>
NonFinite first_in_token_order(const T* p, int64_t cols, const Routing& routing) {
  NonFinite best;
  int64_t best_pair = 0;
  for (int64_t row = 0; row < routing.rows(); ++row) {
    const int64_t pair = routing.row_pair[row];
    if (best.found && pair > best_pair) continue;  // cannot come first any more
    const NonFinite hit = checks::first_non_finite(p + row * cols, cols);
    if (hit.found && (!best.found || pair < best_pair)) {
      best = {true, row * cols + hit.index, hit.value};
      best_pair = pair;
    }
  }
  return best;
}

std::string row_position(const Routing& routing, const NonFinite& hit, int64_t cols) {
  const int64_t row = hit.index / cols;
  int64_t expert = 0;
  while (routing.expert_begin[expert + 1] <= row) ++expert;
  const int64_t pair = routing.row_pair[row];
  return "token " + std::to_string(pair / routing.top_k) + ", expert " + std::to_string(expert) + ", column " +
         std::to_string(hit.index % cols);
}

template <class T>
void check(const T* p, int64_t cols, const Routing& routing, const char* tensor, checks::Stage stage) {
  const NonFinite hit = first_in_token_order(p, cols, routing);
  if (hit.found) checks::throw_non_finite(hit.value, tensor, row_position(routing, hit, cols), stage);
}

}  // namespace

void check_rows(const float* p, int64_t cols, const Routing& routing, const char* tensor, checks::Stage stage) {
  check(p, cols, routing, tensor, stage);
}
void check_rows(const bf16* p, int64_t cols, const Routing& routing, const char* tensor, checks::Stage stage) {
  check(p, cols, routing, tensor, stage);
}

}  // namespace moe_sft::layer
