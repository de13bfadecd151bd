// amx: the AMX kernel on the hardware tiles. Compiled for AMX through the target pragma; reached only when
// CPUID, XCR0 and the kernel's permission (arch_prctl) all say the tiles are usable.
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/amx/amx.h"
#include "kernels/amx/tile_ops.h"
#include "kernels/gemm.h"
#include "kernels/repack.h"
#include "runtime/bf16.h"
#include "runtime/cpu_features.h"

namespace moe_sft::kernels {

// Runs on every CPU during dispatch: defined before the AMX target region.
bool amx_native_usable(const char** why_not) {
  const CpuFeatures& f = cpu_features();
  if (!f.amx_tile || !f.amx_bf16) {
    *why_not = "this CPU has no AMX-BF16 (CPUID)";
    return false;
  }
  if (!f.os_amx) {
    *why_not = "the OS does not enable AMX tile state (XCR0)";
    return false;
  }
#if defined(__linux__)
  // Linux hands out AMX tile data state only on request, once per process (ARCH_REQ_XCOMP_PERM).
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  if (!permitted) {
    *why_not = "the kernel refused AMX tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return false;
  }
  return true;
#else
  *why_not = "AMX permission is only requested on Linux";
  return false;
#endif
}

}  // namespace moe_sft::kernels

// Everything defined below is compiled for AMX, including the kernel templates, so that the tile operations
// inline into them. Shared headers are included above, outside the region, so that no inline function of
// theirs gets an AMX-only copy the linker could hand to code that runs on any CPU.
#if defined(__clang__)  // no target pragma in clang: the list as an attribute on every function of the region
#include <immintrin.h>
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")
#include <immintrin.h>
#endif

#include "kernels/amx/amx_family.h"
#include "kernels/amx/gemm_amx.h"

namespace moe_sft::kernels {

namespace amx {

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

TileConfig our_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = kTileBytes;
    cfg.rows[t] = kTileRows;
  }
  return cfg;
}

}  // namespace

bool NativeTiles::ensure_configured() {
  // Our pool's threads configure once and keep it. The calling thread may also run other AMX code (torch,
  // oneDNN) between our calls, so the live configuration is compared and reloaded when it differs.
  static const TileConfig wanted = our_config();
  TileConfig live;
  _tile_storeconfig(&live);
  if (std::memcmp(&live, &wanted, sizeof live) != 0) _tile_loadconfig(&wanted);
  return true;
}

// GCC's tile intrinsics paste their tile operand into the instruction text, so each tile number needs a
// literal: one explicit specialization per tile the kernel uses (C tiles 0-3, A tile 4, B tile 5).
#define MOE_SFT_TILE_OPS(T)                                                               \
  template <>                                                                             \
  void NativeTiles::zero<T>() {                                                           \
    _tile_zero(T);                                                                        \
  }                                                                                       \
  template <>                                                                             \
  void NativeTiles::load<T>(const void* p, int64_t stride_bytes) {                        \
    _tile_loadd(T, p, stride_bytes);                                                      \
  }                                                                                       \
  template <>                                                                             \
  void NativeTiles::store<T>(void* p, int64_t stride_bytes) {                             \
    _tile_stored(T, p, stride_bytes);                                                     \
  }
MOE_SFT_TILE_OPS(0)
MOE_SFT_TILE_OPS(1)
MOE_SFT_TILE_OPS(2)
MOE_SFT_TILE_OPS(3)
MOE_SFT_TILE_OPS(4)
MOE_SFT_TILE_OPS(5)
#undef MOE_SFT_TILE_OPS

#define MOE_SFT_TILE_DOT(C)                 \
  template <>                               \
  void NativeTiles::dot_bf16<C, 4, 5>() {   \
    _tile_dpbf16ps(C, 4, 5);                \
  }
MOE_SFT_TILE_DOT(0)
MOE_SFT_TILE_DOT(1)
MOE_SFT_TILE_DOT(2)
MOE_SFT_TILE_DOT(3)
#undef MOE_SFT_TILE_DOT

}  // namespace amx

namespace {

void gemm_xwt_native(const GemmArgs& g) {
  amx::NativeTiles::ensure_configured();
  amx::Family<amx::NativeTiles>::gemm_xwt(g);
}
void gemm_xw_native(const GemmArgs& g) {
  amx::NativeTiles::ensure_configured();
  amx::Family<amx::NativeTiles>::gemm_xw(g);
}

}  // namespace

const KernelSet& amx_native_kernels() {
  static const KernelSet set = [] {
    KernelSet s = amx::Family<amx::NativeTiles>::make("amx");
    s.gemm_xwt = gemm_xwt_native;
    s.gemm_xw = gemm_xw_native;
    return s;
  }();
  return set;
}

}  // namespace moe_sft::kernels

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
