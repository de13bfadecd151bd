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

#define MOE_SFT_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma\")")
#define MOE_SFT_AVX512_END _Pragma("GCC pop_options")
