// Router math. Scores are computed in double from the (exactly converted) f32/bf16 logits, so that a clean
// row selects the same experts as a float64 reference even where two f32 scores would round to a tie.
#include "router/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace moe_sft::router {

namespace {

// One row's scores under the rules of moe_sft_route, reused across rows (allocated once per call).
struct Row {
  explicit Row(size_t experts) : score(experts), nan(experts), finite(experts) {}
  std::vector<double> score;
  std::vector<unsigned char> nan;     // the logit is NaN: it ranks below every other entry
  std::vector<unsigned char> finite;  // only finite logits get a gradient
};

template <class Logit>
void score_row(const Logit* logits, int64_t experts, Scoring scoring, Row& row) {
  int64_t valid = 0;  // non-NaN entries
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t e = 0; e < experts; ++e) {
    const double x = to_float(logits[e]);
    row.nan[e] = std::isnan(x);
    row.finite[e] = std::isfinite(x);
    if (!row.nan[e]) {
      ++valid;
      top = std::max(top, x);
    }
  }
  if (scoring == Scoring::sigmoid) {
    // exp(-x) is 0 at x = +Inf and +Inf at x = -Inf, so the formula gives the limits 1 and 0 by itself.
    for (int64_t e = 0; e < experts; ++e)
      row.score[e] = row.nan[e] ? 0.0 : 1.0 / (1.0 + std::exp(-double(to_float(logits[e]))));
    return;
  }
  if (valid == 0) {  // nothing to rank by: score it as a row of equal logits
    std::fill(row.score.begin(), row.score.end(), 1.0 / double(experts));
    return;
  }
  if (std::isinf(top)) {
    // +Inf: the limit of softmax as those logits grow together; -Inf: every non-NaN entry is -Inf, the limit of
    // a row of equal logits. Either way the entries at `top` share the mass equally.
    int64_t ties = 0;
    for (int64_t e = 0; e < experts; ++e) ties += !row.nan[e] && double(to_float(logits[e])) == top;
    for (int64_t e = 0; e < experts; ++e)
      row.score[e] = !row.nan[e] && double(to_float(logits[e])) == top ? 1.0 / double(ties) : 0.0;
    return;
  }
  double sum = 0.0;
  for (int64_t e = 0; e < experts; ++e) {
    row.score[e] = row.nan[e] ? 0.0 : std::exp(double(to_float(logits[e])) - top);  // -Inf gives 0
    sum += row.score[e];
  }
  for (int64_t e = 0; e < experts; ++e) row.score[e] /= sum;  // sum >= 1: the top entry contributes exp(0)
}

// The top_k entries by score + bias, NaN entries last, ties to the lower index: distinct by construction.
void select(const Row& row, const float* bias, int64_t top_k, std::vector<double>& key, std::vector<int64_t>& order,
            int64_t* ids) {
  const int64_t experts = int64_t(row.score.size());
  for (int64_t e = 0; e < experts; ++e) key[e] = row.score[e] + (bias ? double(bias[e]) : 0.0);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int64_t a, int64_t b) {
    if (row.nan[a] != row.nan[b]) return row.nan[b] != 0;
    if (!row.nan[a] && key[a] != key[b]) return key[a] > key[b];
    return a < b;
  });
  std::copy(order.begin(), order.begin() + top_k, ids);
}

// Sum of the selected scores, the renormalization divisor; 0 means "uniform 1/top_k" (see moe_sft_route).
double selected_sum(const Row& row, const int64_t* ids, int64_t top_k) {
  double sum = 0.0;
  for (int64_t j = 0; j < top_k; ++j) sum += row.score[ids[j]];
  return sum;
}

}  // namespace

template <class Logit>
void route(const RouterShape& shape, const Logit* logits, const float* bias, int64_t* ids, float* weights) {
  const int64_t E = shape.experts, k = shape.top_k;
  Row row{size_t(E)};
  std::vector<double> key(row.score.size());
  std::vector<int64_t> order(row.score.size());
  for (int64_t t = 0; t < shape.qlen; ++t) {
    score_row(logits + t * E, E, shape.scoring, row);
    int64_t* row_ids = ids + t * k;
    select(row, bias, k, key, order, row_ids);
    const double sum = shape.renormalize ? selected_sum(row, row_ids, k) : 1.0;
    for (int64_t j = 0; j < k; ++j)
      weights[t * k + j] = float(sum > 0.0 ? row.score[row_ids[j]] / sum : 1.0 / double(k));
  }
}

template <class Logit>
void route_backward(const RouterShape& shape, const Logit* logits, const int64_t* ids, const float* grad_weights,
                    float* grad_logits) {
  const int64_t E = shape.experts, k = shape.top_k;
  Row row{size_t(E)};
  std::vector<double> grad_score(row.score.size());  // dL/dscore[e]
  for (int64_t t = 0; t < shape.qlen; ++t) {
    score_row(logits + t * E, E, shape.scoring, row);
    const int64_t* row_ids = ids + t * k;
    const float* g = grad_weights + t * k;
    std::fill(grad_score.begin(), grad_score.end(), 0.0);
    if (!shape.renormalize) {
      for (int64_t j = 0; j < k; ++j) grad_score[row_ids[j]] += g[j];
    } else if (const double sum = selected_sum(row, row_ids, k); sum > 0.0) {
      // w_j = s_j / sum  =>  dL/ds_e = sum over slots j holding e of (g_j - <g, w>) / sum
      double g_dot_w = 0.0;
      for (int64_t j = 0; j < k; ++j) g_dot_w += g[j] * (row.score[row_ids[j]] / sum);
      for (int64_t j = 0; j < k; ++j) grad_score[row_ids[j]] += (g[j] - g_dot_w) / sum;
    }  // else the weights are the constant 1/top_k: no gradient
    float* out = grad_logits + t * E;
    if (shape.scoring == Scoring::sigmoid) {
      for (int64_t e = 0; e < E; ++e)
        out[e] = row.finite[e] ? float(grad_score[e] * row.score[e] * (1.0 - row.score[e])) : 0.0f;
    } else {
      // softmax Jacobian: ds_a/dx_b = s_a (delta_ab - s_b), so unselected experts get -s_b <grad_score, s>.
      // NaN entries have score 0 and drop out of the sum, as they drop out of the softmax. Renormalized, the
      // weights are a softmax over the selected logits alone and <grad_score, s> is exactly 0: it is not
      // summed, so that unselected experts get an exact 0 rather than rounding noise.
      double grad_dot_score = 0.0;
      if (!shape.renormalize)
        for (int64_t e = 0; e < E; ++e) grad_dot_score += grad_score[e] * row.score[e];
      for (int64_t e = 0; e < E; ++e)
        out[e] = row.finite[e] ? float(row.score[e] * (grad_score[e] - grad_dot_score)) : 0.0f;
    }
  }
}

template void route<float>(const RouterShape&, const float*, const float*, int64_t*, float*);
template void route<bf16>(const RouterShape&, const bf16*, const float*, int64_t*, float*);
template void route_backward<float>(const RouterShape&, const float*, const int64_t*, const float*, float*);
template void route_backward<bf16>(const RouterShape&, const bf16*, const int64_t*, const float*, float*);

}  // namespace moe_sft::router
