#include "packed_matrix.h"

#include "runtime/numa.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstring>
#include <new>

namespace moe_sft::kernels {

namespace {
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr size_t kHugePage = size_t(2) << 20;
}  // namespace

int64_t PackedMatrix::storage_elems(int64_t rows, int64_t cols) {
  return round_up(round_up(rows, kColAlign) * round_up(cols, kColAlign), 32);
}

PackedMatrix::PackedMatrix(const bf16* src, int64_t rows, int64_t cols, int64_t ld, bf16* storage)
    : rows_(rows), cols_(cols), padded_rows_(round_up(rows, kColAlign)), padded_cols_(round_up(cols, kColAlign)),
      data_(storage) {
  std::memset(storage, 0, size_t(padded_rows_ * padded_cols_) * sizeof(bf16));
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dst = storage + (r / kPanelRows) * kPanelRows * padded_cols_ + (r % kPanelRows) * 2;
    const bf16* row = src + r * ld;
    for (int64_t c = 0; c < cols; ++c) dst[(c / 2) * 2 * kPanelRows + c % 2] = row[c];
  }
}

PackedStorage::PackedStorage(int64_t elems, int numa_node) {
  const size_t bytes = size_t(elems) * sizeof(bf16);
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  const size_t rounded = size_t(round_up(int64_t(bytes), int64_t(align)));
  void* p = std::aligned_alloc(align, rounded == 0 ? align : rounded);
  if (p == nullptr) throw std::bad_alloc();
  data_.reset(static_cast<bf16*>(p));
#if defined(MADV_HUGEPAGE)
  if (align == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);  // advice only
#endif
  prefer_numa_node(p, bytes, numa_node);  // before the first touch (the packing) places the pages
}

}  // namespace moe_sft::kernels
