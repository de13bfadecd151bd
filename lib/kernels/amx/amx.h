// The AMX families: native tiles and their software emulation (same kernel code, see tile_ops.h).
#pragma once
#include "kernels/gemm.h"

namespace moe_sft::kernels {

// Whether the native family can run here; if not, *why_not says what is missing.
bool amx_native_usable(const char** why_not);
const KernelSet& amx_native_kernels();
const KernelSet& amx_emulated_kernels();

}  // namespace moe_sft::kernels
