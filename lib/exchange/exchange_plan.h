// The send side of an expert-parallel all-to-all: which (token, slot) pairs go to which rank, in which order.
// Pure bookkeeping over validated arguments (api/exchange_api checks them); no communication, no threads.
#pragma once
#include <cstdint>

namespace moe_sft::exchange {

struct SendPlan {
  int64_t* counts;   // [world] rows to each rank
  int64_t* offsets;  // [world] first row of each rank's block (exclusive prefix sum of counts)
  int64_t* pairs;    // [qlen * top_k] flat pair index t * top_k + j of each send row, then -1 up to the end
};

// Rows ordered by (owner rank, expert id, pair index): each rank's block is sorted by expert, so a receiver's
// rows for one expert from one sender are contiguous and in token order. Returns the number of rows (pairs
// whose id is not -1). ids in [-1, expert_num), placement[e] in [0, world): the caller checked them.
int64_t plan_send(int64_t qlen, int32_t top_k, const int64_t* expert_ids, int32_t expert_num, const int32_t* placement,
                  int32_t world, const SendPlan& plan);

}  // namespace moe_sft::exchange
