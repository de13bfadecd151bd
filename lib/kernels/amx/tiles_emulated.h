// Software tile registers with AMX semantics: what TDPBF16PS computes, in the order it computes it
// (for each pair k: C += A[m][2k] * B[k][2n], then C += A[m][2k+1] * B[k][2n+1], products exact in f32).
// Denormal flushing of the hardware is not modelled.
#pragma once
#include <cstring>

#include "kernels/amx/tile_ops.h"
#include "runtime/bf16.h"

namespace moe_sft::kernels::amx {

namespace emulated {
struct alignas(64) Tile {
  unsigned char bytes[kTileRows][kTileBytes];
};
inline Tile* registers() {
  thread_local Tile tiles[8];
  return tiles;
}
}  // namespace emulated

template <int T>
void EmulatedTiles::zero() {
  std::memset(&emulated::registers()[T], 0, sizeof(emulated::Tile));
}

template <int T>
void EmulatedTiles::load(const void* p, int64_t stride_bytes) {
  const unsigned char* src = static_cast<const unsigned char*>(p);
  for (int r = 0; r < kTileRows; ++r) std::memcpy(emulated::registers()[T].bytes[r], src + r * stride_bytes, kTileBytes);
}

template <int T>
void EmulatedTiles::store(void* p, int64_t stride_bytes) {
  unsigned char* dst = static_cast<unsigned char*>(p);
  for (int r = 0; r < kTileRows; ++r) std::memcpy(dst + r * stride_bytes, emulated::registers()[T].bytes[r], kTileBytes);
}

template <int C, int A, int B>
void EmulatedTiles::dot_bf16() {
  emulated::Tile* t = emulated::registers();
  float c[kTileRows][16];
  bf16 a[kTileRows][32], b[kTileRows][32];
  std::memcpy(c, t[C].bytes, sizeof c);
  std::memcpy(a, t[A].bytes, sizeof a);
  std::memcpy(b, t[B].bytes, sizeof b);
  for (int m = 0; m < kTileRows; ++m)
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 16; ++n) {
        c[m][n] += to_float(a[m][2 * k]) * to_float(b[k][2 * n]);
        c[m][n] += to_float(a[m][2 * k + 1]) * to_float(b[k][2 * n + 1]);
      }
  std::memcpy(t[C].bytes, c, sizeof c);
}

}  // namespace moe_sft::kernels::amx
