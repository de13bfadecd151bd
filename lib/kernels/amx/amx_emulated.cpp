// amx-emulated: the AMX kernel on software tiles (a test vehicle: runs anywhere, never picked by itself).
#include "kernels/amx/amx.h"
#include "kernels/amx/amx_family.h"
#include "kernels/amx/tiles_emulated.h"
#include "kernels/avx512_bf16/avx512_bf16.h"
#include "kernels/generic/generic.h"
#include "runtime/cpu_features.h"

namespace moe_sft::kernels {

namespace amx {
const VectorHelpers& vector_helpers() {
  static const VectorHelpers helpers = [] {
    const CpuFeatures& f = cpu_features();
    if (f.avx512_bf16_usable())
      return VectorHelpers{repack_transposed_avx512, avx512::silu_mul_row, avx512::silu_mul_backward_row,
                           avx512_bf16_kernels().low_rank, dequantize_avx512,
                           avx512::gemm_xwt_quantized_few_rows, avx512::gemm_xw_few_rows};
    return VectorHelpers{repack_transposed_scalar, silu_mul_row_generic, silu_mul_backward_row_generic,
                         portable_low_rank(), dequantize_scalar, nullptr, nullptr};
  }();
  return helpers;
}
}  // namespace amx

const KernelSet& amx_emulated_kernels() {
  static const KernelSet set = amx::Family<amx::EmulatedTiles>::make("amx-emulated");
  return set;
}

}  // namespace moe_sft::kernels
