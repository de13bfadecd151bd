// Which way of forming bf16 products this core runs faster (avx512.h): independent VDPBF16PS chains against
// as many 512-bit FMA chains, timed once per process. The gap it looks for is wide: some cores issue
// VDPBF16PS at their FMA rate, others at a quarter of it or less, so the answer does not hinge on timing
// noise. Each side is timed best-of-several, so a preemption cannot decide it. README's kernel section has
// the rates measured on real machines.
#include <chrono>
#include <cstdint>

#include "kernels/avx512/avx512.h"
#include "kernels/avx512/target.h"

// The two loops are compiled for AVX-512 BF16; the timing around them (std::chrono templates) is not.
MOE_SFT_AVX512_BEGIN
#include <immintrin.h>

namespace moe_sft::kernels {

namespace {

constexpr int kChains = 12;  // independent accumulators: enough to cover either instruction's latency

// kChains independent chains of `step`, `iterations` long; returns their sum so none can be dropped.
template <class Step>
__attribute__((always_inline)) inline float chains(int64_t iterations, Step step) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
  for (int64_t k = 0; k < iterations; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = step(acc[i]);
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}

__attribute__((noinline)) float dpbf16_chains(int64_t iterations) {
  const __m512bh one = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // bf16 pair (1, 1)
  return chains(iterations, [one](__m512 acc) { return _mm512_dpbf16_ps(acc, one, one); });
}

__attribute__((noinline)) float fma_chains(int64_t iterations) {
  const __m512 scale = _mm512_set1_ps(0.999f), bias = _mm512_set1_ps(1.0f);
  return chains(iterations, [scale, bias](__m512 acc) { return _mm512_fmadd_ps(acc, scale, bias); });
}

}  // namespace

}  // namespace moe_sft::kernels

MOE_SFT_AVX512_END

namespace moe_sft::kernels {

namespace {

// Best of several runs, in seconds.
double best_time(float (*chains)(int64_t), int64_t iterations) {
  double best = 1e30;
  volatile float sink = 0.0f;
  for (int trial = 0; trial < 7; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    sink = sink + chains(iterations);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t < best) best = t;
  }
  return best;
}

}  // namespace

bool vdpbf16ps_is_slow() {
  static const bool slow = [] {
    constexpr int64_t kIterations = 2000;  // 24k instructions a run: short, yet far above the timer's resolution
    best_time(fma_chains, kIterations);  // warm-up: wakes the 512-bit units and the clock
    const double dpbf16 = best_time(dpbf16_chains, kIterations), fma = best_time(fma_chains, kIterations);
    return dpbf16 > 2.0 * fma;
  }();
  return slow;
}

}  // namespace moe_sft::kernels
