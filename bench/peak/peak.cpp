// Machine peaks the benchmarks are judged against, measured here rather than taken from a data sheet:
//   bf16_gflops  VDPBF16PS throughput on T threads (24 independent zmm accumulators per thread, so
//                neither latency nor loads limit it): 64 flops per instruction
//   read_gbs     memory read bandwidth on T threads (AVX-512 loads, or AVX2 where the CPU has no AVX-512,
//                over a buffer far larger than L3)
// Prints one JSON object. `peak T read` measures the bandwidth only, so it also runs on CPUs without
// AVX-512 BF16 (the AdamW bench row streams memory and needs nothing else). The ISA-specific functions carry
// their own target attributes, so nothing else in the program uses an instruction the CPU may lack.
// Build: c++ -O2 -pthread peak.cpp -o peak
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Runs fn(thread) on `threads` threads started together; returns the wall time of the slowest.
template <class Fn>
double timed_parallel(int threads, Fn fn) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  double start = 0;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) {
      }
      fn(t);
    });
  while (ready.load() != threads) {
  }
  start = now();
  go.store(true);
  for (auto& th : pool) th.join();
  return now() - start;
}

__attribute__((target("avx512f,avx512bf16"))) float bf16_loop(long iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x00010001);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(acc[0]), "+v"(acc[1]), "+v"(acc[2]), "+v"(acc[3]));
  }
  __m512 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

double peak_bf16(int threads) {
  const long iters = 20000000;
  std::vector<float> sink(threads);
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep)
    best = std::min(best, timed_parallel(threads, [&](int t) { sink[t] = bf16_loop(iters); }));
  return double(threads) * iters * 24 * 64 / best / 1e9;
}

__attribute__((target("avx512f"))) float read_avx512(const char* buf, size_t bytes) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const float* p = reinterpret_cast<const float*>(buf);
  for (size_t i = 0; i < bytes / 4; i += 64) {
    acc0 = _mm512_add_ps(acc0, _mm512_load_ps(p + i));
    acc1 = _mm512_add_ps(acc1, _mm512_load_ps(p + i + 16));
    acc2 = _mm512_add_ps(acc2, _mm512_load_ps(p + i + 32));
    acc3 = _mm512_add_ps(acc3, _mm512_load_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

__attribute__((target("avx2"))) float read_avx2(const char* buf, size_t bytes) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  const float* p = reinterpret_cast<const float*>(buf);
  for (size_t i = 0; i < bytes / 4; i += 32) {
    acc0 = _mm256_add_ps(acc0, _mm256_load_ps(p + i));
    acc1 = _mm256_add_ps(acc1, _mm256_load_ps(p + i + 8));
    acc2 = _mm256_add_ps(acc2, _mm256_load_ps(p + i + 16));
    acc3 = _mm256_add_ps(acc3, _mm256_load_ps(p + i + 24));
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
}

double read_bandwidth(int threads) {
  const size_t per_thread = size_t(512) << 20;  // 512 MiB each: far beyond any cache
  float (*read)(const char*, size_t) = __builtin_cpu_supports("avx512f") ? read_avx512 : read_avx2;
  std::vector<char*> bufs(threads);
  std::vector<float> sink(threads);
  timed_parallel(threads, [&](int t) {  // first touch on the thread that reads it
    bufs[t] = static_cast<char*>(std::aligned_alloc(64, per_thread));
    for (size_t i = 0; i < per_thread; i += 4096) bufs[t][i] = 1;
  });
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep)
    best = std::min(best, timed_parallel(threads, [&](int t) { sink[t] = read(bufs[t], per_thread); }));
  for (char* b : bufs) std::free(b);
  return double(threads) * per_thread / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = argc > 1 ? std::atoi(argv[1]) : int(std::thread::hardware_concurrency());
  if (threads < 1) threads = 1;
  __builtin_cpu_init();
  if (argc > 2 && std::strcmp(argv[2], "read") == 0) {
    std::printf("{\"threads\": %d, \"read_gbs\": %.1f}\n", threads, read_bandwidth(threads));
    return 0;
  }
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::fprintf(stderr, "peak: this CPU has no AVX-512 BF16 (run `peak %d read` for the read bandwidth)\n", threads);
    return 1;
  }
  std::printf("{\"threads\": %d, \"bf16_gflops\": %.1f, \"read_gbs\": %.1f}\n", threads, peak_bf16(threads),
              read_bandwidth(threads));
  return 0;
}
