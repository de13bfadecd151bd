// The top-k router: gate logits -> scores (softmax over a row, or elementwise sigmoid) -> the top_k experts
// of each token and their routing weights, and the backward of those weights. NaN-safe by construction:
// whatever a row holds, it yields top_k distinct ids and finite weights; the rules for NaN and ±Inf are
// stated once, in moe_sft.h at moe_sft_route. Rows are independent and cheap (O(E log k)), so both calls
// run serially on the caller's thread and need neither the worker pool nor the scratch arena.
#pragma once
#include <cstdint>

#include "runtime/bf16.h"

namespace moe_sft::router {

enum class Scoring { softmax, sigmoid };

struct RouterShape {
  int64_t qlen = 0;
  int64_t experts = 0;
  int64_t top_k = 0;  // 1 <= top_k <= experts
  Scoring scoring = Scoring::softmax;
  bool renormalize = false;
};

// logits [qlen, experts]; bias [experts] (finite) or null; writes ids and weights [qlen, top_k].
// Arguments are validated by the caller; the only failure is std::bad_alloc, before anything is written.
template <class Logit>
void route(const RouterShape& shape, const Logit* logits, const float* bias, int64_t* ids, float* weights);

// grad_logits [qlen, experts] = d(sum of grad_weights · weights) / d logits, for the weights that route would
// give the selection `ids` [qlen, top_k] (each in [0, experts); a repeated id counts twice in the sum).
template <class Logit>
void route_backward(const RouterShape& shape, const Logit* logits, const int64_t* ids, const float* grad_weights,
                    float* grad_logits);

extern template void route<float>(const RouterShape&, const float*, const float*, int64_t*, float*);
extern template void route<bf16>(const RouterShape&, const bf16*, const float*, int64_t*, float*);
extern template void route_backward<float>(const RouterShape&, const float*, const int64_t*, const float*, float*);
extern template void route_backward<bf16>(const RouterShape&, const bf16*, const int64_t*, const float*, float*);

}  // namespace moe_sft::router
