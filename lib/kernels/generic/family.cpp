// The generic KernelSet.
#include "kernels/generic/generic.h"

namespace moe_sft::kernels {

const KernelSet& generic_kernels() {
  // One kernel per direction for every row count; d·W reads W in place (no scratch).
  static const KernelSet set = [] {
    KernelSet s{};
    s.name = "generic";
    s.gemm_xwt = gemm_xwt_generic;
    s.gemm_xw = gemm_xw_generic;
    s.xw_repairs = false;
    s.silu_mul_row = silu_mul_row_generic;
    s.silu_mul_backward_row = silu_mul_backward_row_generic;
    s.low_rank = portable_low_rank();
    s.dequantize = dequantize_scalar;
    return s;
  }();
  return set;
}

}  // namespace moe_sft::kernels
