// C ABI of the AdamW optimizer (lib/optim): validation of the config, parameters and grads, then the
// optimizer. Every body runs inside guard(); everything is checked before the first write, so a failing call
// leaves parameters, state and outputs as they were.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "api/status.h"
#include "api/validate.h"
#include "moe_sft.h"
#include "optim/adamw.h"
#include "runtime/error.h"

// The handle: the optimizer plus the lock that makes each call on it atomic.
struct moe_sft_adamw {
  moe_sft_adamw(const moe_sft::optim::Hyper& h, int threads, std::vector<moe_sft::optim::ParamSpec> params)
      : impl(h, threads, std::move(params)) {}
  moe_sft::optim::AdamW impl;
  mutable std::mutex mutex;
};

using moe_sft::api::enum_value;
using moe_sft::api::guard;
using moe_sft::api::format_number;
using moe_sft::api::invalid;
using moe_sft::api::require_array;
using moe_sft::api::require_non_null;
using moe_sft::optim::Hyper;
using moe_sft::optim::ParamDtype;
using moe_sft::optim::ParamSpec;

namespace {

// The caller's config, as this library's struct: one version so far, so a shorter struct is refused; a
// longer (newer) one is accepted when the fields this library does not know are all zero.
moe_sft_adamw_config read_config(const moe_sft_adamw_config* cfg) {
  require_non_null(cfg, "cfg");
  if (cfg->struct_size == 0)
    invalid("cfg->struct_size = 0: initialize the config with moe_sft_adamw_config_init before setting fields");
  if (cfg->struct_size < sizeof(moe_sft_adamw_config))
    invalid("cfg->struct_size = " + std::to_string(cfg->struct_size) + " is smaller than moe_sft_adamw_config (" +
            std::to_string(sizeof(moe_sft_adamw_config)) + " bytes)");
  moe_sft::api::require_unknown_fields_zero(cfg, cfg->struct_size, sizeof(moe_sft_adamw_config));
  moe_sft_adamw_config out;
  std::memcpy(&out, cfg, sizeof out);
  out.struct_size = sizeof out;
  return out;
}

void require_finite(double x, const char* name) {
  if (!std::isfinite(x)) invalid(std::string(name) + " = " + format_number(x) + " is not finite");
}

void validate_lr(double lr, const char* name) {
  require_finite(lr, name);
  if (lr < 0) invalid(std::string(name) + " = " + format_number(lr) + " is negative (lr >= 0)");
}

void validate_config(const moe_sft_adamw_config& c) {
  validate_lr(c.lr, "cfg->lr");
  const struct {
    double value;
    const char* name;
  } betas[] = {{c.beta1, "cfg->beta1"}, {c.beta2, "cfg->beta2"}};
  for (const auto& b : betas) {
    require_finite(b.value, b.name);
    if (b.value < 0 || b.value >= 1) invalid(std::string(b.name) + " = " + format_number(b.value) + " is out of range [0, 1)");
  }
  require_finite(c.eps, "cfg->eps");
  if (!(c.eps > 0)) invalid("cfg->eps = " + format_number(c.eps) + " must be > 0 (it keeps m / (sqrt(v) + eps) finite)");
  require_finite(c.weight_decay, "cfg->weight_decay");
  if (c.weight_decay < 0) invalid("cfg->weight_decay = " + format_number(c.weight_decay) + " is negative (weight_decay >= 0)");
  require_finite(c.max_grad_norm, "cfg->max_grad_norm");
  if (c.max_grad_norm < 0)
    invalid("cfg->max_grad_norm = " + format_number(c.max_grad_norm) + " is negative (0 = no clipping, > 0 = the norm to clip to)");
  moe_sft::api::require_range(c.num_threads, 0, 4096, "cfg->num_threads");
}

Hyper to_hyper(const moe_sft_adamw_config& c) {
  Hyper h;
  h.lr = c.lr;
  h.beta1 = c.beta1;
  h.beta2 = c.beta2;
  h.eps = c.eps;
  h.weight_decay = c.weight_decay;
  h.max_grad_norm = c.max_grad_norm;
  return h;
}

std::string param_label(int32_t i, const std::string& name) {
  return "params[" + std::to_string(i) + "] (\"" + name + "\")";
}

struct Span {
  uintptr_t begin, end;
  int32_t index;  // a parameter's index, or -1 for the optimizer's own state
};

// The first two spans that share a byte, as (a, b) indices into spans; false if none do.
bool find_overlap(std::vector<Span> spans, Span* a, Span* b) {
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.begin < y.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end) {
      *a = spans[i - 1];
      *b = spans[i];
      return true;
    }
  return false;
}

std::vector<ParamSpec> validate_params(int32_t n_params, const moe_sft_adamw_param* params) {
  if (n_params <= 0) invalid("n_params = " + std::to_string(n_params) + " must be >= 1");
  require_non_null(params, "params");
  std::vector<ParamSpec> specs(static_cast<size_t>(n_params));
  std::vector<Span> spans;
  for (int32_t i = 0; i < n_params; ++i) {
    const moe_sft_adamw_param& p = params[i];
    ParamSpec& s = specs[size_t(i)];
    s.name = p.name != nullptr ? std::string(p.name) : "params[" + std::to_string(i) + "]";
    const std::string label = param_label(i, s.name);
    moe_sft::api::require_dtype(enum_value(p.dtype), (label + ".dtype").c_str());
    if (p.count <= 0 || p.count > moe_sft::api::kMaxElements)
      invalid(label + ".count = " + std::to_string(p.count) + " is out of range [1, 2^50]");
    const int64_t size = p.dtype == MOE_SFT_DTYPE_F32 ? 4 : 2;
    require_array(p.data, (label + ".data").c_str(), p.count, size);
    s.dtype = p.dtype == MOE_SFT_DTYPE_F32 ? ParamDtype::f32 : ParamDtype::bf16;
    s.data = p.data;
    s.count = p.count;
    const uintptr_t b = reinterpret_cast<uintptr_t>(p.data);
    spans.push_back({b, b + uintptr_t(p.count * size), i});
  }
  Span a, b;
  if (find_overlap(spans, &a, &b)) {
    const int32_t lo = std::min(a.index, b.index), hi = std::max(a.index, b.index);
    invalid(param_label(lo, specs[size_t(lo)].name) + ".data and " + param_label(hi, specs[size_t(hi)].name) +
            ".data overlap: each parameter must be its own array (a tensor used twice is one parameter, with "
            "its grads added)");
  }
  return specs;
}

void validate_grads(const moe_sft::optim::AdamW& opt, const float* const* grads) {
  require_non_null(grads, "grads");
  for (int32_t i = 0; i < opt.size(); ++i)
    require_array(grads[i], ("grads[" + std::to_string(i) + "]").c_str(), opt.param(i).count, 4);
  // The grads are read in two passes around the writes, so none may share a byte with what a step writes:
  // the parameters and the optimizer's state (non-overlapping among themselves). Grads may share bytes
  // with each other (they are only read).
  std::vector<Span> written;
  for (int32_t i = 0; i < opt.size(); ++i) {
    const ParamSpec& p = opt.param(i);
    const uintptr_t b = reinterpret_cast<uintptr_t>(p.data);
    written.push_back({b, b + uintptr_t(p.count * (p.dtype == ParamDtype::f32 ? 4 : 2)), i});
  }
  for (const auto& r : opt.state_ranges()) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(r.begin);
    written.push_back({b, b + r.bytes, -1});
  }
  std::sort(written.begin(), written.end(), [](const Span& x, const Span& y) { return x.begin < y.begin; });
  for (int32_t i = 0; i < opt.size(); ++i) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(grads[i]), end = begin + uintptr_t(opt.param(i).count * 4);
    // the last written span starting before `end` is the only one that can overlap [begin, end)
    auto it = std::lower_bound(written.begin(), written.end(), end,
                               [](const Span& s, uintptr_t v) { return s.begin < v; });
    if (it == written.begin() || std::prev(it)->end <= begin) continue;
    const Span& hit = *std::prev(it);
    const std::string what = hit.index < 0 ? std::string("the optimizer's own state (moments or masters)")
                                           : param_label(hit.index, opt.param(hit.index).name) + ".data";
    invalid("grads[" + std::to_string(i) + "] overlaps " + what + ": grads must be arrays of their own");
  }
}

void validate_index(const moe_sft::optim::AdamW& opt, int32_t i) {
  if (i < 0 || i >= opt.size())
    invalid("param_index = " + std::to_string(i) + " is out of range [0, " + std::to_string(opt.size()) + ")");
}

// The first version's report: everything up to step.
constexpr size_t kReportV1 = offsetof(moe_sft_adamw_report, step) + sizeof(int64_t);

}  // namespace

extern "C" {

void moe_sft_adamw_config_init(moe_sft_adamw_config* cfg) {
  if (cfg == nullptr) return;
  std::memset(cfg, 0, sizeof *cfg);
  cfg->struct_size = sizeof *cfg;
  cfg->lr = 1e-3;
  cfg->beta1 = 0.9;
  cfg->beta2 = 0.999;
  cfg->eps = 1e-8;
  cfg->weight_decay = 0.0;
  cfg->max_grad_norm = 0.0;
  cfg->num_threads = 0;
}

moe_sft_status moe_sft_adamw_create(const moe_sft_adamw_config* cfg, int32_t n_params,
                                    const moe_sft_adamw_param* params, moe_sft_adamw** out) {
  if (out != nullptr) *out = nullptr;
  return guard("moe_sft_adamw_create", [&] {
    require_non_null(out, "out");
    const moe_sft_adamw_config c = read_config(cfg);
    validate_config(c);
    std::vector<ParamSpec> specs = validate_params(n_params, params);
    *out = new moe_sft_adamw(to_hyper(c), c.num_threads, std::move(specs));
  });
}

void moe_sft_adamw_destroy(moe_sft_adamw* opt) { delete opt; }

moe_sft_status moe_sft_adamw_step(moe_sft_adamw* opt, const float* const* grads, moe_sft_adamw_report* report) {
  return guard("moe_sft_adamw_step", [&] {
    require_non_null(opt, "opt");
    if (report != nullptr && report->struct_size < kReportV1)
      invalid("report->struct_size = " + std::to_string(report->struct_size) +
              " is smaller than moe_sft_adamw_report (" + std::to_string(kReportV1) +
              " bytes): set it to sizeof(moe_sft_adamw_report)");
    std::lock_guard<std::mutex> lock(opt->mutex);
    validate_grads(opt->impl, grads);
    const moe_sft::optim::StepReport r = opt->impl.step(grads);
    if (report != nullptr) {
      moe_sft_adamw_report out;
      std::memset(&out, 0, sizeof out);
      out.struct_size = report->struct_size;
      out.grad_norm = r.grad_norm;
      out.clip_coef = r.clip_coef;
      out.skipped = r.skipped ? 1 : 0;
      out.bad_param = r.bad_param;
      out.bad_param_name = r.skipped ? opt->impl.param(r.bad_param).name.c_str() : nullptr;
      out.bad_index = r.bad_index;
      out.bad_value = r.skipped ? r.bad_value : 0.0f;
      out.step = r.step;
      std::memcpy(report, &out, std::min(report->struct_size, sizeof out));
    }
  });
}

moe_sft_status moe_sft_adamw_get_config(const moe_sft_adamw* opt, moe_sft_adamw_config* cfg) {
  return guard("moe_sft_adamw_get_config", [&] {
    require_non_null(opt, "opt");
    require_non_null(cfg, "cfg");
    std::lock_guard<std::mutex> lock(opt->mutex);
    const Hyper& h = opt->impl.hyper();
    moe_sft_adamw_config_init(cfg);
    cfg->lr = h.lr;
    cfg->beta1 = h.beta1;
    cfg->beta2 = h.beta2;
    cfg->eps = h.eps;
    cfg->weight_decay = h.weight_decay;
    cfg->max_grad_norm = h.max_grad_norm;
    cfg->num_threads = opt->impl.threads();
  });
}

moe_sft_status moe_sft_adamw_set_config(moe_sft_adamw* opt, const moe_sft_adamw_config* cfg) {
  return guard("moe_sft_adamw_set_config", [&] {
    require_non_null(opt, "opt");
    const moe_sft_adamw_config c = read_config(cfg);
    validate_config(c);
    std::lock_guard<std::mutex> lock(opt->mutex);
    opt->impl.set_hyper(to_hyper(c));
    opt->impl.set_threads(c.num_threads);
  });
}

moe_sft_status moe_sft_adamw_set_lr(moe_sft_adamw* opt, double lr) {
  return guard("moe_sft_adamw_set_lr", [&] {
    require_non_null(opt, "opt");
    validate_lr(lr, "lr");
    std::lock_guard<std::mutex> lock(opt->mutex);
    Hyper h = opt->impl.hyper();
    h.lr = lr;
    opt->impl.set_hyper(h);
  });
}

moe_sft_status moe_sft_adamw_get_step(const moe_sft_adamw* opt, int64_t* step) {
  return guard("moe_sft_adamw_get_step", [&] {
    require_non_null(opt, "opt");
    require_non_null(step, "step");
    std::lock_guard<std::mutex> lock(opt->mutex);
    *step = opt->impl.step_count();
  });
}

moe_sft_status moe_sft_adamw_set_step(moe_sft_adamw* opt, int64_t step) {
  return guard("moe_sft_adamw_set_step", [&] {
    require_non_null(opt, "opt");
    if (step < 0) invalid("step = " + std::to_string(step) + " is negative (step >= 0)");
    std::lock_guard<std::mutex> lock(opt->mutex);
    opt->impl.set_step_count(step);
  });
}

moe_sft_status moe_sft_adamw_num_params(const moe_sft_adamw* opt, int32_t* n_params) {
  return guard("moe_sft_adamw_num_params", [&] {
    require_non_null(opt, "opt");
    require_non_null(n_params, "n_params");
    *n_params = opt->impl.size();  // fixed at create
  });
}

moe_sft_status moe_sft_adamw_param_info(const moe_sft_adamw* opt, int32_t param_index, moe_sft_adamw_param* param) {
  return guard("moe_sft_adamw_param_info", [&] {
    require_non_null(opt, "opt");
    require_non_null(param, "param");
    validate_index(opt->impl, param_index);
    const ParamSpec& p = opt->impl.param(param_index);  // fixed at create
    param->name = p.name.c_str();
    param->dtype = p.dtype == ParamDtype::f32 ? MOE_SFT_DTYPE_F32 : MOE_SFT_DTYPE_BF16;
    param->data = p.data;
    param->count = p.count;
  });
}

moe_sft_status moe_sft_adamw_state(moe_sft_adamw* opt, int32_t param_index, float** m, float** v, float** master,
                                   int64_t* step) {
  return guard("moe_sft_adamw_state", [&] {
    require_non_null(opt, "opt");
    validate_index(opt->impl, param_index);
    std::lock_guard<std::mutex> lock(opt->mutex);
    if (m != nullptr) *m = opt->impl.m(param_index);
    if (v != nullptr) *v = opt->impl.v(param_index);
    if (master != nullptr) *master = opt->impl.master(param_index);
    if (step != nullptr) *step = opt->impl.step_count();
  });
}

}  // extern "C"
