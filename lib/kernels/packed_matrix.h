// A frozen bf16 weight matrix W [rows, cols] (rows = outputs of x·W^T, HF nn.Linear convention), packed once
// into the blocked pair-interleaved ("VNNI") layout that VDPBF16PS and AMX TDPBF16PS consume:
//
//   panels of kPanelRows rows; inside a panel, for each pair of columns (2c, 2c+1), the kPanelRows rows'
//   two values side by side: element (r, c) lives at
//     (r / kPanelRows) * kPanelRows * padded_cols + (c / 2) * 2 * kPanelRows + (r % kPanelRows) * 2 + c % 2
//
// rows and cols are padded to kColAlign with zeros, so kernels never test for tails inside a panel, and a
// block re-paired along the rows (repack.h) is made of whole AMX B tiles. This one copy serves both x·W^T (contract over cols) and d·W (contract over rows): there is no
// second, transposed copy of any weight.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "runtime/bf16.h"

namespace moe_sft::kernels {

class PackedMatrix {
 public:
  static constexpr int64_t kPanelRows = 16;  // one 512-bit f32 accumulator / one AMX tile's N
  static constexpr int64_t kColAlign = 32;   // one AMX tile's K in bf16

  PackedMatrix() = default;
  // Elements of storage a rows x cols matrix packs into (a whole number of cache lines).
  static int64_t storage_elems(int64_t rows, int64_t cols);
  // Packs the rows x cols block of `src` whose element (r, c) is src[r * ld + c] into `storage`
  // (storage_elems(rows, cols) of it, 64-byte aligned, owned by the caller, e.g. a PackedStorage).
  PackedMatrix(const bf16* src, int64_t rows, int64_t cols, int64_t ld, bf16* storage);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t padded_rows() const { return padded_rows_; }
  int64_t padded_cols() const { return padded_cols_; }
  const bf16* panel(int64_t p) const { return data_ + p * kPanelRows * padded_cols_; }

  bf16 at(int64_t r, int64_t c) const {
    return panel(r / kPanelRows)[(c / 2) * 2 * kPanelRows + (r % kPanelRows) * 2 + c % 2];
  }

 private:
  int64_t rows_ = 0, cols_ = 0, padded_rows_ = 0, padded_cols_ = 0;
  const bf16* data_ = nullptr;
};

// One allocation holding many packed matrices (a layer part's): on 2 MiB pages where the OS allows it
// (d·W walks a matrix a panel, tens of KiB, at a time; on 4 KiB pages nearly every step of that walk is a
// TLB miss) and on NUMA node `numa_node` where there are several (-1: wherever it is first touched). One
// block per part keeps the huge-page rounding to a single page's worth.
class PackedStorage {
 public:
  PackedStorage() = default;
  PackedStorage(int64_t elems, int numa_node);
  bf16* data() const { return data_.get(); }

 private:
  struct FreeDeleter {
    void operator()(bf16* p) const { std::free(p); }
  };
  std::unique_ptr<bf16[], FreeDeleter> data_;
};

}  // namespace moe_sft::kernels
