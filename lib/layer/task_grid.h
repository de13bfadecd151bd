// Task grids for the thread pool. Work is cut into (expert, column block) tasks, so one hot expert that
// got most of the tokens still spreads over every core; consecutive task indices walk one expert's
// column blocks, so the pool's contiguous per-worker ranges keep an expert's rows in one core's cache.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "layer/expert_part.h"
#include "layer/routing.h"
#include "runtime/thread_pool.h"

namespace moe_sft::layer {

constexpr int64_t kRowChunk = 32;    // rows per task in row-local phases (rank-r products, gathers use 4x)
constexpr int64_t kTokenChunk = 16;  // tokens per task in the per-token sums

inline int64_t chunks(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

struct ColumnBlock {
  int part;        // tensor-parallel part the columns belong to (0 for dimensions that are not split)
  int64_t begin;   // global column range [begin, end) ...
  int64_t end;
  int64_t local;   // ... which starts at column `local` of the part's slice
  int64_t width() const { return end - begin; }
};

// Blocks of `block` columns over [0, width): one part.
inline std::vector<ColumnBlock> column_blocks(int64_t width, int64_t block) {
  std::vector<ColumnBlock> out;
  for (int64_t c = 0; c < width; c += block) out.push_back({0, c, std::min(c + block, width), c});
  return out;
}

// Blocks of the intermediate dimension, never straddling two parts.
inline std::vector<ColumnBlock> column_blocks(const std::vector<ExpertPart>& parts, int64_t block) {
  std::vector<ColumnBlock> out;
  for (size_t p = 0; p < parts.size(); ++p)
    for (int64_t c = 0; c < parts[p].width(); c += block)
      out.push_back({int(p), parts[p].i_begin + c, parts[p].i_begin + std::min(c + block, parts[p].width()), c});
  return out;
}

struct ExpertTask {
  int64_t expert, row_begin, row_end;
  int64_t block_index;
  const ColumnBlock* block;
  int64_t rows() const { return row_end - row_begin; }
};

// Every (expert with rows, column block) pair, ordered part by part, then expert by expert: a worker's
// contiguous range of tasks stays within one tensor-parallel part (on several NUMA nodes, the part on the
// worker's node) and walks one expert's blocks in a row.
class ExpertGrid {
 public:
  ExpertGrid(const Routing& routing, std::vector<ColumnBlock> blocks) : routing_(routing), blocks_(std::move(blocks)) {
    for (int64_t e = 0; e < routing.experts(); ++e)
      if (routing.rows_of(e) > 0) active_.push_back(e);
    for (size_t b = 0; b < blocks_.size(); ++b)  // blocks come grouped by part
      if (b == 0 || blocks_[b].part != blocks_[b - 1].part) part_first_block_.push_back(int64_t(b));
    part_first_block_.push_back(int64_t(blocks_.size()));
  }
  int64_t size() const { return int64_t(active_.size() * blocks_.size()); }
  int64_t block_count() const { return int64_t(blocks_.size()); }
  ExpertTask operator[](int64_t i) const {
    const int64_t experts = int64_t(active_.size());
    size_t p = 0;  // the part whose tasks hold i (parts are few: a linear walk)
    while (i >= experts * part_first_block_[p + 1]) ++p;
    const int64_t first = part_first_block_[p], width = part_first_block_[p + 1] - first;
    const int64_t local = i - experts * first;
    const int64_t e = active_[size_t(local / width)], b = first + local % width;
    return {e, routing_.expert_begin[e], routing_.expert_begin[e + 1], b, &blocks_[size_t(b)]};
  }

 private:
  const Routing& routing_;
  std::vector<ColumnBlock> blocks_;
  std::vector<int64_t> active_;
  std::vector<int64_t> part_first_block_;  // index of each part's first block, then blocks_.size()
};

// Every expert's rows cut into chunks of at most `chunk` rows (for row-local work such as rank-r products).
inline std::vector<ExpertTask> row_chunks(const Routing& routing, int64_t chunk) {
  std::vector<ExpertTask> out;
  for (int64_t e = 0; e < routing.experts(); ++e)
    for (int64_t r = routing.expert_begin[e]; r < routing.expert_begin[e + 1]; r += chunk)
      out.push_back({e, r, std::min(r + chunk, routing.expert_begin[e + 1]), 0, nullptr});
  return out;
}

// The per-token sums that end both passes: fn(token, sum) for every token, chunks of kTokenChunk tokens
// per task, with sum the worker's own [width] row of `sums`, zeroed for each token.
template <class Fn>
void for_each_token_sum(ThreadPool& pool, int threads, int64_t tokens, float* sums, int64_t width, Fn&& fn) {
  pool.parallel_for(chunks(tokens, kTokenChunk), threads, [&](int64_t task, int worker) {
    float* sum = sums + int64_t(worker) * width;
    for (int64_t token = task * kTokenChunk; token < std::min(tokens, (task + 1) * kTokenChunk); ++token) {
      std::fill(sum, sum + width, 0.0f);
      fn(token, sum);
    }
  });
}

}  // namespace moe_sft::layer
