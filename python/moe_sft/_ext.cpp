// nanobind backend: a one-to-one binding of the C ABI in moe_sft.h, nothing more. Arrays cross as
// addresses (the Python layer checks shapes, dtypes and contiguity and keeps the arrays alive), so this
// module and the cffi backend present the same pointer-level interface to moe_sft._layer. Every compute
// call releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <optional>
#include <string>

#include "moe_sft.h"

namespace nb = nanobind;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// The config's fields in its order; addresses of 0 are NULL.
std::pair<int, uintptr_t> create(int32_t experts, int32_t hidden, int32_t intermediate, int32_t rank, float alpha,
                                 int32_t max_cache_depth, int32_t num_threads, int32_t tp_count, uintptr_t gate,
                                 uintptr_t up, uintptr_t down, int32_t check_finite, int32_t weight_format,
                                 int32_t group_size, int32_t prequantized, uintptr_t gate_scale, uintptr_t up_scale,
                                 uintptr_t down_scale, uintptr_t gate_zero, uintptr_t up_zero, uintptr_t down_zero) {
  moe_sft_config cfg;
  moe_sft_config_init(&cfg);
  cfg.expert_num = experts;
  cfg.hidden_size = hidden;
  cfg.intermediate_size = intermediate;
  cfg.lora_rank = rank;
  cfg.lora_alpha = alpha;
  cfg.max_cache_depth = max_cache_depth;
  cfg.num_threads = num_threads;
  cfg.tp_count = tp_count;
  cfg.gate_proj = ptr<const void>(gate);
  cfg.up_proj = ptr<const void>(up);
  cfg.down_proj = ptr<const void>(down);
  if (check_finite >= 0) cfg.check_finite = check_finite;  // else the library's default (MOE_SFT_CHECK_FINITE)
  cfg.weight_format = moe_sft_weight_format(weight_format);
  cfg.group_size = group_size;
  cfg.prequantized = prequantized;
  cfg.gate_scale = ptr<const void>(gate_scale);
  cfg.up_scale = ptr<const void>(up_scale);
  cfg.down_scale = ptr<const void>(down_scale);
  cfg.gate_zero = ptr<const uint8_t>(gate_zero);
  cfg.up_zero = ptr<const uint8_t>(up_zero);
  cfg.down_zero = ptr<const uint8_t>(down_zero);
  moe_sft_layer* layer = nullptr;
  moe_sft_status status = moe_sft_create(&cfg, &layer);
  return {int(status), reinterpret_cast<uintptr_t>(layer)};
}

int update_lora(uintptr_t layer, int dtype, uintptr_t gate_a, uintptr_t gate_b, uintptr_t up_a, uintptr_t up_b,
                uintptr_t down_a, uintptr_t down_b) {
  moe_sft_lora lora{moe_sft_dtype(dtype),   ptr<const void>(gate_a), ptr<const void>(gate_b),
                    ptr<const void>(up_a),  ptr<const void>(up_b),   ptr<const void>(down_a),
                    ptr<const void>(down_b)};
  return moe_sft_update_lora(ptr<moe_sft_layer>(layer), &lora);
}

int forward(uintptr_t layer, int64_t qlen, int32_t top_k, uintptr_t ids, uintptr_t weights, uintptr_t input,
            uintptr_t output, int save) {
  return moe_sft_forward(ptr<moe_sft_layer>(layer), qlen, top_k, ptr<const int64_t>(ids), ptr<const float>(weights),
                         ptr<const uint16_t>(input), ptr<uint16_t>(output), save);
}

// grads: six addresses, or all zero for "no LoRA grads".
int backward(uintptr_t layer, uintptr_t grad_output, uintptr_t grad_input, uintptr_t grad_weights, uintptr_t gate_a,
             uintptr_t gate_b, uintptr_t up_a, uintptr_t up_b, uintptr_t down_a, uintptr_t down_b, int accumulate) {
  moe_sft_lora_grads grads{ptr<float>(gate_a), ptr<float>(gate_b), ptr<float>(up_a),
                           ptr<float>(up_b),   ptr<float>(down_a), ptr<float>(down_b)};
  const bool none = !gate_a && !gate_b && !up_a && !up_b && !down_a && !down_b;
  return moe_sft_backward(ptr<moe_sft_layer>(layer), ptr<const uint16_t>(grad_output), ptr<uint16_t>(grad_input),
                          ptr<float>(grad_weights), none ? nullptr : &grads, accumulate);
}

std::pair<int, int32_t> cache_depth(uintptr_t layer) {
  int32_t depth = 0;
  int status = moe_sft_cache_depth(ptr<const moe_sft_layer>(layer), &depth);
  return {status, depth};
}

int route(int64_t qlen, int32_t experts, int32_t top_k, int dtype, uintptr_t logits, int scoring, int renormalize,
          uintptr_t bias, uintptr_t ids, uintptr_t weights) {
  return moe_sft_route(qlen, experts, top_k, moe_sft_dtype(dtype), ptr<const void>(logits), moe_sft_scoring(scoring),
                       renormalize, ptr<const float>(bias), ptr<int64_t>(ids), ptr<float>(weights));
}

int route_backward(int64_t qlen, int32_t experts, int32_t top_k, int dtype, uintptr_t logits, int scoring,
                   int renormalize, uintptr_t ids, uintptr_t grad_weights, uintptr_t grad_logits) {
  return moe_sft_route_backward(qlen, experts, top_k, moe_sft_dtype(dtype), ptr<const void>(logits),
                                moe_sft_scoring(scoring), renormalize, ptr<const int64_t>(ids),
                                ptr<const float>(grad_weights), ptr<float>(grad_logits));
}

int quantize(int32_t weight_format, int32_t group_size, int64_t rows, int64_t cols, uintptr_t w, uintptr_t weights,
             uintptr_t scale, uintptr_t zero) {
  return moe_sft_quantize(moe_sft_weight_format(weight_format), group_size, rows, cols, ptr<const uint16_t>(w),
                          ptr<void>(weights), ptr<float>(scale), ptr<uint8_t>(zero));
}

// None for a value that names no format.
std::optional<std::string> weight_format_name(int32_t weight_format) {
  const char* name = moe_sft_weight_format_name(moe_sft_weight_format(weight_format));
  return name ? std::optional<std::string>(name) : std::nullopt;
}

}  // namespace

NB_MODULE(_moe_sft_ext, m) {
  m.doc() = "nanobind backend of moe_sft: the C ABI of moe_sft.h, with arrays passed by address";
  auto release = nb::call_guard<nb::gil_scoped_release>();
  m.def("create", &create, release);
  m.def("destroy", [](uintptr_t layer) { moe_sft_destroy(ptr<moe_sft_layer>(layer)); }, release);
  m.def("update_lora", &update_lora, release);
  m.def("forward", &forward, release);
  m.def("backward", &backward, release);
  m.def("route", &route, release);
  m.def("route_backward", &route_backward, release);
  m.def("quantize", &quantize, release);
  m.def("weight_format_name", &weight_format_name);
  m.def("cache_depth", &cache_depth);
  m.def("layer_isa", [](uintptr_t layer) {
    const char* name = moe_sft_layer_isa(ptr<const moe_sft_layer>(layer));
    return std::string(name ? name : "");
  });
  m.def("isa", [] {
    const char* name = nullptr;
    const int status = moe_sft_isa(&name);
    return std::make_pair(status, std::string(name ? name : ""));
  });
  m.def("status_string", [](int status) { return std::string(moe_sft_status_string(moe_sft_status(status))); });
  m.def("last_error", [] { return std::string(moe_sft_last_error()); });
  m.def("version", [] { return moe_sft_version(); });
}
