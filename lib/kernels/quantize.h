// The pre-quantized layouts of the ABI (see moe_sft_weight_format in moe_sft.h) for one matrix W [rows, cols]
// (rows = output channels, cols = K), and quantization of bf16 into them. Create-time code: element by
// element, clear rather than fast (the packed copy the kernels read is made from these, once).
#pragma once
#include <cstdint>

#include "kernels/weight_format.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels {

// One matrix in a pre-quantized layout. A scale covers `block_rows` rows x `group` columns: group_size x 1
// for the int4 formats and mxfp4, the whole row (cols) x 1 for int8, fp8_e4m3_block's block (the last block
// of a row or column may be partial).
struct QuantizedSource {
  WeightFormat format;
  int64_t rows, cols, group;
  int64_t block_rows;    // 1 except for fp8_e4m3_block
  ScaleType scale_type;  // what `scale` holds
  const void* weights;   // int8 [rows, cols] | uint8 [rows, cols/2] | int32 [rows, cols/8] | uint8 [rows, cols]
  const void* scale;     // [scale_rows(), groups()] of scale_type: f32 [rows] for int8
  const uint8_t* zero;   // int4_awq: uint8 [rows, cols/group]; else null

  // A source of format f without data, for the sizes below. group_size: the int4 formats' and mxfp4's (32);
  // fp8_e4m3_block's block is block_rows x block_cols, its scales f32 or bf16 (scale_type).
  static QuantizedSource shape(WeightFormat f, int64_t rows, int64_t cols, int64_t group_size, int64_t block_rows,
                               int64_t block_cols, ScaleType fp8_scale_type);

  int64_t groups() const { return (cols + group - 1) / group; }
  int64_t scale_rows() const { return (rows + block_rows - 1) / block_rows; }
  int64_t scale_count() const { return scale_rows() * groups(); }
  int64_t weight_bytes() const { return rows * weight_row_bytes(format, cols); }
  // The stored code of element (r, c): int8 q, the int4 nibble (int4_k2 stores q + 8), the e4m3 byte or the
  // e2m1 nibble.
  int code(int64_t r, int64_t c) const;
  float scale_of(int64_t r, int64_t g) const;
  // The stored scale of (scale row sr, group g): its byte for e8m0 (for messages and the finite checks).
  float raw_scale(int64_t sr, int64_t g) const;
  // The code that means 0 for the integer formats: the AWQ zero point, 8 for int4_k2 (offset-coded), else 0.
  int zero_of(int64_t r, int64_t g) const;
  // W[r, c] in double (what the reference and the tests compare against): (code - zero) * scale for the
  // integer formats, the code's value * scale for the minifloat ones.
  double value(int64_t r, int64_t c) const;

  // Bytes per row of the weights.
  static int64_t weight_row_bytes(WeightFormat f, int64_t cols);
  // Bytes of one stored scale.
  static int64_t scale_bytes(ScaleType t) { return t == ScaleType::f32 ? 4 : t == ScaleType::bf16 ? 2 : 1; }
};

// Quantizes the bf16 matrix w [rows, cols] into `f`'s layout (int8 or int4_awq; the math is in moe_sft.h,
// at moe_sft_quantize). `group_size` is that of int4_awq (ignored for int8). w must be finite.
void quantize(WeightFormat f, int64_t group_size, int64_t rows, int64_t cols, const bf16* w, void* weights,
              float* scale, uint8_t* zero);
// Quantizes w [dst.rows, dst.cols] into dst's layout, fp8_e4m3_block or mxfp4 (the math is in moe_sft.h, at
// moe_sft_quantize_blocks); dst.weights and dst.scale are written. w must be finite.
void quantize_blocks(const bf16* w, const QuantizedSource& dst);

}  // namespace moe_sft::kernels
