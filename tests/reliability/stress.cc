// Threads stress (built with -fsanitize=thread by .ci/steps/reliability.sh; any build runs it). At once:
// one thread per own layer looping forward(save) / backward / update_lora / discard_saved; two threads
// sharing one layer with the same loop (the header promises each call on a layer is atomic under the layer's
// lock, and LIFO pairing is the callers' business: both threads feed the same inputs, so whichever saved
// forward a backward consumes, its results are the serial ones); a thread rebinding the shared layer's
// adapters; a router thread; an AdamW thread. Every result is compared with a serial run made first.
//
// usage: stress [ITERATIONS]   (default 20 per thread; exit 0: no mismatch; TSan reports fail the run)
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "fixture.h"

using namespace reliability;

namespace {

std::atomic<int> failures{0};

#define EXPECT(cond, what)                                                           \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "stress: %s (%s)\n", what, moe_sft_last_error());         \
      failures.fetch_add(1);                                                         \
    }                                                                                \
  } while (0)

// One training-like loop on `layer` with the problem's inputs; results must equal `expected`.
void layer_loop(moe_sft_layer* layer, const Problem& p, const Outputs& expected, int iterations, bool shared) {
  Outputs got(p);
  const moe_sft_lora lora = p.binding();
  for (int i = 0; i < iterations; ++i) {
    got.fill();
    const moe_sft_status f = forward(layer, p, got, 1);
    // A shared layer's cache (max_cache_depth 2) can be full with the other thread's forwards.
    EXPECT(f == MOE_SFT_OK || (shared && f == MOE_SFT_ERR_CACHE_FULL), "forward status");
    if (f == MOE_SFT_OK) EXPECT(got.forward_equal(expected), "forward differs from the serial run");
    const moe_sft_status b = backward(layer, p, got);
    EXPECT(b == MOE_SFT_OK || (shared && b == MOE_SFT_ERR_CACHE_EMPTY), "backward status");
    if (b == MOE_SFT_OK)
      EXPECT(got.backward_equal(expected), shared ? "backward (shared layer) differs from the serial run"
                                                  : "backward (own layer) differs from the serial run");
    if (i % 3 == 0) EXPECT(moe_sft_update_lora(layer, &lora) == MOE_SFT_OK, "update_lora");
    if (i % 4 == 1) {  // an evaluation forward saved by mistake, then dropped
      if (forward(layer, p, got, 1) == MOE_SFT_OK) {
        const moe_sft_status d = moe_sft_discard_saved(layer, 1);
        EXPECT(d == MOE_SFT_OK || shared, "discard_saved");  // shared: the other thread may have consumed it
      }
    }
    if (!shared) EXPECT(depth_of(layer) == 0, "own layer's cache not empty after a step");
  }
}

void router_loop(int iterations) {
  const int64_t T = 33;
  const int32_t E = 16, k = 4;
  std::vector<float> logits(size_t(T * E)), rw(size_t(T * k)), rw0(rw.size()), grw(rw.size(), 0.25f);
  std::vector<float> gl(logits.size()), gl0(gl.size());
  std::vector<int64_t> ids(rw.size()), ids0(ids.size());
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(int(i * 37 % 23) - 11) / 4.0f;
  for (int i = 0; i <= iterations * 4; ++i) {
    EXPECT(moe_sft_route(T, E, k, MOE_SFT_DTYPE_F32, logits.data(), MOE_SFT_SCORING_SIGMOID, 1, nullptr, ids.data(),
                         rw.data()) == MOE_SFT_OK, "route");
    EXPECT(moe_sft_route_backward(T, E, k, MOE_SFT_DTYPE_F32, logits.data(), MOE_SFT_SCORING_SIGMOID, 1, ids.data(),
                                  grw.data(), gl.data()) == MOE_SFT_OK, "route_backward");
    if (i == 0) ids0 = ids, rw0 = rw, gl0 = gl;
    EXPECT(ids == ids0 && rw == rw0 && gl == gl0, "router results changed");
  }
}

// An optimizer stepped twice from a fixed start: the parameter after.
std::vector<float> adamw_run() {
  std::vector<float> p(4096, 0.5f), g(4096);
  for (size_t j = 0; j < g.size(); ++j) g[j] = float(int(j % 9) - 4) / 4.0f;
  moe_sft_adamw_config cfg;
  moe_sft_adamw_config_init(&cfg);
  cfg.num_threads = 2;
  cfg.lr = 0.01;
  const moe_sft_adamw_param param = {"p", MOE_SFT_DTYPE_F32, p.data(), int64_t(p.size())};
  moe_sft_adamw* opt = nullptr;
  EXPECT(moe_sft_adamw_create(&cfg, 1, &param, &opt) == MOE_SFT_OK, "adamw_create");
  const float* grads[1] = {g.data()};
  EXPECT(moe_sft_adamw_step(opt, grads, nullptr) == MOE_SFT_OK, "adamw_step");
  EXPECT(moe_sft_adamw_step(opt, grads, nullptr) == MOE_SFT_OK, "adamw_step");
  moe_sft_adamw_destroy(opt);
  return p;
}

void adamw_loop(int iterations, const std::vector<float>& expected) {
  for (int i = 0; i < iterations; ++i) EXPECT(adamw_run() == expected, "adamw differs from the serial run");
}

}  // namespace

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 20;
  std::vector<Problem> problems;
  for (uint32_t i = 0; i < 4; ++i) problems.emplace_back(10 + i, 3 + int32_t(i), 16 + 8 * int32_t(i), 32, 4, 6 + int32_t(i), 2);
  const Problem& shared_problem = problems[3];

  // Serial references, one thread at a time.
  std::vector<Outputs> expected;
  // Layer i runs on 1 + i % 2 threads and tp parts; its reference is serial with the same parts (tp parts
  // sum the LoRA grads in their own order).
  auto tp_of = [](size_t i) { return int32_t(1 + i % 2); };
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    moe_sft_layer* layer = p.create(1, tp_of(i));
    expected.emplace_back(p);
    REQUIRE(forward(layer, p, expected.back(), 1) == MOE_SFT_OK && backward(layer, p, expected.back()) == MOE_SFT_OK,
            "serial run");
    moe_sft_destroy(layer);
  }
  const std::vector<float> adamw_expected = adamw_run();

  std::vector<moe_sft_layer*> layers;
  for (size_t i = 0; i < problems.size(); ++i) layers.push_back(problems[i].create(tp_of(i), tp_of(i)));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < 3; ++i)
    threads.emplace_back(layer_loop, layers[i], std::cref(problems[i]), std::cref(expected[i]), iterations, false);
  for (int i = 0; i < 2; ++i)
    threads.emplace_back(layer_loop, layers[3], std::cref(shared_problem), std::cref(expected[3]), iterations, true);
  threads.emplace_back([&] {  // rebinds the shared layer's adapters (the same arrays) while it runs
    const moe_sft_lora lora = shared_problem.binding();
    for (int i = 0; i < iterations * 4; ++i) {
      EXPECT(moe_sft_update_lora(layers[3], &lora) == MOE_SFT_OK, "update_lora (shared)");
      int32_t depth = 0;
      EXPECT(moe_sft_cache_depth(layers[3], &depth) == MOE_SFT_OK && depth >= 0 && depth <= 2, "cache_depth");
      std::this_thread::yield();
    }
  });
  threads.emplace_back(router_loop, iterations);
  threads.emplace_back(adamw_loop, iterations / 2 + 1, std::cref(adamw_expected));
  for (auto& t : threads) t.join();
  // Drop what the shared loops left saved (each thread's last backward may have found the cache empty).
  EXPECT(moe_sft_discard_saved(layers[3], depth_of(layers[3])) == MOE_SFT_OK, "final discard");
  for (moe_sft_layer* l : layers) moe_sft_destroy(l);
  std::printf("stress: %zu threads x %d iterations, %d mismatches\n", threads.size(), iterations, failures.load());
  return failures.load() == 0 ? 0 : 1;
}
