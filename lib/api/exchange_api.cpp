// C ABI entry point of the expert-parallel exchange plan (exchange/exchange_plan.h): every argument and id is
// checked before the first write, so a failing call leaves its outputs untouched.
#include <cstdint>
#include <cstring>
#include <string>

#include "api/status.h"
#include "api/validate.h"
#include "exchange/exchange_plan.h"
#include "moe_sft.h"

using moe_sft::api::guard;
using moe_sft::api::invalid;
using moe_sft::api::require_array;
using moe_sft::api::require_range;

namespace {

struct Bytes {
  const char* name;
  const void* data;
  int64_t size;
};

// An output sharing bytes with another array would be read after it was written: refused by name.
void require_disjoint(const Bytes (&arrays)[6]) {
  for (int a = 0; a < 6; ++a)
    for (int b = a + 1; b < 6; ++b) {
      const uintptr_t pa = reinterpret_cast<uintptr_t>(arrays[a].data);
      const uintptr_t pb = reinterpret_cast<uintptr_t>(arrays[b].data);
      if (arrays[a].size > 0 && arrays[b].size > 0 && pa < pb + uintptr_t(arrays[b].size) &&
          pb < pa + uintptr_t(arrays[a].size))
        invalid(std::string(arrays[a].name) + " and " + arrays[b].name + " overlap: each must be an array of its own");
    }
}

}  // namespace

extern "C" {

moe_sft_status moe_sft_plan_exchange(int64_t qlen, int32_t top_k, const int64_t* expert_ids, int32_t expert_num,
                                     const int32_t* placement, int32_t world, int64_t* send_counts,
                                     int64_t* send_offsets, int64_t* send_pairs, int64_t* send_rows) {
  return guard("moe_sft_plan_exchange", [&] {
    require_range(top_k, 1, INT32_MAX, "top_k");
    require_range(qlen, 0, moe_sft::api::kMaxElements / top_k, "qlen");
    require_range(expert_num, 1, INT32_MAX, "expert_num");
    require_range(world, 1, INT32_MAX, "world");
    require_array(expert_ids, "expert_ids", qlen * top_k, 8);
    require_array(placement, "placement", expert_num, 4);
    require_array(send_counts, "send_counts", world, 8);
    require_array(send_offsets, "send_offsets", world, 8);
    require_array(send_pairs, "send_pairs", qlen * top_k, 8);
    require_array(send_rows, "send_rows", 1, 8);
    const int64_t pairs = qlen * top_k;
    require_disjoint({{"expert_ids", expert_ids, pairs * 8},
                      {"placement", placement, int64_t(expert_num) * 4},
                      {"send_counts", send_counts, int64_t(world) * 8},
                      {"send_offsets", send_offsets, int64_t(world) * 8},
                      {"send_pairs", send_pairs, pairs * 8},
                      {"send_rows", send_rows, 8}});
    for (int32_t e = 0; e < expert_num; ++e)
      if (placement[e] < 0 || placement[e] >= world)
        invalid("placement[" + std::to_string(e) + "] = " + std::to_string(placement[e]) + " is out of range [0, " +
                std::to_string(world) + "): every expert needs an owner rank");
    moe_sft::api::validate_expert_ids(expert_ids, qlen, top_k, expert_num);
    *send_rows = moe_sft::exchange::plan_send(qlen, top_k, expert_ids, expert_num, placement, world,
                                              {send_counts, send_offsets, send_pairs});
  });
}

}  // extern "C"
