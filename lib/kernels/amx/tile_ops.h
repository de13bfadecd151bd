// The tile interface the AMX kernel is written against. Two implementations share the kernel:
//   NativeTiles    the AMX instructions (LDTILECFG, TILELOADD, TILESTORED, TILEZERO, TDPBF16PS)
//   EmulatedTiles  the same operations in portable C++ on thread-local tile registers, so the AMX kernel's
//                  packing, blocking and tails are exercised on any machine (MOE_SFT_ISA=amx-emulated)
//
// Every tile is configured as 16 rows x 64 bytes (palette 1): A tiles 16 x 32 bf16, B tiles 16 pair-rows x
// 16 columns x 2 bf16, C tiles 16 x 16 f32. Tile indices are template parameters because the native
// instructions take them as immediates.
#pragma once
#include <cstdint>

namespace moe_sft::kernels::amx {

constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;

struct NativeTiles {
  static bool ensure_configured();  // once per thread; false if the OS refused tile state
  template <int T> static void zero();
  template <int T> static void load(const void* p, int64_t stride_bytes);
  template <int T> static void store(void* p, int64_t stride_bytes);
  template <int C, int A, int B> static void dot_bf16();  // C[m][n] += sum_k A[m][k] * B[k/2][n][k%2]
};

struct EmulatedTiles {
  static bool ensure_configured() { return true; }
  template <int T> static void zero();
  template <int T> static void load(const void* p, int64_t stride_bytes);
  template <int T> static void store(void* p, int64_t stride_bytes);
  template <int C, int A, int B> static void dot_bf16();
};

}  // namespace moe_sft::kernels::amx
