// What the reliability drivers (alloc_sweep, stress, soak) share: a small layer problem made from a seed
// (weights, adapters, routing, inputs), the outputs of one forward + backward, and the checks they apply.
// Only the C ABI is used.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "moe_sft.h"

namespace reliability {

#define REQUIRE(cond, ...)                                                                          \
  do {                                                                                              \
    if (!(cond)) {                                                                                  \
      std::fprintf(stderr, "FAILED at %s:%d: %s\n  ", __FILE__, __LINE__, #cond);                   \
      std::fprintf(stderr, __VA_ARGS__);                                                            \
      std::fprintf(stderr, "\n  last error: %s\n", moe_sft_last_error());                          \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// A layer's arrays and one call's inputs. Values are O(1) so outputs are O(1).
struct Problem {
  int32_t E, H, I, r, T, k;
  moe_sft_weight_format format;
  int32_t group_size;
  std::vector<uint16_t> gate, up, down, x, grad_out;
  std::vector<float> lora[6];
  std::vector<int64_t> ids;
  std::vector<float> weights;

  Problem(uint32_t seed, int32_t E_, int32_t H_, int32_t I_, int32_t r_, int32_t T_, int32_t k_,
          moe_sft_weight_format format_ = MOE_SFT_WEIGHT_BF16, int32_t group_size_ = 0)
      : E(E_), H(H_), I(I_), r(r_), T(T_), k(k_), format(format_), group_size(group_size_) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    auto bf16s = [&](size_t n, float scale) {
      std::vector<uint16_t> v(n);
      for (auto& e : v) e = to_bf16(u(rng) * scale);
      return v;
    };
    gate = bf16s(size_t(E) * I * H, 0.2f);
    up = bf16s(size_t(E) * I * H, 0.2f);
    down = bf16s(size_t(E) * H * I, 0.2f);
    const size_t sizes[6] = {size_t(r) * H, size_t(I) * r, size_t(r) * H, size_t(I) * r, size_t(r) * I, size_t(H) * r};
    for (int i = 0; i < 6; ++i) {
      lora[i].resize(size_t(E) * sizes[i] + 1);
      for (auto& e : lora[i]) e = u(rng) * 0.1f;
    }
    set_tokens(T, seed + 1);
  }

  // New routing, inputs and output grads for T tokens.
  void set_tokens(int32_t tokens, uint32_t seed) {
    T = tokens;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    ids.resize(size_t(T) * k);
    weights.resize(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      ids[i] = int64_t(rng() % uint32_t(E + 1)) - 1;  // -1 now and then: a slot without an expert
      weights[i] = 0.5f + 0.5f * u(rng);
    }
    x.resize(size_t(T) * H);
    grad_out.resize(x.size());
    for (auto& e : x) e = to_bf16(u(rng));
    for (auto& e : grad_out) e = to_bf16(u(rng));
  }

  moe_sft_config config(int32_t threads, int32_t tp_count = 1, int32_t max_cache_depth = 2) const {
    moe_sft_config c;
    moe_sft_config_init(&c);
    c.expert_num = E;
    c.hidden_size = H;
    c.intermediate_size = I;
    c.lora_rank = r;
    c.lora_alpha = 2.0f * float(r);
    c.num_threads = threads;
    c.tp_count = tp_count;
    c.max_cache_depth = max_cache_depth;
    c.check_finite = 0;
    c.weight_format = format;
    c.group_size = group_size;
    c.gate_proj = gate.data();
    c.up_proj = up.data();
    c.down_proj = down.data();
    return c;
  }

  moe_sft_lora binding() const {
    return {MOE_SFT_DTYPE_F32, lora[0].data(), lora[1].data(), lora[2].data(),
            lora[3].data(), lora[4].data(), lora[5].data()};
  }

  moe_sft_layer* create(int32_t threads, int32_t tp_count = 1) const {
    const moe_sft_config c = config(threads, tp_count);
    moe_sft_layer* layer = nullptr;
    REQUIRE(moe_sft_create(&c, &layer) == MOE_SFT_OK, "create");
    const moe_sft_lora l = binding();
    REQUIRE(moe_sft_update_lora(layer, &l) == MOE_SFT_OK, "update_lora");
    return layer;
  }
};

// What one forward + backward writes, each array filled with a canary byte before the call.
struct Outputs {
  std::vector<uint16_t> y, gx;
  std::vector<float> grw, gl[6];
  moe_sft_lora_grads grads{};

  explicit Outputs(const Problem& p) { resize(p); }
  void resize(const Problem& p) {
    y.assign(p.x.size(), 0);
    gx.assign(p.x.size(), 0);
    grw.assign(p.ids.size(), 0);
    for (int i = 0; i < 6; ++i) gl[i].assign(p.lora[i].size(), 0);
    grads = {gl[0].data(), gl[1].data(), gl[2].data(), gl[3].data(), gl[4].data(), gl[5].data()};
    fill();
  }
  void fill() {
    std::memset(y.data(), 0xA5, y.size() * 2);
    std::memset(gx.data(), 0xA5, gx.size() * 2);
    std::memset(grw.data(), 0xA5, grw.size() * 4);
    for (auto& g : gl) std::memset(g.data(), 0xA5, g.size() * 4);
  }
  static bool canary(const void* p, size_t bytes) {
    for (size_t i = 0; i < bytes; ++i)
      if (static_cast<const uint8_t*>(p)[i] != 0xA5) return false;
    return true;
  }
  bool forward_untouched() const { return canary(y.data(), y.size() * 2); }
  bool backward_untouched() const {
    bool all = canary(gx.data(), gx.size() * 2) && canary(grw.data(), grw.size() * 4);
    for (const auto& g : gl) all = all && canary(g.data(), g.size() * 4);
    return all;
  }
  bool forward_equal(const Outputs& o) const { return std::memcmp(y.data(), o.y.data(), y.size() * 2) == 0; }
  bool backward_equal(const Outputs& o) const {
    bool all = std::memcmp(gx.data(), o.gx.data(), gx.size() * 2) == 0 &&
               std::memcmp(grw.data(), o.grw.data(), grw.size() * 4) == 0;
    for (int i = 0; i < 6; ++i) all = all && std::memcmp(gl[i].data(), o.gl[i].data(), gl[i].size() * 4) == 0;
    return all;
  }
};

inline moe_sft_status forward(moe_sft_layer* layer, const Problem& p, Outputs& o, int32_t save) {
  return moe_sft_forward(layer, p.T, p.k, p.ids.data(), p.weights.data(), p.x.data(), o.y.data(), save);
}

inline moe_sft_status backward(moe_sft_layer* layer, const Problem& p, Outputs& o) {
  return moe_sft_backward(layer, p.grad_out.data(), o.gx.data(), o.grw.data(), &o.grads, 0);
}

inline int32_t depth_of(const moe_sft_layer* layer) {
  int32_t d = -1;
  REQUIRE(moe_sft_cache_depth(layer, &d) == MOE_SFT_OK, "cache_depth");
  return d;
}

}  // namespace reliability
