#include "packed_matrix.h"

#include "kernels/minifloat.h"
#include "runtime/assert.h"
#include "runtime/numa.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cmath>
#include <cstring>
#include <new>

namespace moe_sft::kernels {

namespace {
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
constexpr size_t kHugePage = size_t(2) << 20;
constexpr int64_t P = PackedMatrix::kPanelRows;

// The byte of an int4 panel holding pair kp's code for bf16 lane `lane` (little-endian 16-bit words, see
// packed_matrix.h), in its low nibble for even kp, its high nibble for odd kp.
int64_t int4_byte(int64_t kp, int64_t lane) { return (kp / 4) * 64 + lane * 2 + (kp % 4) / 2; }

// How a packed matrix stores its scales (packed_matrix.h): fp8_e4m3_block's bf16 scales are widened to f32.
ScaleType packed_scale_type(WeightFormat f) {
  return f == WeightFormat::int4_k2 ? ScaleType::bf16 : f == WeightFormat::mxfp4 ? ScaleType::e8m0 : ScaleType::f32;
}

// Sizes of a quantized matrix's three arrays (codes, scales, biases), each a whole number of cache lines.
struct QuantizedLayout {
  int64_t group, groups, scale_rows, code_bytes, scale_bytes, bias_bytes;
  QuantizedLayout(WeightFormat f, int64_t rows, int64_t cols, int64_t group_size, int64_t block_rows) {
    const int64_t padded_rows = round_up(rows, PackedMatrix::kColAlign), padded_cols = round_up(cols, PackedMatrix::kColAlign);
    group = has_groups(f) ? group_size : padded_cols;
    groups = (padded_cols + group - 1) / group;
    code_bytes = round_up(padded_rows * padded_cols / (packs_nibbles(f) ? 2 : 1), 64);
    scale_rows = f == WeightFormat::fp8_e4m3_block && block_rows % P == 0 ? 1 : P;
    const int64_t scales = padded_rows / P * scale_rows * groups;
    scale_bytes = round_up(scales * QuantizedSource::scale_bytes(packed_scale_type(f)), 64);
    bias_bytes = f == WeightFormat::int4_awq ? round_up(scales * 4, 64) : 0;
  }
};

}  // namespace

int64_t PackedMatrix::storage_bytes(WeightFormat f, int64_t rows, int64_t cols, int64_t group_size,
                                    int64_t block_rows) {
  if (f == WeightFormat::bf16) return round_up(round_up(rows, kColAlign) * round_up(cols, kColAlign) * 2, 64);
  const QuantizedLayout l(f, rows, cols, group_size, block_rows);
  return l.code_bytes + l.scale_bytes + l.bias_bytes;
}

PackedMatrix::PackedMatrix(const bf16* src, int64_t rows, int64_t cols, int64_t ld, void* storage)
    : rows_(rows), cols_(cols), padded_rows_(round_up(rows, kColAlign)), padded_cols_(round_up(cols, kColAlign)),
      data_(storage) {
  bf16* out = static_cast<bf16*>(storage);
  std::memset(out, 0, size_t(padded_rows_ * padded_cols_) * sizeof(bf16));
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dst = out + (r / P) * P * padded_cols_ + (r % P) * 2;
    const bf16* row = src + r * ld;
    for (int64_t c = 0; c < cols; ++c) dst[(c / 2) * 2 * P + c % 2] = row[c];
  }
}

PackedMatrix PackedMatrix::view(const bf16* data, int64_t rows, int64_t cols, int64_t padded_rows,
                                int64_t padded_cols) {
  MOE_SFT_ASSERT(padded_rows % kPanelRows == 0 && padded_cols % kColAlign == 0);
  MOE_SFT_ASSERT(rows <= padded_rows && cols <= padded_cols && MOE_SFT_ALIGNED(data, 64));
  PackedMatrix m;
  m.rows_ = rows;
  m.cols_ = cols;
  m.padded_rows_ = padded_rows;
  m.padded_cols_ = padded_cols;
  m.data_ = data;
  return m;
}

PackedMatrix::PackedMatrix(const QuantizedSource& src, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                           void* storage)
    : format_(src.format), rows_(rows), cols_(cols), padded_rows_(round_up(rows, kColAlign)),
      padded_cols_(round_up(cols, kColAlign)) {
  const QuantizedLayout l(format_, rows, cols, src.group, src.block_rows);
  group_ = l.group;
  groups_ = l.groups;
  scale_rows_ = l.scale_rows;
  auto* codes = static_cast<uint8_t*>(storage);
  std::memset(codes, 0, size_t(l.code_bytes + l.scale_bytes + l.bias_bytes));
  auto* scales = codes + l.code_bytes;
  auto* biases = reinterpret_cast<float*>(scales + l.scale_bytes);
  data_ = codes;
  scales_ = scales;
  biases_ = format_ == WeightFormat::int4_awq ? biases : nullptr;

  const int64_t g0 = c0 / src.group;  // the slice's first group in src
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sr = r0 + r;
    uint8_t* panel = codes + (r / P) * panel_code_bytes();
    for (int64_t c = 0; c < cols; ++c) {  // padding columns keep code 0: int8's zero, or in an int4 padding group
      const int code = src.code(sr, c0 + c);
      const int64_t kp = c / 2, lane = (r % P) * 2 + c % 2;
      if (packs_nibbles(format_)) panel[int4_byte(kp, lane)] |= uint8_t(code << (4 * (kp % 2)));
      else panel[kp * 2 * P + lane] = uint8_t(code);
    }
    // Padding groups keep scale 0 (slices start on whole groups; a format's last group may be partial).
    for (int64_t g = 0; g * group_ < cols; ++g) {
      const int64_t at = (r / P) * groups_ * scale_rows_ + scale_index(g, r);  // shared: every row writes the same
      const int64_t sg = has_groups(format_) ? g0 + g : 0;
      switch (packed_scale_type(format_)) {
        case ScaleType::bf16:  // exact: the scale came from bf16
          reinterpret_cast<bf16*>(scales)[at] = to_bf16(src.scale_of(sr, sg));
          break;
        case ScaleType::e8m0: scales[at] = uint8_t(src.raw_scale(sr, sg)); break;
        case ScaleType::f32: reinterpret_cast<float*>(scales)[at] = src.scale_of(sr, sg); break;
      }
      const float s = src.scale_of(sr, sg);
      if (format_ == WeightFormat::int4_awq) biases[at] = -float(src.zero_of(sr, g0 + g)) * s;
    }
  }
}

float PackedMatrix::value(int64_t r, int64_t c) const {
  if (format_ == WeightFormat::bf16) return to_float(at(r, c));
  const int64_t p = r / P, lane = (r % P) * 2 + c % 2, kp = c / 2, at = scale_index(c / group_, r);
  int code;
  if (packs_nibbles(format_)) code = (codes(p)[int4_byte(kp, lane)] >> (4 * (kp % 2))) & 0xF;
  else if (format_ == WeightFormat::fp8_e4m3_block) code = codes(p)[kp * 2 * P + lane];
  else code = int8_t(codes(p)[kp * 2 * P + lane]);
  if (format_ == WeightFormat::mxfp4) return e2m1_value(uint8_t(code)) * e8m0_value(scales_e8m0(p)[at]);
  if (format_ == WeightFormat::fp8_e4m3_block) return e4m3_value(uint8_t(code)) * scales_f32(p)[at];
  const float s = format_ == WeightFormat::int4_k2 ? to_float(scales_bf16(p)[at]) : scales_f32(p)[at];
  const float bias = format_ == WeightFormat::int4_awq ? biases(p)[at] : format_ == WeightFormat::int4_k2 ? -8.0f * s : 0.0f;
  return std::fma(float(code), s, bias);
}

PackedStorage::PackedStorage(int64_t bytes_wanted, int numa_node) {
  const size_t bytes = size_t(bytes_wanted);
  const size_t align = bytes >= kHugePage ? kHugePage : 64;
  const size_t rounded = size_t(round_up(int64_t(bytes), int64_t(align)));
  void* p = std::aligned_alloc(align, rounded == 0 ? align : rounded);
  if (p == nullptr) throw std::bad_alloc();
  data_.reset(static_cast<std::byte*>(p));
#if defined(MADV_HUGEPAGE)
  if (align == kHugePage) madvise(p, rounded, MADV_HUGEPAGE);  // advice only
#endif
  prefer_numa_node(p, bytes, numa_node);  // before the first touch (the packing) places the pages
}

}  // namespace moe_sft::kernels
