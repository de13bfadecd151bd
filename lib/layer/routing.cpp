#include "routing.h"

#include <algorithm>

namespace moe_sft::layer {

Routing Routing::build(int64_t qlen, int64_t top_k, int64_t experts, const int64_t* ids) {
  Routing r;
  r.qlen = qlen;
  r.top_k = top_k;
  const int64_t pairs = qlen * top_k;
  r.expert_begin.assign(size_t(experts + 1), 0);
  for (int64_t p = 0; p < pairs; ++p)
    if (ids[p] >= 0) ++r.expert_begin[size_t(ids[p]) + 1];
  for (int64_t e = 0; e < experts; ++e) r.expert_begin[e + 1] += r.expert_begin[e];
  r.row_pair.resize(size_t(r.expert_begin[experts]));
  r.pair_row.assign(size_t(pairs), -1);
  std::vector<int64_t> next(r.expert_begin.begin(), r.expert_begin.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {  // stable: token order within each expert
    if (ids[p] < 0) continue;
    int64_t row = next[size_t(ids[p])]++;
    r.row_pair[row] = p;
    r.pair_row[p] = row;
  }
  return r;
}

int64_t Routing::max_expert_rows() const {
  int64_t m = 0;
  for (int64_t e = 0; e < experts(); ++e) m = std::max(m, rows_of(e));
  return m;
}

}  // namespace moe_sft::layer
