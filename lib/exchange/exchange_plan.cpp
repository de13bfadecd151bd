#include "exchange/exchange_plan.h"

#include <cstddef>
#include <vector>

namespace moe_sft::exchange {

int64_t plan_send(int64_t qlen, int32_t top_k, const int64_t* expert_ids, int32_t expert_num, const int32_t* placement,
                  int32_t world, const SendPlan& plan) {
  const int64_t pairs = qlen * top_k;
  // Every temporary exists before the first write to the caller's arrays (running out of memory writes nothing).
  std::vector<int64_t> next(size_t(expert_num), 0), rank_rows(size_t(world), 0), rank_cursor(size_t(world), 0);
  // Rows per expert, then each expert's first row: experts visited rank by rank, ascending id within a rank.
  for (int64_t p = 0; p < pairs; ++p)
    if (expert_ids[p] >= 0) ++next[size_t(expert_ids[p])];
  for (int32_t e = 0; e < expert_num; ++e) rank_rows[size_t(placement[e])] += next[size_t(e)];
  int64_t total = 0;
  for (int32_t r = 0; r < world; ++r) {
    plan.counts[r] = rank_rows[size_t(r)];
    plan.offsets[r] = rank_cursor[size_t(r)] = total;
    total += rank_rows[size_t(r)];
  }
  for (int32_t e = 0; e < expert_num; ++e) {
    const int64_t rows = next[size_t(e)];
    next[size_t(e)] = rank_cursor[size_t(placement[e])];
    rank_cursor[size_t(placement[e])] += rows;
  }
  for (int64_t p = 0; p < pairs; ++p)
    if (expert_ids[p] >= 0) plan.pairs[next[size_t(expert_ids[p])]++] = p;
  for (int64_t i = total; i < pairs; ++i) plan.pairs[i] = -1;
  return total;
}

}  // namespace moe_sft::exchange
