#include "kernels/quantize.h"

#include "kernels/minifloat.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace moe_sft::kernels {

QuantizedSource QuantizedSource::shape(WeightFormat f, int64_t rows, int64_t cols, int64_t group_size,
                                       int64_t block_rows, int64_t block_cols, ScaleType fp8_scale_type) {
  QuantizedSource s{f, rows, cols, cols, 1, ScaleType::f32, nullptr, nullptr, nullptr};
  if (f == WeightFormat::fp8_e4m3_block) {
    s.group = block_cols;
    s.block_rows = block_rows;
    s.scale_type = fp8_scale_type;
  } else if (has_groups(f)) {
    s.group = group_size;
    s.scale_type = f == WeightFormat::int4_k2 ? ScaleType::bf16
                   : f == WeightFormat::mxfp4 ? ScaleType::e8m0
                                              : ScaleType::f32;
  }
  return s;
}

int QuantizedSource::code(int64_t r, int64_t c) const {
  const auto* bytes = static_cast<const uint8_t*>(weights) + r * weight_row_bytes(format, cols);
  switch (format) {
    case WeightFormat::int8: return int(int8_t(bytes[c]));
    case WeightFormat::fp8_e4m3_block: return bytes[c];
    case WeightFormat::int4_awq:
    case WeightFormat::mxfp4: return (bytes[c / 2] >> (4 * (c % 2))) & 0xF;
    case WeightFormat::int4_k2: {
      uint32_t word;  // little-endian words: value j of a word sits in bits 4j .. 4j + 3
      std::memcpy(&word, bytes + (c / 8) * 4, sizeof word);
      return int(word >> (4 * (c % 8))) & 0xF;
    }
    case WeightFormat::bf16: break;
  }
  return 0;
}

float QuantizedSource::raw_scale(int64_t sr, int64_t g) const {
  const int64_t at = sr * groups() + g;
  switch (scale_type) {
    case ScaleType::bf16: return to_float(static_cast<const bf16*>(scale)[at]);
    case ScaleType::e8m0: return float(static_cast<const uint8_t*>(scale)[at]);
    case ScaleType::f32: break;
  }
  return static_cast<const float*>(scale)[at];
}

float QuantizedSource::scale_of(int64_t r, int64_t g) const {
  const float s = raw_scale(r / block_rows, g);
  return scale_type == ScaleType::e8m0 ? e8m0_value(uint8_t(s)) : s;
}

double QuantizedSource::value(int64_t r, int64_t c) const {
  const double s = scale_of(r, c / group);
  if (is_minifloat(format)) return double(minifloat_code_value(format, code(r, c))) * s;
  return double(code(r, c) - zero_of(r, c / group)) * s;
}

int QuantizedSource::zero_of(int64_t r, int64_t g) const {
  switch (format) {
    case WeightFormat::int4_awq: return zero[r * groups() + g];
    case WeightFormat::int4_k2: return 8;
    default: return 0;
  }
}

int64_t QuantizedSource::weight_row_bytes(WeightFormat f, int64_t cols) {
  switch (f) {
    case WeightFormat::int8:
    case WeightFormat::fp8_e4m3_block: return cols;
    case WeightFormat::int4_awq:
    case WeightFormat::mxfp4: return cols / 2;
    case WeightFormat::int4_k2: return cols / 8 * 4;
    case WeightFormat::bf16: break;
  }
  return cols * 2;
}

namespace {

// Round half to even in f32, as numpy's rint: the contract tests reproduce these numbers exactly.
float rint_f32(float v) { return std::nearbyint(v); }

void quantize_int8_row(const bf16* w, int64_t cols, int8_t* q, float* scale) {
  float max_abs = 0.0f;
  for (int64_t c = 0; c < cols; ++c) max_abs = std::max(max_abs, std::fabs(to_float(w[c])));
  const float s = max_abs > 0.0f ? max_abs / 127.0f : 1.0f;
  for (int64_t c = 0; c < cols; ++c) q[c] = int8_t(std::clamp(rint_f32(to_float(w[c]) / s), -127.0f, 127.0f));
  *scale = s;
}

// One AWQ group: the range [min(0, min w), max(0, max w)] in 15 steps, so that 0 is exactly representable.
void quantize_awq_group(const bf16* w, int64_t n, uint8_t* codes, float* scale, uint8_t* zero) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, to_float(w[i]));
    hi = std::max(hi, to_float(w[i]));
  }
  const float s = hi > lo ? (hi - lo) / 15.0f : 1.0f;
  const float z = std::clamp(rint_f32(-lo / s), 0.0f, 15.0f);
  for (int64_t i = 0; i < n; ++i) codes[i] = uint8_t(std::clamp(rint_f32(to_float(w[i]) / s) + z, 0.0f, 15.0f));
  *scale = s;
  *zero = uint8_t(z);
}

}  // namespace

void quantize(WeightFormat f, int64_t group_size, int64_t rows, int64_t cols, const bf16* w, void* weights,
              float* scale, uint8_t* zero) {
  if (f == WeightFormat::int8) {
    for (int64_t r = 0; r < rows; ++r)
      quantize_int8_row(w + r * cols, cols, static_cast<int8_t*>(weights) + r * cols, scale + r);
    return;
  }
  // int4_awq: codes of a group first, then two per byte, low nibble first.
  const int64_t groups = cols / group_size;
  uint8_t* packed = static_cast<uint8_t*>(weights);
  std::vector<uint8_t> codes(static_cast<size_t>(group_size));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group_size;
      quantize_awq_group(w + r * cols + c0, group_size, codes.data(), scale + r * groups + g, zero + r * groups + g);
      for (int64_t i = 0; i < group_size; ++i) {
        uint8_t& byte = packed[r * (cols / 2) + (c0 + i) / 2];
        const int shift = 4 * int((c0 + i) % 2);
        byte = uint8_t((byte & ~(0xF << shift)) | (codes[size_t(i)] << shift));
      }
    }
}

namespace {

// The e8m0 exponent of an MX block with largest magnitude amax (OCP MX: floor(log2 amax) minus e2m1's largest
// exponent, 2), clamped to e8m0's range; an all-zero block gets 2^0.
int mx_exponent(float amax) {
  if (amax == 0.0f) return 0;
  int e;
  std::frexp(amax, &e);  // amax in [2^(e-1), 2^e)
  return std::clamp(e - 1 - 2, -127, 127);
}

}  // namespace

void quantize_blocks(const bf16* w, const QuantizedSource& dst) {
  auto* codes = static_cast<uint8_t*>(const_cast<void*>(dst.weights));
  const int64_t row_bytes = QuantizedSource::weight_row_bytes(dst.format, dst.cols);
  for (int64_t br = 0; br < dst.scale_rows(); ++br)
    for (int64_t g = 0; g < dst.groups(); ++g) {
      const int64_t r0 = br * dst.block_rows, r1 = std::min(dst.rows, r0 + dst.block_rows);
      const int64_t c0 = g * dst.group, c1 = std::min(dst.cols, c0 + dst.group);
      float amax = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(to_float(w[r * dst.cols + c])));
      const int64_t at = br * dst.groups() + g;
      float s;  // the stored scale: the codes are the block's values divided by it
      if (dst.format == WeightFormat::mxfp4) {
        const int e = mx_exponent(amax);
        static_cast<uint8_t*>(const_cast<void*>(dst.scale))[at] = uint8_t(e + 127);
        s = std::ldexp(1.0f, e);  // a power of two: dividing by it is exact
      } else {  // scale_inv = amax / 448, stored as the caller's dtype; the codes divide by the stored value
        s = amax > 0.0f ? amax / kE4m3Max : 1.0f;
        if (dst.scale_type == ScaleType::bf16) {
          static_cast<bf16*>(const_cast<void*>(dst.scale))[at] = to_bf16(s);
          s = to_float(to_bf16(s));
        } else {
          static_cast<float*>(const_cast<void*>(dst.scale))[at] = s;
        }
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float v = to_float(w[r * dst.cols + c]);
          if (dst.format == WeightFormat::mxfp4) {
            const uint8_t nibble = e2m1_encode(v / s);
            uint8_t& byte = codes[r * row_bytes + c / 2];
            const int shift = int(4 * (c % 2));
            byte = uint8_t((byte & ~(0xF << shift)) | (nibble << shift));
          } else {
            codes[r * row_bytes + c] = e4m3_encode(v / s);
          }
        }
    }
}

}  // namespace moe_sft::kernels
