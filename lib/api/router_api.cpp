// C ABI entry points of the router: validation of every argument and input value, then lib/router.
// Everything is checked before the first write, so a failing call leaves its outputs untouched.
#include <cmath>
#include <string>

#include "api/config.h"
#include "api/status.h"
#include "api/validate.h"
#include "checks/finite_check.h"
#include "router/router.h"
#include "moe_sft.h"

using moe_sft::api::enum_value;
using moe_sft::api::format_number;
using moe_sft::api::guard;
using moe_sft::api::invalid;
using moe_sft::api::require_array;
using moe_sft::api::require_range;
using moe_sft::router::RouterShape;

namespace {

// The arguments both calls share; returns the shape and the logits' element size.
// logits_dtype and scoring: the callers' enum values as integers (enum_value), not yet validated.
RouterShape validate_shape(int64_t qlen, int32_t expert_num, int32_t top_k, int32_t logits_dtype,
                           const void* logits, int32_t scoring, int32_t renormalize) {
  require_range(expert_num, 1, INT32_MAX, "expert_num");
  require_range(top_k, 1, expert_num, "top_k");
  // Bounds every [qlen, expert_num] index (and its byte offset) well inside int64.
  require_range(qlen, 0, moe_sft::api::kMaxElements / expert_num, "qlen");
  moe_sft::api::require_dtype(logits_dtype, "logits_dtype");
  if (scoring != MOE_SFT_SCORING_SOFTMAX && scoring != MOE_SFT_SCORING_SIGMOID)
    invalid("scoring = " + std::to_string(scoring) +
            " is not a scoring function (MOE_SFT_SCORING_SOFTMAX = 0, MOE_SFT_SCORING_SIGMOID = 1)");
  require_array(logits, "logits", qlen * expert_num, logits_dtype == MOE_SFT_DTYPE_BF16 ? 2 : 4);
  return {qlen, expert_num, top_k,
          scoring == MOE_SFT_SCORING_SIGMOID ? moe_sft::router::Scoring::sigmoid : moe_sft::router::Scoring::softmax,
          renormalize != 0};
}

// A non-finite bias would poison the selection of every row at once: refused rather than ranked.
void validate_bias(const float* bias, int32_t expert_num) {
  if (bias == nullptr) return;
  require_array(bias, "correction_bias", expert_num, 4);
  for (int32_t e = 0; e < expert_num; ++e)
    if (!std::isfinite(bias[e]))
      invalid("correction_bias[" + std::to_string(e) + "] = " + format_number(bias[e]) + " is not finite");
}

// With MOE_SFT_CHECK_FINITE on, a poisoned row is an error naming it (the router would route it safely,
// but the NaN came from somewhere upstream, and check_finite is there to find where).
void report_non_finite_logits(moe_sft_dtype dtype, const void* logits, int64_t qlen, int32_t expert_num) {
  const int64_t n = qlen * expert_num;
  const moe_sft::checks::NonFinite hit =
      dtype == MOE_SFT_DTYPE_BF16 ? moe_sft::checks::first_non_finite(static_cast<const moe_sft::bf16*>(logits), n)
                                  : moe_sft::checks::first_non_finite(static_cast<const float*>(logits), n);
  if (hit.found)
    moe_sft::checks::throw_non_finite(
        hit.value, "logits", "token " + std::to_string(hit.index / expert_num) + ", expert " +
                                 std::to_string(hit.index % expert_num),
        moe_sft::checks::Stage{1, 1, "router input"});
}

}  // namespace

extern "C" {

moe_sft_status moe_sft_route(int64_t qlen, int32_t expert_num, int32_t top_k, moe_sft_dtype logits_dtype,
                             const void* logits, moe_sft_scoring scoring, int32_t renormalize,
                             const float* correction_bias, int64_t* expert_ids, float* routing_weights) {
  return guard("moe_sft_route", [&] {
    const RouterShape shape = validate_shape(qlen, expert_num, top_k, enum_value(logits_dtype), logits, enum_value(scoring),
                                               renormalize);
    require_array(expert_ids, "expert_ids", qlen * top_k, 8);
    require_array(routing_weights, "routing_weights", qlen * top_k, 4);
    validate_bias(correction_bias, expert_num);
    if (moe_sft::api::check_finite_default()) report_non_finite_logits(logits_dtype, logits, qlen, expert_num);
    if (logits_dtype == MOE_SFT_DTYPE_BF16)
      moe_sft::router::route(shape, static_cast<const moe_sft::bf16*>(logits), correction_bias, expert_ids,
                            routing_weights);
    else
      moe_sft::router::route(shape, static_cast<const float*>(logits), correction_bias, expert_ids, routing_weights);
  });
}

moe_sft_status moe_sft_route_backward(int64_t qlen, int32_t expert_num, int32_t top_k, moe_sft_dtype logits_dtype,
                                      const void* logits, moe_sft_scoring scoring, int32_t renormalize,
                                      const int64_t* expert_ids, const float* grad_routing_weights,
                                      float* grad_logits) {
  return guard("moe_sft_route_backward", [&] {
    const RouterShape shape = validate_shape(qlen, expert_num, top_k, enum_value(logits_dtype), logits, enum_value(scoring),
                                               renormalize);
    require_array(expert_ids, "expert_ids", qlen * top_k, 8);
    require_array(grad_routing_weights, "grad_routing_weights", qlen * top_k, 4);
    require_array(grad_logits, "grad_logits", qlen * expert_num, 4);
    moe_sft::api::validate_expert_ids(expert_ids, qlen, top_k, expert_num, /*lowest=*/0);
    if (logits_dtype == MOE_SFT_DTYPE_BF16)
      moe_sft::router::route_backward(shape, static_cast<const moe_sft::bf16*>(logits), expert_ids,
                                     grad_routing_weights, grad_logits);
    else
      moe_sft::router::route_backward(shape, static_cast<const float*>(logits), expert_ids, grad_routing_weights,
                                     grad_logits);
  });
}

}  // extern "C"
