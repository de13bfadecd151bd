// Routing bookkeeping: the (token, slot) pairs of one call, counting-sorted by expert so that each expert's
// rows are contiguous. "Row" below always means a position in this expert-sorted order; "pair" is the
// token-order index t * top_k + j. Pairs whose id is -1 get no row.
#pragma once
#include <cstdint>
#include <vector>

namespace moe_sft::layer {

struct Routing {
  int64_t qlen = 0;
  int64_t top_k = 0;
  std::vector<int64_t> expert_begin;  // E + 1 offsets: expert e owns rows [expert_begin[e], expert_begin[e+1])
  std::vector<int64_t> row_pair;      // row -> pair
  std::vector<int64_t> pair_row;      // pair -> row, or -1 for a "no expert" slot

  // ids: [qlen, top_k], every value already validated to lie in [-1, experts).
  static Routing build(int64_t qlen, int64_t top_k, int64_t experts, const int64_t* ids);

  int64_t rows() const { return int64_t(row_pair.size()); }
  int64_t experts() const { return int64_t(expert_begin.size()) - 1; }
  int64_t rows_of(int64_t e) const { return expert_begin[e + 1] - expert_begin[e]; }
  int64_t max_expert_rows() const;
};

}  // namespace moe_sft::layer
