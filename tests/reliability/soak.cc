// Soak. Part 1: CYCLES create/destroy cycles of a layer (every tenth also runs a saved forward that destroy
// drops): the resident set after the run must be within 2% of the one after the first tenth (warm-up).
// Part 2: SECONDS of random calls, valid and invalid (bad ids, top_k, qlen, NULL arrays, discard past the
// depth, backward with nothing saved), from 4 threads on 3 layers, each layer with an AdamW optimizer over
// its LoRA arrays stepped now and then. Every call's status and a hash of what it wrote are logged in the
// order the calls took each layer (the harness holds a per-layer lock around a call and its log entry, so
// that order is known; one layer driven by threads without such a lock is tests/reliability/stress). Then
// fresh layers and optimizers replay each log serially: every status and every hash must match. Under ASan
// the leak check at exit covers both parts.
//
// usage: soak [CYCLES [SECONDS]]   (defaults 10000 and 120; exit 0: all checks passed)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <unistd.h>
#include <vector>

#include "fixture.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define __SANITIZE_ADDRESS__ 1
#endif
#endif

using namespace reliability;

namespace {

double resident_mb() {
  long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr || std::fscanf(f, "%ld %ld", &pages, &resident) != 2) REQUIRE(false, "cannot read /proc/self/statm");
  std::fclose(f);
  return double(resident) * double(sysconf(_SC_PAGESIZE)) / (1 << 20);
}

void create_destroy(long cycles) {
  const Problem p(7, 4, 64, 64, 8, 16, 2);
  Outputs out(p);
  double warm = 0;
  const long warmup = std::max(1L, cycles / 10);
  for (long i = 0; i < cycles; ++i) {
    moe_sft_layer* layer = p.create(2);
    if (i % 10 == 0) REQUIRE(forward(layer, p, out, 1) == MOE_SFT_OK, "forward");
    moe_sft_destroy(layer);
    if (i + 1 == warmup) warm = resident_mb();
  }
  const double end = resident_mb(), drift = (end - warm) / warm;
  std::printf("create/destroy: %ld cycles, resident %.1f MB after %ld, %.1f MB at the end: drift %+.2f%%\n", cycles,
              warm, warmup, end, 100 * drift);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  std::printf("  (not checked: a sanitizer's quarantine and shadow memory are in the resident set)\n");
#else
  REQUIRE(drift <= 0.02 && drift >= -0.02, "resident set drifted by %.2f%% (limit 2%%)", 100 * drift);
#endif
}

// ---- part 2 ----

struct Call {
  int op;         // what to call (see execute)
  uint32_t seed;  // its inputs
};

struct Logged {
  Call call;
  moe_sft_status status;
  uint64_t hash;
};

uint64_t fnv(uint64_t h, const void* data, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) h = (h ^ static_cast<const uint8_t*>(data)[i]) * 1099511628211ull;
  return h;
}

// One layer with its own LoRA arrays, grad accumulators and optimizer; what the harness knows of its cache.
struct Subject {
  Problem problem;
  moe_sft_layer* layer = nullptr;
  moe_sft_adamw* opt = nullptr;
  std::vector<float> grads[6];
  std::vector<int32_t> saved_tokens;  // T of each saved forward, as the layer's cache holds them
  std::mutex lock;
  std::vector<Logged> log;

  explicit Subject(const Problem& p) : problem(p) {
    layer = problem.create(2);
    std::vector<moe_sft_adamw_param> params;
    for (int i = 0; i < 6; ++i) {
      grads[i].assign(problem.lora[i].size(), 0.0f);
      params.push_back({nullptr, MOE_SFT_DTYPE_F32, problem.lora[i].data(), int64_t(problem.lora[i].size())});
    }
    moe_sft_adamw_config cfg;
    moe_sft_adamw_config_init(&cfg);
    cfg.lr = 1e-3;
    cfg.max_grad_norm = 1.0;
    cfg.num_threads = 2;
    REQUIRE(moe_sft_adamw_create(&cfg, 6, params.data(), &opt) == MOE_SFT_OK, "adamw_create");
  }
  ~Subject() {
    moe_sft_destroy(layer);
    moe_sft_adamw_destroy(opt);
  }

  // Runs one call; returns its status and a hash of everything it wrote.
  Logged execute(const Call& c) {
    std::mt19937 rng(c.seed);
    Problem& p = problem;
    uint64_t h = 1469598103934665603ull;
    moe_sft_status st = MOE_SFT_OK;
    switch (c.op) {
      case 0:
      case 1:
      case 2: {  // forward, saving for op 0 and 1; a tenth of them invalid
        const int32_t T = int32_t(rng() % 24);
        p.set_tokens(T, c.seed);
        const int bad = rng() % 10 == 0 ? int(rng() % 4) : -1;
        if (bad == 0 && T > 0) p.ids[rng() % p.ids.size()] = p.E;  // an id past the experts
        std::vector<uint16_t> y(p.x.size() + 1, 0);
        st = moe_sft_forward(layer, bad == 1 ? -1 : T, bad == 2 ? 0 : p.k, p.ids.data(), p.weights.data(),
                             bad == 3 ? nullptr : p.x.data(), y.data(), c.op < 2);
        if (st == MOE_SFT_OK && c.op < 2) saved_tokens.push_back(T);
        h = fnv(h, y.data(), y.size() * 2);
        break;
      }
      case 3:
      case 4: {  // backward into the grad accumulators (accumulate), when anything is saved
        const int32_t T = saved_tokens.empty() ? 1 : saved_tokens.back();
        p.set_tokens(T, c.seed);
        std::vector<uint16_t> gx(size_t(T) * p.H + 1, 0);
        std::vector<float> grw(size_t(T) * p.k + 1, 0.0f);
        const moe_sft_lora_grads g = {grads[0].data(), grads[1].data(), grads[2].data(),
                                      grads[3].data(), grads[4].data(), grads[5].data()};
        st = moe_sft_backward(layer, p.grad_out.data(), gx.data(), grw.data(), &g, 1);
        if (st == MOE_SFT_OK) saved_tokens.pop_back();
        h = fnv(fnv(h, gx.data(), gx.size() * 2), grw.data(), grw.size() * 4);
        for (const auto& a : grads) h = fnv(h, a.data(), a.size() * 4);
        break;
      }
      case 5: {  // discard_saved, sometimes more than is saved
        const int32_t n = int32_t(rng() % 3);
        st = moe_sft_discard_saved(layer, n);
        if (st == MOE_SFT_OK) saved_tokens.resize(saved_tokens.size() - size_t(n));
        break;
      }
      case 6: {  // an optimizer step on the accumulated grads, then zero them
        const float* g[6] = {grads[0].data(), grads[1].data(), grads[2].data(),
                             grads[3].data(), grads[4].data(), grads[5].data()};
        moe_sft_adamw_report report{};
        report.struct_size = sizeof report;
        st = moe_sft_adamw_step(opt, g, &report);
        for (auto& a : grads) std::fill(a.begin(), a.end(), 0.0f);
        for (const auto& a : p.lora) h = fnv(h, a.data(), a.size() * 4);
        h = fnv(h, &report.step, sizeof report.step);
        break;
      }
      case 7: {  // rebind (the same arrays), or an invalid binding
        moe_sft_lora l = p.binding();
        if (rng() % 4 == 0) l.dtype = moe_sft_dtype(7);
        st = moe_sft_update_lora(layer, &l);
        break;
      }
    }
    return {c, st, h};
  }
};

void random_calls(double seconds) {
  std::vector<Problem> problems = {Problem(21, 4, 32, 48, 4, 8, 2), Problem(22, 3, 48, 32, 8, 8, 3),
                                   Problem(23, 6, 16, 16, 2, 8, 1, MOE_SFT_WEIGHT_INT8)};
  std::vector<std::unique_ptr<Subject>> subjects;
  for (const Problem& p : problems) subjects.push_back(std::make_unique<Subject>(p));
  const double start_mb = resident_mb();
  std::atomic<long> calls{0};
  const auto stop = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      while (std::chrono::steady_clock::now() < stop) {
        Subject& s = *subjects[rng() % subjects.size()];
        const Call c = {int(rng() % 8), uint32_t(rng())};
        std::lock_guard<std::mutex> lock(s.lock);
        s.log.push_back(s.execute(c));
        calls.fetch_add(1, std::memory_order_relaxed);
      }
    });
  for (auto& t : threads) t.join();
  const double end_mb = resident_mb();

  // Serial replay on fresh layers and optimizers.
  long ok = 0, errors = 0;
  for (size_t i = 0; i < problems.size(); ++i) {
    Subject fresh(problems[i]);
    for (const Logged& l : subjects[i]->log) {
      const Logged again = fresh.execute(l.call);
      REQUIRE(again.status == l.status && again.hash == l.hash, "layer %zu, op %d: %s / %s on replay", i, l.call.op,
              moe_sft_status_string(again.status), moe_sft_status_string(l.status));
      (l.status == MOE_SFT_OK ? ok : errors) += 1;
    }
  }
  std::printf("random calls: %ld in %.0f s from 4 threads on 3 layers (%ld ok, %ld errors), all equal to a serial "
              "replay; resident %.1f MB -> %.1f MB\n", calls.load(), seconds, ok, errors, start_mb, end_mb);
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  const long cycles = argc > 1 ? std::atol(argv[1]) : 10000;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 120;
  create_destroy(cycles);
  random_calls(seconds);
  return 0;
}
