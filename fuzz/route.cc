// Fuzz target: moe_sft_route and moe_sft_route_backward on fuzzed logits (any f32 or bf16 bit pattern:
// NaN, +-Inf, subnormals), shapes, top_k, scoring, renormalization and correction bias, valid and not.
// Checks: on error nothing written (canaries) and a message; on success every row has top_k distinct ids in
// [0, expert_num) and weights in [0, 1] (the header's promise for any logits), and a second call gives the
// same bits; route_backward of the route's own selection with finite grads gives finite grad_logits.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "fuzz_input.h"
#include "moe_sft.h"

using namespace moe_sft_fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  const int64_t qlen = in.range(0, 9) == 0 ? in.range(-2, 0) : in.range(0, 12);
  const int32_t E = int32_t(in.range(0, 9) == 0 ? in.range(-1, 0) : in.range(1, 20));
  const int32_t top_k = int32_t(in.range(-1, 6));
  const int dtype = int(in.range(0, 9) == 0 ? in.range(2, 3) : in.range(0, 1));  // 2, 3: not a dtype
  const int scoring = int(in.range(0, 9) == 0 ? in.range(2, 3) : in.range(0, 1));
  const int32_t renormalize = int32_t(in.range(0, 1));
  const size_t n = size_t(std::max<int64_t>(qlen, 0) * std::max<int32_t>(E, 0));
  const bool raw_bits = in.flag();
  std::vector<float> logits32(n);
  std::vector<uint16_t> logits16(n);
  for (size_t i = 0; i < n; ++i) {
    logits32[i] = raw_bits ? bf16_value(in.raw<uint16_t>()) : in.value() * 4.0f;
    logits16[i] = bf16_bits(logits32[i]);
  }
  const void* logits = dtype == MOE_SFT_DTYPE_BF16 ? static_cast<const void*>(logits16.data()) : logits32.data();
  std::vector<float> bias(size_t(std::max<int32_t>(E, 0)) + 1);
  for (auto& b : bias) b = in.range(0, 15) == 0 ? in.value() : float(in.range(-10, 10)) / 10.0f;
  const float* bias_ptr = in.flag() ? bias.data() : nullptr;
  const size_t slots = size_t(std::max<int64_t>(qlen, 0) * std::max<int32_t>(top_k, 0));

  std::vector<int64_t> ids[2] = {canary<int64_t>(slots), canary<int64_t>(slots)};
  std::vector<float> weights[2] = {canary<float>(slots), canary<float>(slots)};
  moe_sft_status st[2];
  for (int k = 0; k < 2; ++k)
    st[k] = moe_sft_route(qlen, E, top_k, moe_sft_dtype(dtype), logits, moe_sft_scoring(scoring), renormalize,
                          bias_ptr, ids[k].data(), weights[k].data());
  FUZZ_CHECK(st[0] == st[1], "route: two calls gave %d and %d", int(st[0]), int(st[1]));
  if (st[0] != MOE_SFT_OK) {
    FUZZ_CHECK(moe_sft_last_error()[0] != '\0', "route failed with %d and no message", int(st[0]));
    FUZZ_CHECK(is_canary(ids[0]) && is_canary(weights[0]), "failed route (%d) wrote its outputs", int(st[0]));
  } else {
    FUZZ_CHECK(same_bits(ids[0], ids[1]) && same_bits(weights[0], weights[1]), "route: two calls differ");
    for (int64_t t = 0; t < qlen; ++t)
      for (int32_t j = 0; j < top_k; ++j) {
        const int64_t id = ids[0][size_t(t * top_k + j)];
        const float w = weights[0][size_t(t * top_k + j)];
        FUZZ_CHECK(id >= 0 && id < E, "row %lld slot %d: id %lld", (long long)t, j, (long long)id);
        FUZZ_CHECK(w >= 0.0f && w <= 1.0f, "row %lld slot %d: weight %g", (long long)t, j, double(w));
        for (int32_t i = 0; i < j; ++i)
          FUZZ_CHECK(ids[0][size_t(t * top_k + i)] != id, "row %lld: id %lld twice", (long long)t, (long long)id);
      }
  }

  // route_backward: the route's own selection (when it succeeded) or fuzzed ids, finite or fuzzed grads.
  std::vector<int64_t> sel(slots);
  const bool own = st[0] == MOE_SFT_OK && in.flag();
  for (size_t i = 0; i < slots; ++i) sel[i] = own ? ids[0][i] : in.range(-1, std::max<int32_t>(E, 1));
  const bool finite_grads = in.flag();
  std::vector<float> grad_w(slots);
  for (auto& g : grad_w) g = finite_grads ? float(in.range(-100, 100)) / 50.0f : in.value();
  std::vector<float> grad_logits = canary<float>(n);
  const moe_sft_status bst = moe_sft_route_backward(qlen, E, top_k, moe_sft_dtype(dtype), logits,
                                                    moe_sft_scoring(scoring), renormalize, sel.data(), grad_w.data(),
                                                    grad_logits.data());
  if (bst != MOE_SFT_OK) {
    FUZZ_CHECK(moe_sft_last_error()[0] != '\0', "route_backward failed with %d and no message", int(bst));
    FUZZ_CHECK(is_canary(grad_logits), "failed route_backward (%d) wrote grad_logits", int(bst));
  } else if (finite_grads) {
    for (size_t i = 0; i < n; ++i)
      FUZZ_CHECK(std::isfinite(grad_logits[i]), "grad_logits[%zu] = %g from finite grads", i, double(grad_logits[i]));
  }
  return 0;
}
