// The portable re-pairing (repack.h), one element at a time.
#include "kernels/generic/generic.h"
#include "runtime/assert.h"

namespace moe_sft::kernels {

void repack_transposed_scalar(const PackedMatrix& w, int64_t c0, int64_t width, bf16* out) {
  constexpr int64_t P = PackedMatrix::kPanelRows;
  MOE_SFT_ASSERT(repack_block_ok(w, c0, width));
  const int64_t stride = repacked_panel_stride(w);
  for (int64_t q = 0; q * P < width; ++q)
    for (int64_t r = 0; r < w.padded_rows(); ++r)
      for (int64_t c = 0; c < P; ++c)
        out[q * stride + (r / 2) * 2 * P + c * 2 + r % 2] = w.at(r, c0 + q * P + c);
}

}  // namespace moe_sft::kernels
