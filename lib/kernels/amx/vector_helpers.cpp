// The vector kernels both AMX families borrow (amx_family.h), picked once from the CPU: the AVX-512 ones
// wherever they run (every AMX CPU has AVX-512 BF16), the portable ones otherwise (amx-emulated on any CPU).
#include "kernels/amx/amx_family.h"
#include "kernels/avx512/avx512.h"
#include "kernels/generic/generic.h"
#include "runtime/cpu_features.h"

namespace moe_sft::kernels::amx {

const VectorHelpers& vector_helpers() {
  static const VectorHelpers helpers = [] {
    const CpuFeatures& f = cpu_features();
    if (f.avx512_bf16_usable())
      return VectorHelpers{avx512::repack_transposed, avx512::silu_mul_row, avx512::silu_mul_backward_row,
                           avx512::low_rank_kernels(), avx512::dequantize,
                           {avx512::gemm_xw_few_rows, avx512::kXwFewRows, avx512::xw_few_rows_scratch_elems},
                           {avx512::gemm_xwt_quantized_few_rows, avx512::kXwtQuantizedFewRows, nullptr}};
    return VectorHelpers{repack_transposed_scalar, silu_mul_row_generic, silu_mul_backward_row_generic,
                         portable_low_rank(), dequantize_scalar, {}, {}};
  }();
  return helpers;
}

}  // namespace moe_sft::kernels::amx
