#include "runtime/bf16_arrays.h"

#include <cstring>

namespace moe_sft {

namespace {

template <int Dummy>
inline __attribute__((always_inline)) void from_f32_loop(const float* __restrict src, uint16_t* __restrict dst,
                                                         int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    dst[i] = bf16_bits_rne(u);
  }
}

template <int Dummy>
inline __attribute__((always_inline)) void to_f32_loop(const uint16_t* __restrict src, float* __restrict dst,
                                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

__attribute__((target("avx2"))) void from_f32_avx2(const float* src, uint16_t* dst, int64_t n) {
  from_f32_loop<0>(src, dst, n);
}
__attribute__((target("avx2"))) void to_f32_avx2(const uint16_t* src, float* dst, int64_t n) {
  to_f32_loop<0>(src, dst, n);
}
void from_f32_generic(const float* src, uint16_t* dst, int64_t n) { from_f32_loop<0>(src, dst, n); }
void to_f32_generic(const uint16_t* src, float* dst, int64_t n) { to_f32_loop<0>(src, dst, n); }

}  // namespace

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;  // libgcc also checks that the OS saves the YMM state
  }();
  return has;
}

void bf16_from_f32_array(const float* src, uint16_t* dst, int64_t n) {
  (cpu_has_avx2() ? from_f32_avx2 : from_f32_generic)(src, dst, n);
}

void bf16_to_f32_array(const uint16_t* src, float* dst, int64_t n) {
  (cpu_has_avx2() ? to_f32_avx2 : to_f32_generic)(src, dst, n);
}

}  // namespace moe_sft
