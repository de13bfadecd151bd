#include "packed_matrix.h"

#include "runtime/numa.h"

#include <cstring>
#include <new>

namespace moe_sft::kernels {

namespace {
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
}  // namespace

PackedMatrix::PackedMatrix(const bf16* src, int64_t rows, int64_t cols, int64_t ld, int numa_node)
    : rows_(rows), cols_(cols), padded_rows_(round_up(rows, kColAlign)), padded_cols_(round_up(cols, kColAlign)) {
  size_t bytes = size_t(padded_rows_ * padded_cols_) * sizeof(bf16);
  void* p = std::aligned_alloc(64, round_up(int64_t(bytes), 64));
  if (p == nullptr) throw std::bad_alloc();
  data_.reset(static_cast<bf16*>(p));
  prefer_numa_node(p, bytes, numa_node);  // before the first touch below places the pages
  std::memset(p, 0, bytes);
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dst = data_.get() + (r / kPanelRows) * kPanelRows * padded_cols_ + (r % kPanelRows) * 2;
    const bf16* row = src + r * ld;
    for (int64_t c = 0; c < cols; ++c) dst[(c / 2) * 2 * kPanelRows + c % 2] = row[c];
  }
}

}  // namespace moe_sft::kernels
