// A frozen weight matrix W [rows, cols] (rows = outputs of x·W^T, HF nn.Linear convention), packed once
// into the blocked pair-interleaved ("VNNI") layout that VDPBF16PS and AMX TDPBF16PS consume:
//
//   panels of kPanelRows rows; inside a panel, for each pair of columns (2c, 2c+1), the kPanelRows rows'
//   two values side by side: element (r, c) lives at
//     (r / kPanelRows) * kPanelRows * padded_cols + (c / 2) * 2 * kPanelRows + (r % kPanelRows) * 2 + c % 2
//
// rows and cols are padded to kColAlign with zeros, so kernels never test for tails inside a panel, and a
// block re-paired along the rows (repack.h) is made of whole AMX B tiles. This one copy serves both x·W^T
// (contract over cols) and d·W (contract over rows): there is no second, transposed copy of any weight.
//
// Quantized formats keep the same panel order with narrower elements, so a block of panels dequantizes
// (dequantize.h) into exactly the bf16 layout above, which the bf16 kernels then consume:
//   int8, fp8_e4m3_block: one byte per element at the bf16 element's index;
//   int4, mxfp4: four pairs share 64 bytes, as 32 16-bit words, one per bf16 lane j = (r % 16) * 2 + c % 2:
//         word j of unit kp / 4 holds pair kp's value in bits 4 (kp % 4) .. 4 (kp % 4) + 3, so one load and a
//         shift per pair give a whole pair vector's codes, in lane order.
// Scales follow each panel's codes as [groups][scale_rows()] (f32; bf16 for int4_k2; e8m0 bytes for mxfp4;
// fp8_e4m3_block's block scales as f32), one per row (scale_rows() = kPanelRows), or one per panel where all
// its rows share their scales (scale_rows() = 1: fp8 blocks of a multiple of kPanelRows rows, whose parts
// start on whole blocks), and int4_awq adds the matching
// f32 biases -zero·scale, so every integer format dequantizes as code·scale + bias (int4_k2's bias is
// -8·scale, computed) and every minifloat one as value(code)·scale (minifloat.h). Padding rows and padding
// groups have scale 0 (and bias 0; e8m0 byte 0, 2^-127, times code 0), and the padding columns code 0: the
// padding dequantizes to exact zeros as in the bf16 layout.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "kernels/quantize.h"
#include "kernels/weight_format.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels {

class PackedMatrix {
 public:
  static constexpr int64_t kPanelRows = 16;  // one 512-bit f32 accumulator / one AMX tile's N
  static constexpr int64_t kColAlign = 32;   // one AMX tile's K in bf16

  PackedMatrix() = default;
  // Bytes of storage a rows x cols matrix packs into in format f (a whole number of cache lines);
  // group_size is the int4 formats' (ignored otherwise).
  // fp8_e4m3_block's block_rows decides whether a panel's rows share their scales.
  static int64_t storage_bytes(WeightFormat f, int64_t rows, int64_t cols, int64_t group_size, int64_t block_rows = 1);
  // Packs the rows x cols block of bf16 `src` whose element (r, c) is src[r * ld + c] into `storage`
  // (storage_bytes of it, 64-byte aligned, owned by the caller, e.g. a PackedStorage).
  PackedMatrix(const bf16* src, int64_t rows, int64_t cols, int64_t ld, void* storage);
  // Packs rows [r0, r0 + rows) x columns [c0, c0 + cols) of a quantized matrix; c0 and cols are whole
  // groups of src.
  PackedMatrix(const QuantizedSource& src, int64_t r0, int64_t rows, int64_t c0, int64_t cols, void* storage);
  // A bf16 matrix already in the packed layout (a dequantized block): nothing is copied.
  static PackedMatrix view(const bf16* data, int64_t rows, int64_t cols, int64_t padded_rows, int64_t padded_cols);

  WeightFormat format() const { return format_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t padded_rows() const { return padded_rows_; }
  int64_t padded_cols() const { return padded_cols_; }
  int64_t panels() const { return padded_rows_ / kPanelRows; }

  // bf16 format only.
  const bf16* panel(int64_t p) const { return static_cast<const bf16*>(data_) + p * kPanelRows * padded_cols_; }
  bf16 at(int64_t r, int64_t c) const {
    return panel(r / kPanelRows)[(c / 2) * 2 * kPanelRows + (r % kPanelRows) * 2 + c % 2];
  }

  // Quantized formats only.
  int64_t group() const { return group_; }   // columns per scale (int8: padded_cols, one per row)
  int64_t groups() const { return groups_; } // scale groups per padded row
  int64_t scale_rows() const { return scale_rows_; }  // scales per panel and group: kPanelRows, or 1 (shared)
  const uint8_t* codes(int64_t p) const { return static_cast<const uint8_t*>(data_) + p * panel_code_bytes(); }
  const float* scales_f32(int64_t p) const { return static_cast<const float*>(scales_) + p * groups_ * scale_rows_; }
  const bf16* scales_bf16(int64_t p) const { return static_cast<const bf16*>(scales_) + p * groups_ * scale_rows_; }
  const uint8_t* scales_e8m0(int64_t p) const {
    return static_cast<const uint8_t*>(scales_) + p * groups_ * scale_rows_;
  }
  // Index of row r's scale of group g in its panel's scales.
  int64_t scale_index(int64_t g, int64_t r) const { return g * scale_rows_ + (scale_rows_ == 1 ? 0 : r % kPanelRows); }
  const float* biases(int64_t p) const { return biases_ + p * groups_ * kPanelRows; }
  int64_t panel_code_bytes() const { return kPanelRows * padded_cols_ * (packs_nibbles(format_) ? 1 : 2) / 2; }

  // W[r, c] as stored, for any format (quantized: code·scale + bias or value(code)·scale, in f32 as the
  // kernels compute it).
  float value(int64_t r, int64_t c) const;

 private:
  WeightFormat format_ = WeightFormat::bf16;
  int64_t rows_ = 0, cols_ = 0, padded_rows_ = 0, padded_cols_ = 0, group_ = 0, groups_ = 0, scale_rows_ = kPanelRows;
  const void* data_ = nullptr;
  const void* scales_ = nullptr;
  const float* biases_ = nullptr;
};

// One allocation holding many packed matrices (a layer part's): on 2 MiB pages where the OS allows it
// (d·W walks a matrix a panel, tens of KiB, at a time; on 4 KiB pages nearly every step of that walk is a
// TLB miss) and on NUMA node `numa_node` where there are several (-1: wherever it is first touched). One
// block per part keeps the huge-page rounding to a single page's worth.
class PackedStorage {
 public:
  PackedStorage() = default;
  PackedStorage(int64_t bytes, int numa_node);
  std::byte* data() const { return data_.get(); }

 private:
  struct FreeDeleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte[], FreeDeleter> data_;
};

}  // namespace moe_sft::kernels
