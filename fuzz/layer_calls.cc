// Fuzz target: a sequence of calls on a small layer — forward (saving or not), backward (with and without
// the LoRA grads, accumulating or not), discard_saved, unbinding and rebinding the adapters — with fuzzed
// token counts, top_k, expert ids (in and out of range, -1, repeats), routing weights and inputs (NaN and
// Inf planted), weights and adapters with planted NaN/Inf, every weight format, tp_count 1 or 2, with and
// without check_finite. Every call runs on two layers made from the same config: one on 2 threads, one
// serial. Checks: both give the same status; on error no output byte changed (every output is filled with a
// canary first) and the message is set; on success both wrote the same bits; the cache depths agree.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "fuzz_input.h"
#include "moe_sft.h"

using namespace moe_sft_fuzz;

namespace {

struct Weights {  // the config's arrays, for one projection set
  std::vector<uint8_t> proj[3], scale[3], zero[3];
};

// Small bf16 values from a seed, with one planted value at a fuzzed position.
std::vector<uint16_t> bf16_values(FuzzInput& in, size_t n, float magnitude) {
  std::vector<uint16_t> v(n);
  uint32_t s = in.raw<uint16_t>() | 1u;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    v[i] = bf16_bits(magnitude * (float(int32_t(s >> 8) % 2001) / 1000.0f - 1.0f));
  }
  if (n > 0 && in.range(0, 3) == 0) v[size_t(in.raw<uint16_t>()) % n] = bf16_bits(in.value());
  return v;
}

template <class T>
std::vector<uint8_t> bytes_of(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

struct Case {
  int64_t E, H, I, r;
  moe_sft_config cfg;
  Weights w;
  int lora_dtype;
  std::vector<uint8_t> lora[6];
  moe_sft_lora binding;
};

// Builds the config and its arrays; false when the drawn weights cannot be made (a planted NaN refused by
// moe_sft_quantize, which is its own fuzz target's business).
bool make_case(FuzzInput& in, Case& c) {
  c.E = in.range(1, 4);
  static const int64_t hs[] = {8, 16, 24, 40};
  static const int64_t is[] = {8, 16, 32};
  c.H = in.pick(hs);
  c.I = in.pick(is);
  c.r = in.range(0, 4);
  moe_sft_config& cfg = c.cfg;
  moe_sft_config_init(&cfg);
  cfg.expert_num = int32_t(c.E);
  cfg.hidden_size = int32_t(c.H);
  cfg.intermediate_size = int32_t(c.I);
  cfg.lora_rank = int32_t(c.r);
  cfg.lora_alpha = float(in.range(1, 64));
  cfg.max_cache_depth = int32_t(in.range(0, 3));
  cfg.tp_count = int32_t(in.range(1, 2));
  cfg.check_finite = in.flag();
  // 0 bf16, 1 int8 from bf16, 2 int4_awq from bf16, 3 int8 / 4 int4_awq quantized by moe_sft_quantize,
  // 5 int4_k2 from fuzzed words
  const int kind = int(in.range(0, 5));
  static const moe_sft_weight_format formats[] = {MOE_SFT_WEIGHT_BF16, MOE_SFT_WEIGHT_INT8, MOE_SFT_WEIGHT_INT4_AWQ,
                                                  MOE_SFT_WEIGHT_INT8, MOE_SFT_WEIGHT_INT4_AWQ, MOE_SFT_WEIGHT_INT4_K2};
  cfg.weight_format = formats[kind];
  const int32_t g = (kind == 2 || kind == 4 || kind == 5) ? 8 : 0;
  cfg.group_size = g;
  cfg.prequantized = kind >= 3;
  const int64_t rows[3] = {c.I, c.I, c.H}, cols[3] = {c.H, c.H, c.I};
  for (int p = 0; p < 3; ++p) {
    const int64_t n = c.E * rows[p] * cols[p];
    if (kind == 5) {  // K2: any nibbles, small bf16 scales
      std::vector<uint8_t> words(size_t(n / 2));
      for (auto& b : words) b = in.raw<uint8_t>();
      c.w.proj[p] = words;
      c.w.scale[p] = bytes_of(bf16_values(in, size_t(n / g), 0.05f));
      continue;
    }
    const std::vector<uint16_t> w = bf16_values(in, size_t(n), 0.1f);
    if (kind < 3) {
      c.w.proj[p] = bytes_of(w);
      continue;
    }
    const int64_t groups = g == 0 ? 1 : cols[p] / g;
    c.w.proj[p].resize(size_t(kind == 3 ? n : n / 2));
    c.w.scale[p].resize(size_t(c.E * rows[p] * groups * 4));
    if (kind == 4) c.w.zero[p].resize(size_t(c.E * rows[p] * groups));
    if (moe_sft_quantize(cfg.weight_format, g, c.E * rows[p], cols[p], w.data(), c.w.proj[p].data(),
                         reinterpret_cast<float*>(c.w.scale[p].data()),
                         kind == 4 ? c.w.zero[p].data() : nullptr) != MOE_SFT_OK)
      return false;
  }
  cfg.gate_proj = c.w.proj[0].data();
  cfg.up_proj = c.w.proj[1].data();
  cfg.down_proj = c.w.proj[2].data();
  if (cfg.prequantized) {
    cfg.gate_scale = c.w.scale[0].data();
    cfg.up_scale = c.w.scale[1].data();
    cfg.down_scale = c.w.scale[2].data();
  }
  if (kind == 4) {
    cfg.gate_zero = c.w.zero[0].data();
    cfg.up_zero = c.w.zero[1].data();
    cfg.down_zero = c.w.zero[2].data();
  }
  // LoRA: [E, r, H], [E, I, r], [E, r, H], [E, I, r], [E, r, I], [E, H, r]
  c.lora_dtype = in.flag() ? MOE_SFT_DTYPE_F32 : MOE_SFT_DTYPE_BF16;
  const int64_t sizes[6] = {c.r * c.H, c.I * c.r, c.r * c.H, c.I * c.r, c.r * c.I, c.H * c.r};
  for (int i = 0; i < 6; ++i) {
    const std::vector<uint16_t> v = bf16_values(in, size_t(c.E * sizes[i]), 0.1f);
    if (c.lora_dtype == MOE_SFT_DTYPE_BF16) {
      c.lora[i] = bytes_of(v);
    } else {
      std::vector<float> f(v.size());
      for (size_t j = 0; j < v.size(); ++j) f[j] = bf16_value(v[j]);
      c.lora[i] = bytes_of(f);
    }
    c.lora[i].resize(c.lora[i].size() + 4);  // never empty: rank 0 arrays still need a pointer
  }
  c.binding = {moe_sft_dtype(c.lora_dtype), c.lora[0].data(), c.lora[1].data(), c.lora[2].data(),
               c.lora[3].data(), c.lora[4].data(), c.lora[5].data()};
  return true;
}

struct Pair {  // the same config on 2 threads and serially
  moe_sft_layer* layer[2] = {nullptr, nullptr};
  ~Pair() {
    moe_sft_destroy(layer[0]);
    moe_sft_destroy(layer[1]);
  }
};

void check_same_status(moe_sft_status a, moe_sft_status b, const char* call) {
  FUZZ_CHECK(a == b, "%s: 2 threads gave %d, 1 thread %d", call, int(a), int(b));
  if (a != MOE_SFT_OK) FUZZ_CHECK(moe_sft_last_error()[0] != '\0', "%s failed with %d and no message", call, int(a));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  Case c;
  if (!make_case(in, c)) return 0;
  Pair pair;
  moe_sft_status st[2];
  for (int k = 0; k < 2; ++k) {
    moe_sft_config cfg = c.cfg;
    cfg.num_threads = 2 - k;
    st[k] = moe_sft_create(&cfg, &pair.layer[k]);
  }
  check_same_status(st[0], st[1], "create");
  if (st[0] != MOE_SFT_OK) return 0;
  if (c.r > 0 && in.range(0, 7) != 0)
    for (int k = 0; k < 2; ++k) FUZZ_CHECK(moe_sft_update_lora(pair.layer[k], &c.binding) == MOE_SFT_OK, "bind");

  struct Saved {
    int64_t T, top_k;
  };
  std::vector<Saved> saved;  // the successful saved forwards, as the cache should hold them
  for (int op = 0; op < 8 && !in.exhausted(); ++op) {
    switch (in.range(0, 5)) {
      case 0:
      case 1: {  // forward
        const int64_t T = in.range(0, 6), top_k = in.range(0, 3);
        const bool save = in.flag();
        std::vector<int64_t> ids(size_t(T * top_k));
        static const int64_t odd_ids[] = {-1, -1, -2, 4, 1000, INT64_MIN};
        for (auto& id : ids) id = in.range(0, 7) == 0 ? in.pick(odd_ids) : in.range(0, c.E - 1);
        std::vector<float> weights(ids.size());
        for (auto& w : weights) w = in.range(0, 7) == 0 ? in.value() : float(in.range(0, 100)) / 100.0f;
        const std::vector<uint16_t> x = bf16_values(in, size_t(T * c.H), 1.0f);
        std::vector<uint16_t> y[2] = {canary<uint16_t>(x.size()), canary<uint16_t>(x.size())};
        for (int k = 0; k < 2; ++k)
          st[k] = moe_sft_forward(pair.layer[k], T, int32_t(top_k), ids.data(), weights.data(), x.data(),
                                  y[k].data(), save);
        check_same_status(st[0], st[1], "forward");
        if (st[0] != MOE_SFT_OK) {
          FUZZ_CHECK(is_canary(y[0]) && is_canary(y[1]), "failed forward (%d) wrote its output", int(st[0]));
        } else {
          FUZZ_CHECK(same_bits(y[0], y[1]), "forward: 2 threads and 1 thread differ");
          if (save) saved.push_back({T, top_k});
        }
        break;
      }
      case 2:
      case 3: {  // backward
        const Saved s = saved.empty() ? Saved{1, 1} : saved.back();
        const std::vector<uint16_t> gy = bf16_values(in, size_t(s.T * c.H), 1.0f);
        const bool want_rw = in.flag(), want_lora = in.flag(), accumulate = in.flag();
        const int64_t sizes[6] = {c.r * c.H, c.I * c.r, c.r * c.H, c.I * c.r, c.r * c.I, c.H * c.r};
        std::vector<uint16_t> gx[2];
        std::vector<float> grw[2], gl[2][6];
        moe_sft_lora_grads grads[2];
        for (int k = 0; k < 2; ++k) {
          gx[k] = canary<uint16_t>(gy.size());
          grw[k] = canary<float>(size_t(s.T * s.top_k));
          for (int i = 0; i < 6; ++i) gl[k][i] = canary<float>(size_t(c.E * sizes[i]) + 1);
          grads[k] = {gl[k][0].data(), gl[k][1].data(), gl[k][2].data(),
                      gl[k][3].data(), gl[k][4].data(), gl[k][5].data()};
          st[k] = moe_sft_backward(pair.layer[k], gy.data(), gx[k].data(), want_rw ? grw[k].data() : nullptr,
                                   want_lora ? &grads[k] : nullptr, accumulate);
        }
        check_same_status(st[0], st[1], "backward");
        if (st[0] != MOE_SFT_OK) {
          for (int k = 0; k < 2; ++k) {
            FUZZ_CHECK(is_canary(gx[k]) && is_canary(grw[k]), "failed backward (%d) wrote grads", int(st[0]));
            for (int i = 0; i < 6; ++i) FUZZ_CHECK(is_canary(gl[k][i]), "failed backward wrote LoRA grad %d", i);
          }
          break;
        }
        FUZZ_CHECK(!saved.empty(), "backward succeeded with nothing saved");
        saved.pop_back();
        FUZZ_CHECK(same_bits(gx[0], gx[1]) && same_bits(grw[0], grw[1]), "backward: 2 threads and 1 thread differ");
        for (int i = 0; i < 6; ++i) FUZZ_CHECK(same_bits(gl[0][i], gl[1][i]), "LoRA grad %d: threads differ", i);
        break;
      }
      case 4: {  // discard_saved
        const int32_t n = int32_t(in.range(-1, 3));
        for (int k = 0; k < 2; ++k) st[k] = moe_sft_discard_saved(pair.layer[k], n);
        check_same_status(st[0], st[1], "discard_saved");
        const bool ok = n >= 0 && size_t(n) <= saved.size();
        FUZZ_CHECK((st[0] == MOE_SFT_OK) == ok, "discard_saved(%d) at depth %zu gave %d", n, saved.size(), int(st[0]));
        if (ok) saved.resize(saved.size() - size_t(n));
        break;
      }
      case 5: {  // unbind or rebind the adapters
        const bool bind = in.flag();
        for (int k = 0; k < 2; ++k) st[k] = moe_sft_update_lora(pair.layer[k], bind ? &c.binding : nullptr);
        check_same_status(st[0], st[1], "update_lora");
        FUZZ_CHECK((st[0] == MOE_SFT_OK) == (!bind || c.r > 0), "update_lora(bind=%d) gave %d", int(bind), int(st[0]));
        break;
      }
    }
    for (int k = 0; k < 2; ++k) {
      int32_t depth = -1;
      FUZZ_CHECK(moe_sft_cache_depth(pair.layer[k], &depth) == MOE_SFT_OK && depth == int32_t(saved.size()),
                 "cache depth %d, expected %zu", depth, saved.size());
    }
  }
  return 0;
}
