// nanobind backend: the C ABI of moe_sft.h with typed arguments. Arrays cross as nb::ndarray, constrained to
// the dtype, dimension count, C-contiguity and device (CPU) the ABI reads, so a wrong array is a TypeError
// here rather than a bad pointer in the library. Every array argument is noconvert(): nanobind would otherwise
// pass a converted copy, and the library writes outputs and reads bound LoRA arrays in place. bf16 arrays
// cross as their uint16 bits (moe_sft._arrays makes that view without copying). A Layer owns its
// moe_sft_layer and keeps the bound LoRA arrays alive for as long as the library reads them in place.
// Statuses are returned, not raised: moe_sft._errors turns them into exceptions for this backend and the cffi
// one alike. Compute calls release the GIL. An AdamW owns its moe_sft_adamw and keeps the parameter arrays
// it updates in place alive.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "moe_sft.h"

namespace nb = nanobind;

namespace {

template <class T, class... Extra>
using Array = nb::ndarray<T, nb::c_contig, nb::device::cpu, Extra...>;
using AnyIn = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;  // dtype judged by the library's format
using Weights3 = nb::ndarray<nb::ro, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using Bf16In = Array<const uint16_t, nb::ndim<2>>;
using Bf16Out = Array<uint16_t, nb::ndim<2>>;
using LoraIn = Weights3;  // float32, or bf16 as uint16 bits
using LoraGrad = Array<float, nb::ndim<3>>;
using AnyOut = nb::ndarray<nb::c_contig, nb::device::cpu>;
using BiasIn = Array<const float, nb::ndim<2>>;

// An empty array reaches the library as NULL, as a C caller with nothing to pass would send it.
template <class A>
auto data(const A& a) -> decltype(a.data()) {
  return a.size() ? a.data() : nullptr;
}
template <class A>
const void* data(const std::optional<A>& a) {
  return a ? static_cast<const void*>(data(*a)) : nullptr;
}

// The ABI dtype of an array of float32 or of bf16 bits (uint16).
template <class A>
moe_sft_dtype dtype_of(const A& a, const char* what) {
  if (a.dtype() == nb::dtype<float>()) return MOE_SFT_DTYPE_F32;
  if (a.dtype() == nb::dtype<uint16_t>()) return MOE_SFT_DTYPE_BF16;
  throw nb::type_error((std::string(what) + " must be float32 or bf16 bits (uint16)").c_str());
}

struct Layer {
  moe_sft_layer* handle = nullptr;
  // The bound LoRA arrays: the library keeps their addresses and reads them at every call.
  std::optional<std::array<LoraIn, 6>> lora;
  ~Layer() { moe_sft_destroy(handle); }
};

moe_sft_layer* live(Layer& layer) {
  if (!layer.handle) throw nb::value_error("the layer is closed");
  return layer.handle;
}

std::pair<int, nb::object> create(int32_t experts, int32_t hidden, int32_t intermediate, int32_t lora_rank,
                                  float lora_alpha, int32_t max_cache_depth, int32_t num_threads, int32_t tp_count,
                                  std::optional<bool> check_finite, moe_sft_weight_format weight_format,
                                  int32_t group_size, bool prequantized, Weights3 gate, Weights3 up, Weights3 down,
                                  std::optional<AnyIn> gate_scale, std::optional<AnyIn> up_scale,
                                  std::optional<AnyIn> down_scale, std::optional<Array<const uint8_t>> gate_zero,
                                  std::optional<Array<const uint8_t>> up_zero,
                                  std::optional<Array<const uint8_t>> down_zero, int32_t block_rows,
                                  int32_t block_cols, moe_sft_dtype scale_dtype, moe_sft_activation activation,
                                  std::optional<float> swiglu_alpha, std::optional<float> swiglu_limit,
                                  std::optional<BiasIn> gate_bias, std::optional<BiasIn> up_bias,
                                  std::optional<BiasIn> down_bias) {
  moe_sft_config cfg;
  moe_sft_config_init(&cfg);
  cfg.expert_num = experts;
  cfg.hidden_size = hidden;
  cfg.intermediate_size = intermediate;
  cfg.lora_rank = lora_rank;
  cfg.lora_alpha = lora_alpha;
  cfg.max_cache_depth = max_cache_depth;
  cfg.num_threads = num_threads;
  cfg.tp_count = tp_count;
  cfg.gate_proj = data(gate);
  cfg.up_proj = data(up);
  cfg.down_proj = data(down);
  if (check_finite) cfg.check_finite = *check_finite;  // else the library's default (MOE_SFT_CHECK_FINITE)
  cfg.weight_format = weight_format;
  cfg.group_size = group_size;
  cfg.prequantized = prequantized;
  cfg.gate_scale = data(gate_scale);
  cfg.up_scale = data(up_scale);
  cfg.down_scale = data(down_scale);
  cfg.gate_zero = static_cast<const uint8_t*>(data(gate_zero));
  cfg.up_zero = static_cast<const uint8_t*>(data(up_zero));
  cfg.down_zero = static_cast<const uint8_t*>(data(down_zero));
  cfg.block_rows = block_rows;
  cfg.block_cols = block_cols;
  cfg.scale_dtype = scale_dtype;
  cfg.activation = activation;
  if (swiglu_alpha) cfg.swiglu_alpha = *swiglu_alpha;  // else the library's defaults (gpt-oss's)
  if (swiglu_limit) cfg.swiglu_limit = *swiglu_limit;
  cfg.gate_bias = static_cast<const float*>(data(gate_bias));
  cfg.up_bias = static_cast<const float*>(data(up_bias));
  cfg.down_bias = static_cast<const float*>(data(down_bias));
  moe_sft_layer* handle = nullptr;
  moe_sft_status status;
  {
    nb::gil_scoped_release release;
    status = moe_sft_create(&cfg, &handle);
  }
  if (status != MOE_SFT_OK) return {status, nb::none()};
  auto* layer = new Layer;
  layer->handle = handle;
  return {status, nb::cast(layer, nb::rv_policy::take_ownership)};
}

// Frees the library's layer now (the Layer object itself goes with its last reference).
void destroy(Layer& layer) {
  moe_sft_destroy(layer.handle);
  layer.handle = nullptr;
  layer.lora.reset();
}

// Binds six arrays of one dtype (float32, or bf16 bits as uint16), or unbinds with None.
int update_lora(Layer& layer, std::optional<std::array<LoraIn, 6>> arrays) {
  moe_sft_layer* handle = live(layer);
  if (!arrays) {
    const moe_sft_status status = moe_sft_update_lora(handle, nullptr);
    if (status == MOE_SFT_OK) layer.lora.reset();
    return status;
  }
  moe_sft_lora lora{};
  lora.dtype = dtype_of((*arrays)[0], "LoRA arrays");
  for (const LoraIn& a : *arrays) {
    if (a.dtype() != (*arrays)[0].dtype()) throw nb::type_error("the six LoRA arrays must share one dtype");
  }
  const void** fields[6] = {&lora.gate_a, &lora.gate_b, &lora.up_a, &lora.up_b, &lora.down_a, &lora.down_b};
  for (int i = 0; i < 6; ++i) *fields[i] = data((*arrays)[i]);
  const moe_sft_status status = moe_sft_update_lora(handle, &lora);
  if (status == MOE_SFT_OK) layer.lora = std::move(arrays);
  return status;
}

int forward(Layer& layer, Array<const int64_t, nb::ndim<2>> expert_ids,
            Array<const float, nb::ndim<2>> routing_weights, Bf16In input, Bf16Out output, bool save_for_backward) {
  moe_sft_layer* handle = live(layer);
  if (routing_weights.shape(0) != expert_ids.shape(0) || routing_weights.shape(1) != expert_ids.shape(1) ||
      input.shape(0) != expert_ids.shape(0) || output.shape(0) != input.shape(0) ||
      output.shape(1) != input.shape(1)) {
    throw nb::value_error("forward: expert_ids and routing_weights must be [T, k], input and output [T, H]");
  }
  nb::gil_scoped_release release;
  return moe_sft_forward(handle, int64_t(expert_ids.shape(0)), int32_t(expert_ids.shape(1)), data(expert_ids),
                         data(routing_weights), data(input), data(output), save_for_backward);
}

// lora_grads: six float32 arrays, or None to skip the LoRA grads.
int backward(Layer& layer, Bf16In grad_output, Bf16Out grad_input,
             std::optional<Array<float, nb::ndim<2>>> grad_routing_weights,
             std::optional<std::array<LoraGrad, 6>> lora_grads, bool accumulate) {
  moe_sft_layer* handle = live(layer);
  if (grad_input.shape(0) != grad_output.shape(0) || grad_input.shape(1) != grad_output.shape(1)) {
    throw nb::value_error("backward: grad_output and grad_input must have one shape");
  }
  moe_sft_lora_grads grads{};
  if (lora_grads) {
    float** fields[6] = {&grads.gate_a, &grads.gate_b, &grads.up_a, &grads.up_b, &grads.down_a, &grads.down_b};
    for (int i = 0; i < 6; ++i) *fields[i] = data((*lora_grads)[i]);
  }
  float* grad_weights = grad_routing_weights ? data(*grad_routing_weights) : nullptr;
  nb::gil_scoped_release release;
  return moe_sft_backward(handle, data(grad_output), data(grad_input), grad_weights, lora_grads ? &grads : nullptr,
                          accumulate);
}

int discard_saved(Layer& layer, int32_t n) { return moe_sft_discard_saved(live(layer), n); }

std::pair<int, int32_t> cache_depth(Layer& layer) {
  int32_t depth = 0;
  const int status = moe_sft_cache_depth(live(layer), &depth);
  return {status, depth};
}

std::string layer_isa(Layer& layer) {
  const char* name = moe_sft_layer_isa(live(layer));
  return name ? name : "";
}

int route(AnyIn logits, moe_sft_scoring scoring, bool renormalize,
          std::optional<Array<const float, nb::ndim<1>>> correction_bias, Array<int64_t, nb::ndim<2>> expert_ids,
          Array<float, nb::ndim<2>> routing_weights) {
  if (logits.ndim() != 2 || expert_ids.shape(0) != logits.shape(0) || routing_weights.shape(0) != logits.shape(0) ||
      routing_weights.shape(1) != expert_ids.shape(1)) {
    throw nb::value_error("route: logits must be [T, E], expert_ids and routing_weights [T, k]");
  }
  const float* bias = correction_bias ? data(*correction_bias) : nullptr;
  const moe_sft_dtype dtype = dtype_of(logits, "logits");
  nb::gil_scoped_release release;
  return moe_sft_route(int64_t(logits.shape(0)), int32_t(logits.shape(1)), int32_t(expert_ids.shape(1)), dtype,
                       data(logits), scoring, renormalize, bias, data(expert_ids), data(routing_weights));
}

int route_backward(AnyIn logits, moe_sft_scoring scoring, bool renormalize,
                   Array<const int64_t, nb::ndim<2>> expert_ids, Array<const float, nb::ndim<2>> grad_routing_weights,
                   Array<float, nb::ndim<2>> grad_logits) {
  if (logits.ndim() != 2 || expert_ids.shape(0) != logits.shape(0) ||
      grad_routing_weights.shape(0) != logits.shape(0) || grad_routing_weights.shape(1) != expert_ids.shape(1) ||
      grad_logits.shape(0) != logits.shape(0) || grad_logits.shape(1) != logits.shape(1)) {
    throw nb::value_error("route_backward: logits and grad_logits must be [T, E], the others [T, k]");
  }
  const moe_sft_dtype dtype = dtype_of(logits, "logits");
  nb::gil_scoped_release release;
  return moe_sft_route_backward(int64_t(logits.shape(0)), int32_t(logits.shape(1)), int32_t(expert_ids.shape(1)),
                                dtype, data(logits), scoring, renormalize, data(expert_ids),
                                data(grad_routing_weights), data(grad_logits));
}

// The send plan of expert_ids under placement (see moe_sft_plan_exchange); returns (status, send_rows).
std::pair<int, int64_t> plan_exchange(Array<const int64_t, nb::ndim<2>> expert_ids,
                                      Array<const int32_t, nb::ndim<1>> placement, int32_t world,
                                      Array<int64_t, nb::ndim<1>> send_counts, Array<int64_t, nb::ndim<1>> send_offsets,
                                      Array<int64_t, nb::ndim<1>> send_pairs) {
  if (send_counts.shape(0) != size_t(world > 0 ? world : 0) || send_offsets.shape(0) != send_counts.shape(0) ||
      send_pairs.shape(0) != expert_ids.shape(0) * expert_ids.shape(1)) {
    throw nb::value_error("plan_exchange: send_counts and send_offsets must be [world], send_pairs [T * k]");
  }
  int64_t rows = 0;
  const int status = moe_sft_plan_exchange(int64_t(expert_ids.shape(0)), int32_t(expert_ids.shape(1)),
                                           data(expert_ids), int32_t(placement.shape(0)), data(placement), world,
                                           data(send_counts), data(send_offsets), data(send_pairs), &rows);
  return {status, rows};
}

// w [rows, cols] as bf16 bits; weights, scale, zero in weight_format's layout (None where it has none).
int quantize(moe_sft_weight_format weight_format, int32_t group_size, Array<const uint16_t, nb::ndim<2>> w,
             std::optional<AnyOut> weights, std::optional<Array<float>> scale,
             std::optional<Array<uint8_t>> zero) {
  void* weights_data = weights ? data(*weights) : nullptr;
  float* scale_data = scale ? data(*scale) : nullptr;
  uint8_t* zero_data = zero ? data(*zero) : nullptr;
  nb::gil_scoped_release release;
  return moe_sft_quantize(weight_format, group_size, int64_t(w.shape(0)), int64_t(w.shape(1)), data(w), weights_data,
                          scale_data, zero_data);
}

// w [rows, cols] as bf16 bits; weights uint8 and scale (f32, bf16 bits or e8m0 bytes) in weight_format's layout.
int quantize_blocks(moe_sft_weight_format weight_format, int32_t block_rows, int32_t block_cols,
                    moe_sft_dtype scale_dtype, Array<const uint16_t, nb::ndim<2>> w,
                    std::optional<Array<uint8_t>> weights, std::optional<AnyOut> scale) {
  uint8_t* weights_data = weights ? data(*weights) : nullptr;
  void* scale_data = scale ? data(*scale) : nullptr;
  nb::gil_scoped_release release;
  return moe_sft_quantize_blocks(weight_format, block_rows, block_cols, scale_dtype, int64_t(w.shape(0)),
                                 int64_t(w.shape(1)), data(w), weights_data, scale_data);
}

// ---- AdamW ----

using AnyParam = nb::ndarray<nb::c_contig, nb::device::cpu>;  // float32, or bf16 as uint16 bits; written in place
using GradIn = Array<const float>;

// A moe_sft_adamw and the parameter arrays it updates in place (kept alive here for as long as it lives).
struct AdamW {
  moe_sft_adamw* handle = nullptr;
  std::vector<AnyParam> params;
  ~AdamW() { moe_sft_adamw_destroy(handle); }
};

moe_sft_adamw* live(AdamW& opt) {
  if (!opt.handle) throw nb::value_error("the optimizer is closed");
  return opt.handle;
}

using AdamWConfig = std::tuple<double, double, double, double, double, double, int32_t>;

moe_sft_adamw_config adamw_config(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  double max_grad_norm, int32_t num_threads) {
  moe_sft_adamw_config cfg;
  moe_sft_adamw_config_init(&cfg);
  cfg.lr = lr;
  cfg.beta1 = beta1;
  cfg.beta2 = beta2;
  cfg.eps = eps;
  cfg.weight_decay = weight_decay;
  cfg.max_grad_norm = max_grad_norm;
  cfg.num_threads = num_threads;
  return cfg;
}

// params: float32 arrays, or bf16 as uint16 bits, updated in place by every step; names: one per parameter.
std::pair<int, nb::object> adamw_create(double lr, double beta1, double beta2, double eps, double weight_decay,
                                        double max_grad_norm, int32_t num_threads, std::vector<std::string> names,
                                        std::vector<AnyParam> params) {
  if (names.size() != params.size()) throw nb::value_error("adamw_create: one name per parameter");
  const moe_sft_adamw_config cfg = adamw_config(lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads);
  std::vector<moe_sft_adamw_param> descs(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].size() == 0) throw nb::value_error(("parameter '" + names[i] + "' is empty").c_str());
    descs[i].name = names[i].c_str();
    descs[i].dtype = dtype_of(params[i], ("parameter '" + names[i] + "'").c_str());
    descs[i].data = params[i].data();
    descs[i].count = int64_t(params[i].size());
  }
  moe_sft_adamw* handle = nullptr;
  moe_sft_status status;
  {
    nb::gil_scoped_release release;
    status = moe_sft_adamw_create(&cfg, int32_t(descs.size()), descs.data(), &handle);
  }
  if (status != MOE_SFT_OK) return {status, nb::none()};
  auto* opt = new AdamW;
  opt->handle = handle;
  opt->params = std::move(params);
  return {status, nb::cast(opt, nb::rv_policy::take_ownership)};
}

// Frees the optimizer's state now (the AdamW object itself goes with its last reference).
void adamw_destroy(AdamW& opt) {
  moe_sft_adamw_destroy(opt.handle);
  opt.handle = nullptr;
  opt.params.clear();
}

using StepResult = std::tuple<double, double, int32_t, int32_t, int64_t, float, int64_t>;

// grads: one float32 array per parameter, of its element count (read only).
std::pair<int, StepResult> adamw_step(AdamW& opt, std::vector<GradIn> grads) {
  moe_sft_adamw* handle = live(opt);
  if (grads.size() != opt.params.size()) throw nb::value_error("adamw_step: one grad per parameter");
  std::vector<const float*> pointers(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].size() != opt.params[i].size()) {
      throw nb::value_error(("adamw_step: grads[" + std::to_string(i) + "] has " + std::to_string(grads[i].size()) +
                             " elements, its parameter " + std::to_string(opt.params[i].size()))
                                .c_str());
    }
    pointers[i] = grads[i].data();
  }
  moe_sft_adamw_report report{};
  report.struct_size = sizeof report;
  moe_sft_status status;
  {
    nb::gil_scoped_release release;
    status = moe_sft_adamw_step(handle, pointers.data(), &report);
  }
  return {status, StepResult(report.grad_norm, report.clip_coef, report.skipped, report.bad_param, report.bad_index,
                             report.bad_value, report.step)};
}

std::pair<int, AdamWConfig> adamw_get_config(AdamW& opt) {
  moe_sft_adamw_config cfg;
  moe_sft_adamw_config_init(&cfg);
  const int status = moe_sft_adamw_get_config(live(opt), &cfg);
  return {status, AdamWConfig(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.max_grad_norm,
                              cfg.num_threads)};
}

int adamw_set_config(AdamW& opt, double lr, double beta1, double beta2, double eps, double weight_decay,
                     double max_grad_norm, int32_t num_threads) {
  const moe_sft_adamw_config cfg = adamw_config(lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads);
  return moe_sft_adamw_set_config(live(opt), &cfg);
}

int adamw_set_lr(AdamW& opt, double lr) { return moe_sft_adamw_set_lr(live(opt), lr); }

std::pair<int, int64_t> adamw_get_step(AdamW& opt) {
  int64_t step = 0;
  const int status = moe_sft_adamw_get_step(live(opt), &step);
  return {status, step};
}

int adamw_set_step(AdamW& opt, int64_t step) { return moe_sft_adamw_set_step(live(opt), step); }

using StateView = nb::ndarray<nb::numpy, float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Writable flat float32 views of parameter index's moments and master (None for an f32 parameter), over the
// optimizer's own memory; each view keeps the AdamW object alive, but adamw_destroy frees the memory: use
// them between steps and before destroy only.
std::pair<int, nb::object> adamw_state(nb::handle self, int32_t index) {
  AdamW& opt = nb::cast<AdamW&>(self);
  float* m = nullptr;
  float* v = nullptr;
  float* master = nullptr;
  const int status = moe_sft_adamw_state(live(opt), index, &m, &v, &master, nullptr);
  if (status != MOE_SFT_OK) return {status, nb::none()};
  const size_t n = opt.params[size_t(index)].size();
  auto view = [&](float* p) -> nb::object {
    if (!p) return nb::none();
    return nb::cast(StateView(p, {n}, self));
  };
  return {status, nb::make_tuple(view(m), view(v), view(master))};
}

// The library's names of its enum values; None for a value that names nothing.
std::optional<std::string> name_or_none(const char* name) {
  return name ? std::optional<std::string>(name) : std::nullopt;
}

}  // namespace

NB_MODULE(_moe_sft_ext, m) {
  m.doc() = "nanobind backend of moe_sft: the C ABI of moe_sft.h with typed array arguments";

  // The ABI's enums, for callers of this module; the names are the header's without the MOE_SFT_ prefix.
  nb::enum_<moe_sft_status>(m, "Status", nb::is_arithmetic())
      .value("OK", MOE_SFT_OK)
      .value("ERR_INVALID_ARGUMENT", MOE_SFT_ERR_INVALID_ARGUMENT)
      .value("ERR_OUT_OF_MEMORY", MOE_SFT_ERR_OUT_OF_MEMORY)
      .value("ERR_CACHE_FULL", MOE_SFT_ERR_CACHE_FULL)
      .value("ERR_CACHE_EMPTY", MOE_SFT_ERR_CACHE_EMPTY)
      .value("ERR_NON_FINITE", MOE_SFT_ERR_NON_FINITE)
      .value("ERR_UNSUPPORTED", MOE_SFT_ERR_UNSUPPORTED)
      .value("ERR_INTERNAL", MOE_SFT_ERR_INTERNAL);
  nb::enum_<moe_sft_dtype>(m, "DType", nb::is_arithmetic())
      .value("BF16", MOE_SFT_DTYPE_BF16)
      .value("F32", MOE_SFT_DTYPE_F32);
  nb::enum_<moe_sft_weight_format>(m, "WeightFormat", nb::is_arithmetic())
      .value("BF16", MOE_SFT_WEIGHT_BF16)
      .value("INT8", MOE_SFT_WEIGHT_INT8)
      .value("INT4_AWQ", MOE_SFT_WEIGHT_INT4_AWQ)
      .value("INT4_K2", MOE_SFT_WEIGHT_INT4_K2)
      .value("FP8_E4M3_BLOCK", MOE_SFT_WEIGHT_FP8_E4M3_BLOCK)
      .value("MXFP4", MOE_SFT_WEIGHT_MXFP4);
  nb::enum_<moe_sft_activation>(m, "Activation", nb::is_arithmetic())
      .value("SILU", MOE_SFT_ACTIVATION_SILU)
      .value("SWIGLU_CLAMPED", MOE_SFT_ACTIVATION_SWIGLU_CLAMPED);
  nb::enum_<moe_sft_scoring>(m, "Scoring", nb::is_arithmetic())
      .value("SOFTMAX", MOE_SFT_SCORING_SOFTMAX)
      .value("SIGMOID", MOE_SFT_SCORING_SIGMOID);

  auto not_copyable = [](nb::handle, nb::args) -> nb::object {
    throw nb::type_error("a moe_sft layer owns library memory and cannot be copied or pickled");
  };
  nb::class_<Layer>(m, "Layer", "A moe_sft_layer; made by create(), freed with its last reference or destroy().")
      .def("__copy__", not_copyable)
      .def("__deepcopy__", not_copyable)
      .def("__reduce__", not_copyable)
      .def("__reduce_ex__", not_copyable);

  auto not_copyable_adamw = [](nb::handle, nb::args) -> nb::object {
    throw nb::type_error("a moe_sft optimizer owns library memory and cannot be copied or pickled");
  };
  nb::class_<AdamW>(m, "AdamW",
                    "A moe_sft_adamw; made by adamw_create(), freed with its last reference or adamw_destroy().")
      .def("__copy__", not_copyable_adamw)
      .def("__deepcopy__", not_copyable_adamw)
      .def("__reduce__", not_copyable_adamw)
      .def("__reduce_ex__", not_copyable_adamw);

  // Arrays are never converted (see the top of this file); an optional one may be None.
  auto array = [](const char* name) { return nb::arg(name).noconvert(); };
  auto optional_array = [](const char* name) { return nb::arg(name).noconvert().none(); };
  m.def("create", &create, nb::arg("experts"), nb::arg("hidden"), nb::arg("intermediate"), nb::arg("lora_rank"),
        nb::arg("lora_alpha"), nb::arg("max_cache_depth"), nb::arg("num_threads"), nb::arg("tp_count"),
        nb::arg("check_finite").none(), nb::arg("weight_format"), nb::arg("group_size"), nb::arg("prequantized"),
        array("gate"), array("up"), array("down"), optional_array("gate_scale") = nb::none(),
        optional_array("up_scale") = nb::none(), optional_array("down_scale") = nb::none(),
        optional_array("gate_zero") = nb::none(), optional_array("up_zero") = nb::none(),
        optional_array("down_zero") = nb::none(), nb::arg("block_rows") = 0, nb::arg("block_cols") = 0,
        nb::arg("scale_dtype") = MOE_SFT_DTYPE_F32, nb::arg("activation") = MOE_SFT_ACTIVATION_SILU,
        nb::arg("swiglu_alpha").none() = nb::none(), nb::arg("swiglu_limit").none() = nb::none(),
        optional_array("gate_bias") = nb::none(), optional_array("up_bias") = nb::none(),
        optional_array("down_bias") = nb::none());
  m.def("destroy", &destroy, nb::arg("layer"));
  m.def("update_lora", &update_lora, nb::arg("layer"), optional_array("arrays"));
  m.def("forward", &forward, nb::arg("layer"), array("expert_ids"), array("routing_weights"), array("input"),
        array("output"), nb::arg("save_for_backward"));
  m.def("backward", &backward, nb::arg("layer"), array("grad_output"), array("grad_input"),
        optional_array("grad_routing_weights"), optional_array("lora_grads"), nb::arg("accumulate"));
  m.def("discard_saved", &discard_saved, nb::arg("layer"), nb::arg("n"));
  m.def("cache_depth", &cache_depth, nb::arg("layer"));
  m.def("layer_isa", &layer_isa, nb::arg("layer"));
  m.def("route", &route, array("logits"), nb::arg("scoring"), nb::arg("renormalize"),
        optional_array("correction_bias"), array("expert_ids"), array("routing_weights"));
  m.def("route_backward", &route_backward, array("logits"), nb::arg("scoring"), nb::arg("renormalize"),
        array("expert_ids"), array("grad_routing_weights"), array("grad_logits"));
  m.def("quantize", &quantize, nb::arg("weight_format"), nb::arg("group_size"), array("w"),
        optional_array("weights"), optional_array("scale"), optional_array("zero"));
  m.def("plan_exchange", &plan_exchange, array("expert_ids"), array("placement"), nb::arg("world"),
        array("send_counts"), array("send_offsets"), array("send_pairs"));
  m.def("quantize_blocks", &quantize_blocks, nb::arg("weight_format"), nb::arg("block_rows"), nb::arg("block_cols"),
        nb::arg("scale_dtype"), array("w"), optional_array("weights"), optional_array("scale"));
  m.def("adamw_create", &adamw_create, nb::arg("lr"), nb::arg("beta1"), nb::arg("beta2"), nb::arg("eps"),
        nb::arg("weight_decay"), nb::arg("max_grad_norm"), nb::arg("num_threads"), nb::arg("names"),
        array("params"));
  m.def("adamw_destroy", &adamw_destroy, nb::arg("opt"));
  m.def("adamw_step", &adamw_step, nb::arg("opt"), array("grads"));
  m.def("adamw_get_config", &adamw_get_config, nb::arg("opt"));
  m.def("adamw_set_config", &adamw_set_config, nb::arg("opt"), nb::arg("lr"), nb::arg("beta1"), nb::arg("beta2"),
        nb::arg("eps"), nb::arg("weight_decay"), nb::arg("max_grad_norm"), nb::arg("num_threads"));
  m.def("adamw_set_lr", &adamw_set_lr, nb::arg("opt"), nb::arg("lr"));
  m.def("adamw_get_step", &adamw_get_step, nb::arg("opt"));
  m.def("adamw_set_step", &adamw_set_step, nb::arg("opt"), nb::arg("step"));
  m.def("adamw_state", &adamw_state, nb::arg("opt"), nb::arg("index"));
  m.def("isa", [] {
    const char* name = nullptr;
    const int status = moe_sft_isa(&name);
    return std::make_pair(status, std::string(name ? name : ""));
  });
  // Name lookups take plain ints so that a caller can probe values the enums do not hold.
  m.def("status_string", [](int status) { return std::string(moe_sft_status_string(moe_sft_status(status))); });
  m.def("weight_format_name",
        [](int value) { return name_or_none(moe_sft_weight_format_name(moe_sft_weight_format(value))); });
  m.def("dtype_name", [](int value) { return name_or_none(moe_sft_dtype_name(moe_sft_dtype(value))); });
  m.def("activation_name",
        [](int value) { return name_or_none(moe_sft_activation_name(moe_sft_activation(value))); });
  m.def("scoring_name", [](int value) { return name_or_none(moe_sft_scoring_name(moe_sft_scoring(value))); });
  m.def("last_error", [] { return std::string(moe_sft_last_error()); });
  m.def("version", [] { return moe_sft_version(); });
}
