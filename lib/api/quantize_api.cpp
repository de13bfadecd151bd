// C ABI entry point of the weight formats: quantizing a bf16 matrix into a pre-quantized layout (the same
// code moe_sft_create runs from bf16). Everything is checked before the first write.
#include <string>

#include "api/status.h"
#include "api/validate.h"
#include "kernels/quantize.h"
#include "checks/finite_check.h"
#include "moe_sft.h"

using moe_sft::api::guard;
using moe_sft::api::invalid;
using moe_sft::api::require_array;
using moe_sft::api::require_range;
using moe_sft::kernels::WeightFormat;

extern "C" {

moe_sft_status moe_sft_quantize(moe_sft_weight_format weight_format, int32_t group_size, int64_t rows, int64_t cols,
                                const uint16_t* w, void* weights, float* scale, uint8_t* zero) {
  return guard("moe_sft_quantize", [&] {
    const auto f = WeightFormat(moe_sft::api::enum_value(weight_format));
    const char* name = moe_sft::kernels::weight_format_name(f);
    if (name == nullptr)
      invalid("weight_format = " + std::to_string(moe_sft::api::enum_value(weight_format)) +
              " is not a moe_sft_weight_format (0 bf16, 1 int8, 2 int4_awq, 3 int4_k2)");
    if (f == WeightFormat::bf16) invalid("weight_format = bf16 is not a quantized format");
    if (f == WeightFormat::int4_k2)
      throw moe_sft::Error(MOE_SFT_ERR_UNSUPPORTED,
                           "weight_format = int4_k2 cannot be made from bf16: K2 checkpoints come quantized "
                           "(weight_packed, weight_scale); int4_awq quantizes from bf16");
    require_range(rows, 0, int64_t(1) << 40, "rows");
    require_range(cols, 1, int64_t(1) << 40, "cols");
    if (rows > moe_sft::api::kMaxElements / cols) invalid("rows * cols is too large (more than 2^50 elements)");
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
    require_array(w, "w", rows * cols, 2);
    require_array(weights, "weights", rows * moe_sft::kernels::QuantizedSource::weight_row_bytes(f, cols), 1);
    require_array(scale, "scale", rows * groups, 4);
    if (f == WeightFormat::int4_awq) require_array(zero, "zero", rows * groups, 1);
    else if (zero != nullptr) invalid("zero is set, but int8 is symmetric: pass NULL");
    const moe_sft::bf16* src = moe_sft::as_bf16(w);
    moe_sft::checks::check_expert_array(src, 1, rows, cols, "w", moe_sft::checks::Stage{1, 1, "quantize input"});
    moe_sft::kernels::quantize(f, group_size, rows, cols, src, weights, scale, zero);
  });
}

}  // extern "C"
