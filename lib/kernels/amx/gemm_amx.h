// The AMX panel GEMM, written once against a tile interface (tile_ops.h) and instantiated for the native
// instructions and for their software emulation. Same contract as avx512::panel_gemm:
//
//   C[m, 0:width] (=|+=) A[m, 0:K] · B,   B as panels of 16 columns in the packed pair layout
//
// Blocking: 16 rows x up to 4 panels: C tiles 0-3, A tile 4, B tile 5. For each 32-wide K step, one A tile
// and one B tile per panel. A row blocks that are short (m tail) or a K step that runs past K (k tail) are
// staged through a zero-padded buffer, so no tile load ever reads outside the caller's arrays. C tiles are
// stored to a staging block and then added to / copied into C, so tails of m and width cost nothing special.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/amx/tile_ops.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels::amx {

template <class Tiles>
struct PanelGemm {
  static constexpr int kPanels = 4;
  static constexpr int64_t kK = 32;  // bf16 per A tile row = pairs per B tile x 2

  template <int C>
  static void panel_step(const bf16* b, int64_t panel_stride, int64_t kp) {
    Tiles::template load<5>(b + C * panel_stride + kp * 32, kTileBytes);
    Tiles::template dot_bf16<C, 4, 5>();
  }

  template <int C>
  static void flush(int panels, float (*staged)[16]) {
    if (C < panels) Tiles::template store<C>(staged[C * kTileRows], 16 * sizeof(float));
  }

  static void run(const bf16* a, int64_t lda, int64_t m, int64_t k, const bf16* b, int64_t panel_stride, int64_t width,
                  float* c, int64_t ldc, bool accumulate) {
    alignas(64) bf16 a_stage[kTileRows][kK];
    alignas(64) float staged[kPanels * kTileRows][16];
    for (int64_t n0 = 0; n0 < width; n0 += 16 * kPanels) {
      const int64_t cols = width - n0 < 16 * kPanels ? width - n0 : 16 * kPanels;
      const int panels = int((cols + 15) / 16);
      const bf16* bp = b + (n0 / 16) * panel_stride;
      for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
        const int64_t rows = m - m0 < kTileRows ? m - m0 : kTileRows;
        Tiles::template zero<0>();
        Tiles::template zero<1>();
        Tiles::template zero<2>();
        Tiles::template zero<3>();
        for (int64_t k0 = 0; k0 < k; k0 += kK) {
          const int64_t kw = k - k0 < kK ? k - k0 : kK;
          if (rows == kTileRows && kw == kK) {
            Tiles::template load<4>(a + m0 * lda + k0, lda * int64_t(sizeof(bf16)));
          } else {
            std::memset(a_stage, 0, sizeof a_stage);
            for (int64_t r = 0; r < rows; ++r) std::memcpy(a_stage[r], a + (m0 + r) * lda + k0, size_t(kw) * sizeof(bf16));
            Tiles::template load<4>(a_stage, kK * int64_t(sizeof(bf16)));
          }
          const int64_t kp = k0 / 2;
          panel_step<0>(bp, panel_stride, kp);  // panels past `width` read the zero padding of B: harmless
          if (panels > 1) panel_step<1>(bp, panel_stride, kp);
          if (panels > 2) panel_step<2>(bp, panel_stride, kp);
          if (panels > 3) panel_step<3>(bp, panel_stride, kp);
        }
        flush<0>(panels, staged);
        flush<1>(panels, staged);
        flush<2>(panels, staged);
        flush<3>(panels, staged);
        for (int64_t r = 0; r < rows; ++r) {
          float* crow = c + (m0 + r) * ldc + n0;
          for (int64_t j = 0; j < cols; ++j) {
            const float v = staged[(j / 16) * kTileRows + r][j % 16];
            crow[j] = accumulate ? crow[j] + v : v;
          }
        }
      }
    }
    if (m > 0 && k == 0)  // no K step ran: the product is zero
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < width; ++j)
          if (!accumulate) c[r * ldc + j] = 0.0f;
  }
};

}  // namespace moe_sft::kernels::amx
