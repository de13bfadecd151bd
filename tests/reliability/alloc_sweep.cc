// Allocation failure at every site (needs a MOE_SFT_FAULT_INJECTION build; run under ASan, whose leak check
// covers every path). For each call below and every N, the N-th allocation the library makes during the
// call fails; the sweep stops at the first N the call no longer reaches. Every failure must end in
// MOE_SFT_ERR_OUT_OF_MEMORY with a message, with no output byte written (canaries) and the state as before
// (cache depth, optimizer parameters, moments and step count), and the same object must then give exactly
// the results of an object never faulted. Prints the number of sites per call and in total.
//
// usage: alloc_sweep   (exit 0: every site passed)
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "fixture.h"
#include "runtime/fault_injection.h"

using namespace reliability;

namespace {

int total_sites = 0;

// For N = 1, 2, ...: before() prepares, call() runs with the N-th allocation armed to fail, after(failed)
// checks the outcome (failed: the call reached its N-th allocation) and recovers; stops after the first N
// the call does not reach.
void sweep(const char* name, const std::function<moe_sft_status()>& call,
           const std::function<void()>& before, const std::function<void(bool failed)>& after) {
  int sites = 0;
  for (int64_t n = 1;; ++n) {
    before();
    moe_sft_fault_arm(n);
    const moe_sft_status status = call();
    const bool failed = moe_sft_fault_count() >= n;
    moe_sft_fault_disarm();
    if (failed) {
      REQUIRE(status == MOE_SFT_ERR_OUT_OF_MEMORY, "%s: allocation %lld failed, status %s", name, (long long)n,
              moe_sft_status_string(status));
      REQUIRE(std::strstr(moe_sft_last_error(), "out of memory") != nullptr, "%s: message '%s'", name,
              moe_sft_last_error());
      ++sites;
    } else {
      REQUIRE(status == MOE_SFT_OK, "%s: %s without a fault", name, moe_sft_status_string(status));
    }
    after(failed);
    if (!failed) break;
  }
  std::printf("%-34s %3d allocation sites, each: OUT_OF_MEMORY, nothing written, usable after\n", name, sites);
  total_sites += sites;
}

void sweep_layer(const char* label, const Problem& p, int32_t threads, int32_t tp) {
  moe_sft_layer* reference = p.create(1, tp);  // serial; tp parts sum the LoRA grads in their own order
  Outputs expected(p);
  REQUIRE(forward(reference, p, expected, 1) == MOE_SFT_OK, "reference forward");
  REQUIRE(backward(reference, p, expected) == MOE_SFT_OK, "reference backward");
  moe_sft_destroy(reference);
  const std::string name = std::string(label) + " ";

  // create: *out NULL on failure; the layer made afterwards computes as the reference does.
  moe_sft_layer* made = nullptr;
  const moe_sft_config cfg = p.config(threads, tp);
  sweep((name + "create").c_str(), [&] { return moe_sft_create(&cfg, &made); }, [] {},
        [&](bool failed) {
          if (failed) REQUIRE(made == nullptr, "failed create left *out set");
          moe_sft_destroy(made);
          made = nullptr;
        });

  moe_sft_layer* layer = p.create(threads, tp);
  Outputs got(p);
  // forward(save_for_backward = 1): output untouched, nothing saved; then a full step matches the reference.
  sweep((name + "forward").c_str(), [&] { return forward(layer, p, got, 1); }, [&] { got.fill(); },
        [&](bool failed) {
          if (failed) {
            REQUIRE(got.forward_untouched(), "failed forward wrote its output");
            REQUIRE(depth_of(layer) == 0, "failed forward saved a record");
            REQUIRE(forward(layer, p, got, 1) == MOE_SFT_OK, "forward after a failed one");
          }
          REQUIRE(got.forward_equal(expected), "forward after the sweep differs from the reference");
          REQUIRE(backward(layer, p, got) == MOE_SFT_OK && got.backward_equal(expected), "backward after");
        });

  // backward: grads untouched and the saved forward kept; the retried backward matches the reference.
  sweep((name + "backward").c_str(), [&] { return backward(layer, p, got); },
        [&] {
          got.fill();
          REQUIRE(forward(layer, p, got, 1) == MOE_SFT_OK, "forward before backward");
          got.fill();
        },
        [&](bool failed) {
          if (failed) {
            REQUIRE(got.backward_untouched(), "failed backward wrote grads");
            REQUIRE(depth_of(layer) == 1, "failed backward consumed the saved forward");
            REQUIRE(backward(layer, p, got) == MOE_SFT_OK, "backward after a failed one");
          }
          REQUIRE(got.backward_equal(expected), "backward after the sweep differs from the reference");
        });
  moe_sft_destroy(layer);
}

void sweep_adamw() {
  // Two parameters, f32 and bf16, and their grads.
  std::vector<float> p0(300), g0(300), g1(200);
  std::vector<uint16_t> p1(200);
  for (size_t i = 0; i < p0.size(); ++i) p0[i] = float(i % 17) / 17.0f - 0.5f, g0[i] = float(i % 5) - 2.0f;
  for (size_t i = 0; i < p1.size(); ++i) p1[i] = to_bf16(float(i % 13) / 13.0f), g1[i] = float(i % 7) / 7.0f;
  const std::vector<float> p0_start = p0;
  const std::vector<uint16_t> p1_start = p1;
  moe_sft_adamw_config cfg;
  moe_sft_adamw_config_init(&cfg);
  cfg.lr = 0.01;
  cfg.weight_decay = 0.1;
  cfg.max_grad_norm = 1.0;
  cfg.num_threads = 2;
  const moe_sft_adamw_param params[2] = {{"p0", MOE_SFT_DTYPE_F32, p0.data(), int64_t(p0.size())},
                                         {nullptr, MOE_SFT_DTYPE_BF16, p1.data(), int64_t(p1.size())}};
  const float* grads[2] = {g0.data(), g1.data()};

  // The reference: two steps of an optimizer never faulted, from the same start.
  moe_sft_adamw* opt = nullptr;
  REQUIRE(moe_sft_adamw_create(&cfg, 2, params, &opt) == MOE_SFT_OK, "adamw create");
  REQUIRE(moe_sft_adamw_step(opt, grads, nullptr) == MOE_SFT_OK, "step");
  REQUIRE(moe_sft_adamw_step(opt, grads, nullptr) == MOE_SFT_OK, "step");
  moe_sft_adamw_destroy(opt);
  const std::vector<float> p0_expected = p0;
  const std::vector<uint16_t> p1_expected = p1;

  opt = nullptr;
  sweep("adamw_create", [&] { return moe_sft_adamw_create(&cfg, 2, params, &opt); },
        [&] { p0 = p0_start, p1 = p1_start; },
        [&](bool failed) {
          if (failed) REQUIRE(opt == nullptr, "failed adamw_create left *out set");
          moe_sft_adamw_destroy(opt);
          opt = nullptr;
        });

  // step: parameters, moments and step count unchanged on failure; two good steps then match the reference.
  REQUIRE(moe_sft_adamw_create(&cfg, 2, params, &opt) == MOE_SFT_OK, "adamw create");
  int steps_done = 0;
  std::vector<float> p0_before;
  std::vector<uint16_t> p1_before;
  sweep("adamw_step", [&] { return moe_sft_adamw_step(opt, grads, nullptr); },
        [&] {
          if (steps_done == 0) REQUIRE(moe_sft_adamw_step(opt, grads, nullptr) == MOE_SFT_OK, "first step");
          steps_done = 1;
          p0_before = p0, p1_before = p1;
        },
        [&](bool failed) {
          int64_t step = -1;
          REQUIRE(moe_sft_adamw_get_step(opt, &step) == MOE_SFT_OK, "get_step");
          REQUIRE(step == (failed ? 1 : 2), "step count %lld after a %s step", (long long)step, failed ? "failed" : "good");
          if (failed) REQUIRE(p0 == p0_before && p1 == p1_before, "a failed step changed the parameters");
          else REQUIRE(p0 == p0_expected && p1 == p1_expected, "parameters after the sweep differ from the reference");
        });
  moe_sft_adamw_destroy(opt);
}

void sweep_stateless() {
  // quantize: the AWQ path keeps a per-group buffer; outputs untouched on failure.
  const int64_t rows = 8, cols = 64;
  std::vector<uint16_t> w(size_t(rows * cols));
  for (size_t i = 0; i < w.size(); ++i) w[i] = to_bf16(float(int(i % 29) - 14) / 10.0f);
  std::vector<uint8_t> q(w.size() / 2), zero(size_t(rows * cols / 16));
  std::vector<float> scale(zero.size());
  sweep("quantize(int4_awq)",
        [&] { return moe_sft_quantize(MOE_SFT_WEIGHT_INT4_AWQ, 16, rows, cols, w.data(), q.data(), scale.data(), zero.data()); },
        [&] { std::memset(q.data(), 0xA5, q.size()), std::memset(zero.data(), 0xA5, zero.size()); },
        [&](bool failed) {
          if (failed) REQUIRE(Outputs::canary(q.data(), q.size()) && Outputs::canary(zero.data(), zero.size()), "quantize wrote");
        });
  // route / route_backward
  const int64_t T = 6;
  const int32_t E = 8, k = 2;
  std::vector<float> logits(size_t(T * E)), rw(size_t(T * k)), gl(logits.size()), grw(rw.size(), 0.5f);
  std::vector<int64_t> ids(rw.size());
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = float(int(i * 7 % 11) - 5) / 3.0f;
  sweep("route", [&] {
          return moe_sft_route(T, E, k, MOE_SFT_DTYPE_F32, logits.data(), MOE_SFT_SCORING_SOFTMAX, 1, nullptr,
                               ids.data(), rw.data());
        }, [] {}, [](bool) {});
  sweep("route_backward", [&] {
          return moe_sft_route_backward(T, E, k, MOE_SFT_DTYPE_F32, logits.data(), MOE_SFT_SCORING_SOFTMAX, 1,
                                        ids.data(), grw.data(), gl.data());
        }, [] {}, [](bool) {});
}

}  // namespace

int main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  // bf16 weights on 2 threads; int8 and int4_awq (quantized at create) split into 2 parts on 1 thread.
  sweep_layer("bf16", Problem(1, 3, 16, 32, 4, 7, 2), 2, 1);
  sweep_layer("int8 tp2", Problem(2, 3, 16, 32, 4, 5, 2, MOE_SFT_WEIGHT_INT8), 1, 2);
  sweep_layer("int4_awq", Problem(3, 2, 32, 32, 2, 5, 2, MOE_SFT_WEIGHT_INT4_AWQ, 16), 2, 1);
  sweep_adamw();
  sweep_stateless();
  std::printf("total: %d allocation sites\n", total_sites);
  return 0;
}
