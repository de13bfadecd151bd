// The pre-quantized layouts of the ABI (see moe_sft_weight_format in moe_sft.h) for one matrix W [rows, cols]
// (rows = output channels, cols = K), and quantization of bf16 into them. Create-time code: element by
// element, clear rather than fast (the packed copy the kernels read is made from these, once).
#pragma once
#include <cstdint>

#include "kernels/weight_format.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels {

// One matrix in a pre-quantized layout. `group` is the run of elements along a row that share a scale:
// group_size for the int4 formats, the whole row (cols) for int8.
struct QuantizedSource {
  WeightFormat format;
  int64_t rows, cols, group;
  const void* weights;  // int8 [rows, cols] | uint8 [rows, cols/2] | int32 [rows, cols/8]
  const void* scale;    // f32 [rows] | f32 [rows, cols/group] | bf16 [rows, cols/group]
  const uint8_t* zero;  // int4_awq: uint8 [rows, cols/group]; else null

  int64_t groups() const { return cols / group; }
  // The stored integer of element (r, c): int8 q, or the int4 nibble (int4_k2 stores q + 8).
  int code(int64_t r, int64_t c) const;
  float scale_of(int64_t r, int64_t g) const;
  // The code that means 0: the AWQ zero point, 8 for int4_k2 (offset-coded), 0 for int8.
  int zero_of(int64_t r, int64_t g) const;
  // W[r, c] = (code - zero) * scale, in double (what the reference and the tests compare against).
  double value(int64_t r, int64_t c) const {
    return double(code(r, c) - zero_of(r, c / group)) * double(scale_of(r, c / group));
  }

  // Bytes per row of the weights and per row of the scale/zero arrays (one expert's matrix is rows of these).
  static int64_t weight_row_bytes(WeightFormat f, int64_t cols);
  static int64_t scale_row_elems(WeightFormat f, int64_t cols, int64_t group_size);
  // Bytes of one scale: bf16 for int4_k2 (as its checkpoints hold them), f32 otherwise.
  static int64_t scale_bytes(WeightFormat f) { return f == WeightFormat::int4_k2 ? 2 : 4; }
};

// Quantizes the bf16 matrix w [rows, cols] into `f`'s layout (int8 or int4_awq; the math is in moe_sft.h,
// at moe_sft_quantize). `group_size` is that of int4_awq (ignored for int8). w must be finite.
void quantize(WeightFormat f, int64_t group_size, int64_t rows, int64_t cols, const bf16* w, void* weights,
              float* scale, uint8_t* zero);

}  // namespace moe_sft::kernels
