// C ABI entry point of the weight formats: quantizing a bf16 matrix into a pre-quantized layout (the same
// code moe_sft_create runs from bf16). Everything is checked before the first write.
#include <climits>
#include <string>

#include "api/status.h"
#include "api/validate.h"
#include "kernels/quantize.h"
#include "kernels/weight_format.h"
#include "checks/finite_check.h"
#include "moe_sft.h"

using moe_sft::api::guard;
using moe_sft::api::invalid;
using moe_sft::api::require_array;
using moe_sft::api::require_range;
using moe_sft::kernels::QuantizedSource;
using moe_sft::kernels::ScaleType;
using moe_sft::kernels::WeightFormat;

namespace {

// rows x cols within the library's limits, and w finite: what every quantizer checks first.
const moe_sft::bf16* checked_input(int64_t rows, int64_t cols, const uint16_t* w) {
  require_range(rows, 0, int64_t(1) << 40, "rows");
  require_range(cols, 1, int64_t(1) << 40, "cols");
  if (rows > moe_sft::api::kMaxElements / cols) invalid("rows * cols is too large (more than 2^50 elements)");
  require_array(w, "w", rows * cols, 2);
  return moe_sft::as_bf16(w);
}

void check_input_finite(const moe_sft::bf16* w, int64_t rows, int64_t cols) {
  moe_sft::checks::check_expert_array(w, 1, rows, cols, "w", moe_sft::checks::Stage{1, 1, "quantize input"});
}

}  // namespace

extern "C" {

moe_sft_status moe_sft_quantize(moe_sft_weight_format weight_format, int32_t group_size, int64_t rows, int64_t cols,
                                const uint16_t* w, void* weights, float* scale, uint8_t* zero) {
  return guard("moe_sft_quantize", [&] {
    const auto f = WeightFormat(moe_sft::api::enum_value(weight_format));
    const char* name = moe_sft::kernels::weight_format_name(f);
    if (name == nullptr)
      invalid("weight_format = " + std::to_string(moe_sft::api::enum_value(weight_format)) +
              " is not a moe_sft_weight_format (0 bf16, 1 int8, 2 int4_awq, 3 int4_k2, 4 fp8_e4m3_block, 5 mxfp4)");
    if (f == WeightFormat::bf16) invalid("weight_format = bf16 is not a quantized format");
    if (moe_sft::kernels::is_minifloat(f))
      invalid(std::string("weight_format = ") + name + " has scale blocks: use moe_sft_quantize_blocks");
    if (f == WeightFormat::int4_k2)
      throw moe_sft::Error(MOE_SFT_ERR_UNSUPPORTED,
                           "weight_format = int4_k2 cannot be made from bf16: K2 checkpoints come quantized "
                           "(weight_packed, weight_scale); int4_awq quantizes from bf16");
    const moe_sft::bf16* src = checked_input(rows, cols, w);
    int64_t groups = 1;
    if (f == WeightFormat::int8) {
      if (group_size != 0)
        invalid("group_size = " + std::to_string(group_size) + " must be 0 with int8 (one scale per row)");
    } else {
      if (group_size <= 0 || group_size % 2 != 0 || cols % group_size != 0)
        invalid("group_size = " + std::to_string(group_size) + " must be a positive even divisor of cols = " +
                std::to_string(cols) + " with int4_awq");
      groups = cols / group_size;
    }
    require_array(weights, "weights", rows * QuantizedSource::weight_row_bytes(f, cols), 1);
    require_array(scale, "scale", rows * groups, 4);
    if (f == WeightFormat::int4_awq) require_array(zero, "zero", rows * groups, 1);
    else if (zero != nullptr) invalid("zero is set, but int8 is symmetric: pass NULL");
    check_input_finite(src, rows, cols);
    moe_sft::kernels::quantize(f, group_size, rows, cols, src, weights, scale, zero);
  });
}

moe_sft_status moe_sft_quantize_blocks(moe_sft_weight_format weight_format, int32_t block_rows, int32_t block_cols,
                                       moe_sft_dtype scale_dtype, int64_t rows, int64_t cols, const uint16_t* w,
                                       uint8_t* weights, void* scale) {
  return guard("moe_sft_quantize_blocks", [&] {
    const auto f = WeightFormat(moe_sft::api::enum_value(weight_format));
    if (!moe_sft::kernels::is_minifloat(f))
      invalid("weight_format = " + std::to_string(moe_sft::api::enum_value(weight_format)) +
              " is not a block-scaled format (4 fp8_e4m3_block, 5 mxfp4; the others: moe_sft_quantize)");
    const moe_sft::bf16* src = checked_input(rows, cols, w);
    ScaleType scale_type = ScaleType::e8m0;
    if (f == WeightFormat::mxfp4) {
      if (block_rows != 1 || block_cols != 32)
        invalid("block_rows x block_cols = " + std::to_string(block_rows) + " x " + std::to_string(block_cols) +
                " with mxfp4: its scales cover 1 x 32");
      if (cols % 32 != 0) invalid("cols = " + std::to_string(cols) + " is not a multiple of 32 (mxfp4's groups)");
    } else {
      require_range(block_rows, 1, INT32_MAX, "block_rows");
      require_range(block_cols, 1, INT32_MAX, "block_cols");
      if (block_cols % 2 != 0)
        invalid("block_cols = " + std::to_string(block_cols) +
                " is odd: the packed layout keeps pairs of K under one scale");
      const int64_t dtype = moe_sft::api::enum_value(scale_dtype);
      if (dtype != MOE_SFT_DTYPE_F32 && dtype != MOE_SFT_DTYPE_BF16)
        invalid("scale_dtype = " + std::to_string(dtype) + " is not a moe_sft_dtype (0 bf16, 1 f32)");
      scale_type = dtype == MOE_SFT_DTYPE_BF16 ? ScaleType::bf16 : ScaleType::f32;
    }
    QuantizedSource dst = QuantizedSource::shape(f, rows, cols, 32, block_rows, block_cols, scale_type);
    require_array(weights, "weights", dst.weight_bytes(), 1);
    require_array(scale, "scale", dst.scale_count(), QuantizedSource::scale_bytes(dst.scale_type));
    check_input_finite(src, rows, cols);
    dst.weights = weights;
    dst.scale = scale;
    moe_sft::kernels::quantize_blocks(src, dst);
  });
}

}  // extern "C"
