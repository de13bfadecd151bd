// The portable dequantization (dequantize.h), one element at a time.
#include "kernels/generic/generic.h"
#include "runtime/assert.h"

namespace moe_sft::kernels {

void dequantize_scalar(const PackedMatrix& w, int64_t panel0, int64_t panels, int64_t pair0, int64_t pairs, bf16* out,
                       int64_t out_stride) {
  constexpr int64_t P = PackedMatrix::kPanelRows;
  MOE_SFT_ASSERT(dequantize_block_ok(w, panel0, panels, pair0, pairs));
  for (int64_t p = panel0; p < panel0 + panels; ++p)
    for (int64_t kp = pair0; kp < pair0 + pairs; ++kp)
      for (int64_t lane = 0; lane < 2 * P; ++lane)
        out[(p - panel0) * out_stride + (kp - pair0) * 2 * P + lane] =
            to_bf16(w.value(p * P + lane / 2, 2 * kp + lane % 2));
}

}  // namespace moe_sft::kernels
