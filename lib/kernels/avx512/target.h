// The target region every AVX-512 kernel file compiles its kernels in: the instruction sets the avx512_bf16
// and avx512_fma families need (CpuFeatures::avx512_bf16_usable() checks the same list at run time).
//
//   #include "kernels/avx512/avx512.h"      // shared headers first, outside the region
//   MOE_SFT_AVX512_BEGIN
//   #include <immintrin.h>
//   #include "kernels/avx512/vector.h"
//   ... kernels ...
//   MOE_SFT_AVX512_END
//
// No std:: template is instantiated and no shared header with inline functions is included inside the
// region: a copy of such a function compiled for AVX-512 could be the one the linker keeps for code that
// runs on any CPU. Type-only templates (std::integer_sequence) are fine.
#pragma once
// Standard headers the region's code uses, included here, outside it (see above).
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__clang__)
// clang (the fuzz build) has no target pragma: the same list as an attribute on every function of the region.
// Its intrinsics carry their own target attributes, so they are declared here, outside the region.
#include <immintrin.h>
#define MOE_SFT_AVX512_BEGIN                                                                                   \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma\"))), \
          apply_to = function)")
#define MOE_SFT_AVX512_END _Pragma("clang attribute pop")
#else
#define MOE_SFT_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma\")")
#define MOE_SFT_AVX512_END _Pragma("GCC pop_options")
#endif
