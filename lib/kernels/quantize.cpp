#include "kernels/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace moe_sft::kernels {

int QuantizedSource::code(int64_t r, int64_t c) const {
  const auto* bytes = static_cast<const uint8_t*>(weights) + r * weight_row_bytes(format, cols);
  switch (format) {
    case WeightFormat::int8: return int(int8_t(bytes[c]));
    case WeightFormat::int4_awq: return (bytes[c / 2] >> (4 * (c % 2))) & 0xF;
    case WeightFormat::int4_k2: {
      uint32_t word;  // little-endian words: value j of a word sits in bits 4j .. 4j + 3
      std::memcpy(&word, bytes + (c / 8) * 4, sizeof word);
      return int(word >> (4 * (c % 8))) & 0xF;
    }
    case WeightFormat::bf16: break;
  }
  return 0;
}

float QuantizedSource::scale_of(int64_t r, int64_t g) const {
  const int64_t at = r * groups() + g;
  if (format == WeightFormat::int4_k2) return to_float(static_cast<const bf16*>(scale)[at]);
  return static_cast<const float*>(scale)[at];
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
    case WeightFormat::int8: return cols;
    case WeightFormat::int4_awq: return cols / 2;
    case WeightFormat::int4_k2: return cols / 8 * 4;
    case WeightFormat::bf16: break;
  }
  return cols * 2;
}

int64_t QuantizedSource::scale_row_elems(WeightFormat f, int64_t cols, int64_t group_size) {
  return has_groups(f) ? cols / group_size : 1;
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
  // hi - lo overflows f32 when the group spans more than f32's largest value (weights near +-3e38): then the
  // range is taken in double, where it fits, and its fifteenth fits f32 again.
  const float range = hi - lo;
  const float s = !(hi > lo) ? 1.0f : std::isfinite(range) ? range / 15.0f : float((double(hi) - double(lo)) / 15.0);
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

}  // namespace moe_sft::kernels
