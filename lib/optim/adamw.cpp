#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "runtime/bf16_arrays.h"
#include "runtime/runtime.h"

namespace moe_sft::optim {

namespace {

// Elements per task: 16 Ki, i.e. 64 KiB of each f32 stream; a DeepSeek-V2-Lite layer's LoRA (10.6 M
// elements) makes ~650 tasks, enough for work stealing to even out the cores.
constexpr int64_t kChunk = int64_t(1) << 14;
constexpr int64_t kAlignFloats = 16;  // 64 bytes

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

float* allocate(int64_t n) {
  if (n == 0) return nullptr;
  return static_cast<float*>(::operator new(size_t(n) * sizeof(float), std::align_val_t(64)));
}

// ---- pass 1: sum of squares of one chunk of grads -------------------------------------------------------

// In double, with 8 independent lanes (vectorizes without reassociation flags). Squares of f32 values cannot
// overflow a double (at most 1.2e77 each, 2^50 elements), so the sum is finite exactly when every grad is,
// and it is accurate to double rounding; the conversions and adds cost nothing next to the memory stream.
template <int Dummy>
inline __attribute__((always_inline)) double sum_squares_loop(const float* __restrict g, int64_t n) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += double(g[i + l]) * double(g[i + l]);
  for (; i < n; ++i) acc[0] += double(g[i]) * double(g[i]);
  double s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// ---- pass 2: the update ---------------------------------------------------------------------------------

// The step's scalars, each rounded to f32 as torch rounds a Python float scalar for an f32 tensor.
struct StepScalars {
  float clip;        // grads are read as g * clip
  float decay;       // 1 - lr * weight_decay
  float w1;          // 1 - beta1: exp_avg.lerp_(grad, 1 - beta1)
  bool w1_small;     // |w1| < 0.5: lerp's two formulas, as torch picks them
  float beta2, c2;   // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value = 1 - beta2)
  float bc2_sqrt;    // sqrt(1 - beta2^t)
  float eps;
  float neg_step;    // -lr / (1 - beta1^t)
};

// One element, exactly torch.optim.AdamW's single-tensor sequence of f32 operations:
//   p *= 1 - lr wd;  m = lerp(m, g, 1 - b1);  v = v b2 + (1 - b2) g g;
//   p += -step_size * m / (sqrt(v) / sqrt(bc2) + eps)
inline __attribute__((always_inline)) float update_one(float p, float graw, float& m_io, float& v_io,
                                                       const StepScalars& s) {
  const float g = graw * s.clip;
  p = p * s.decay;
  const float m0 = m_io;
  const float m = s.w1_small ? m0 + s.w1 * (g - m0) : g - (g - m0) * (1.0f - s.w1);
  const float v = v_io * s.beta2 + s.c2 * g * g;
  const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
  m_io = m;
  v_io = v;
  return p + s.neg_step * m / denom;
}

template <int Dummy>
inline __attribute__((always_inline)) void update_f32_loop(float* __restrict p, const float* __restrict g,
                                                           float* __restrict m, float* __restrict v, int64_t n,
                                                           const StepScalars& s) {
  const StepScalars k = s;
  for (int64_t i = 0; i < n; ++i) p[i] = update_one(p[i], g[i], m[i], v[i], k);
}

template <int Dummy>
inline __attribute__((always_inline)) void update_bf16_loop(float* __restrict master, uint16_t* __restrict p,
                                                            const float* __restrict g, float* __restrict m,
                                                            float* __restrict v, int64_t n, const StepScalars& s) {
  const StepScalars k = s;
  for (int64_t i = 0; i < n; ++i) {
    const float x = update_one(master[i], g[i], m[i], v[i], k);
    master[i] = x;
    uint32_t u;
    std::memcpy(&u, &x, 4);
    p[i] = bf16_bits_rne(u);
  }
}

// The same loops built for AVX2 (no FMA: contraction would change the rounding between machines) and for
// the baseline; the results are bit-identical, only the vector width differs.
__attribute__((target("avx2"))) double sum_squares_avx2(const float* g, int64_t n) { return sum_squares_loop<0>(g, n); }
__attribute__((target("avx2"))) void update_f32_avx2(float* p, const float* g, float* m, float* v, int64_t n,
                                                     const StepScalars& s) {
  update_f32_loop<0>(p, g, m, v, n, s);
}
__attribute__((target("avx2"))) void update_bf16_avx2(float* master, uint16_t* p, const float* g, float* m, float* v,
                                                      int64_t n, const StepScalars& s) {
  update_bf16_loop<0>(master, p, g, m, v, n, s);
}
double sum_squares_generic(const float* g, int64_t n) { return sum_squares_loop<0>(g, n); }
void update_f32_generic(float* p, const float* g, float* m, float* v, int64_t n, const StepScalars& s) {
  update_f32_loop<0>(p, g, m, v, n, s);
}
void update_bf16_generic(float* master, uint16_t* p, const float* g, float* m, float* v, int64_t n,
                         const StepScalars& s) {
  update_bf16_loop<0>(master, p, g, m, v, n, s);
}

struct Kernels {
  double (*sum_squares)(const float*, int64_t);
  void (*update_f32)(float*, const float*, float*, float*, int64_t, const StepScalars&);
  void (*update_bf16)(float*, uint16_t*, const float*, float*, float*, int64_t, const StepScalars&);
};

const Kernels& kernels() {
  static const Kernels k = cpu_has_avx2() ? Kernels{sum_squares_avx2, update_f32_avx2, update_bf16_avx2}
                                          : Kernels{sum_squares_generic, update_f32_generic, update_bf16_generic};
  return k;
}

// The index of the first NaN/Inf in g[0, n), or -1.
int64_t first_non_finite(const float* g, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(g[i])) return i;
  return -1;
}

}  // namespace

void AdamW::AlignedFree::operator()(float* p) const { ::operator delete(p, std::align_val_t(64)); }

AdamW::AdamW(const Hyper& hyper, int threads, std::vector<ParamSpec> params)
    : hyper_(hyper), threads_(threads), params_(std::move(params)) {
  offset_.resize(params_.size());
  master_offset_.assign(params_.size(), -1);
  for (size_t i = 0; i < params_.size(); ++i) {
    offset_[i] = total_;
    total_ += round_up(params_[i].count, kAlignFloats);
    if (params_[i].dtype == ParamDtype::bf16) {
      master_offset_[i] = master_total_;
      master_total_ += round_up(params_[i].count, kAlignFloats);
    }
    for (int64_t b = 0; b < params_[i].count; b += kChunk)
      chunks_.push_back({int32_t(i), b, std::min(params_[i].count, b + kChunk)});
  }
  chunk_sums_.resize(chunks_.size());
  chunk_bad_.resize(chunks_.size());
  m_ = Buffer(allocate(total_));
  v_ = Buffer(allocate(total_));
  master_ = Buffer(allocate(master_total_));
  // First touch on the pool's workers (their NUMA nodes), chunk by chunk as the steps will run.
  auto session = Runtime::instance().session(resolved_threads());
  session.pool().parallel_for(int64_t(chunks_.size()), resolved_threads(), [&](int64_t c, int) {
    const Chunk& ch = chunks_[size_t(c)];
    const int64_t n = ch.end - ch.begin;
    std::memset(m(ch.param) + ch.begin, 0, size_t(n) * sizeof(float));
    std::memset(v(ch.param) + ch.begin, 0, size_t(n) * sizeof(float));
    if (float* w = master(ch.param))
      bf16_to_f32_array(static_cast<const uint16_t*>(params_[size_t(ch.param)].data) + ch.begin, w + ch.begin, n);
  });
}

AdamW::~AdamW() = default;

int AdamW::resolved_threads() const { return Runtime::resolve_threads(threads_); }

std::vector<AdamW::Range> AdamW::state_ranges() const {
  std::vector<Range> r;
  if (total_ > 0) {
    r.push_back({m_.get(), size_t(total_) * sizeof(float)});
    r.push_back({v_.get(), size_t(total_) * sizeof(float)});
  }
  if (master_total_ > 0) r.push_back({master_.get(), size_t(master_total_) * sizeof(float)});
  return r;
}

StepReport AdamW::step(const float* const* grads) {
  const Kernels& k = kernels();
  const int threads = resolved_threads();
  auto session = Runtime::instance().session(threads);
  ThreadPool& pool = session.pool();
  const int64_t n_chunks = int64_t(chunks_.size());

  // Pass 1: per-chunk sums of squares; a non-finite sum means a NaN/Inf grad in the chunk, found here.
  pool.parallel_for(n_chunks, threads, [&](int64_t c, int) {
    const Chunk& ch = chunks_[size_t(c)];
    const float* g = grads[ch.param] + ch.begin;
    const double s = k.sum_squares(g, ch.end - ch.begin);
    chunk_sums_[size_t(c)] = s;
    chunk_bad_[size_t(c)] = -1;
    if (!std::isfinite(s)) chunk_bad_[size_t(c)] = ch.begin + first_non_finite(g, ch.end - ch.begin);
  });
  double total = 0;
  for (double s : chunk_sums_) total += s;

  StepReport report;
  report.grad_norm = std::sqrt(total);
  for (size_t c = 0; c < chunks_.size(); ++c) {
    if (chunk_bad_[c] < 0) continue;
    report.skipped = true;
    report.bad_param = chunks_[c].param;
    report.bad_index = chunk_bad_[c];
    report.bad_value = grads[chunks_[c].param][chunk_bad_[c]];
    report.step = step_;
    return report;  // nothing written
  }

  double clip = 1.0;
  if (hyper_.max_grad_norm > 0) {  // torch.nn.utils.clip_grad_norm_
    const double coef = hyper_.max_grad_norm / (report.grad_norm + 1e-6);
    if (coef < 1.0) clip = coef;
  }
  report.clip_coef = clip;

  const int64_t t = step_ + 1;
  const Hyper& h = hyper_;
  StepScalars s;
  s.clip = float(clip);
  s.decay = float(1.0 - h.lr * h.weight_decay);
  s.w1 = float(1.0 - h.beta1);
  s.w1_small = std::fabs(s.w1) < 0.5f;
  s.beta2 = float(h.beta2);
  s.c2 = float(1.0 - h.beta2);
  s.bc2_sqrt = float(std::sqrt(1.0 - std::pow(h.beta2, double(t))));
  s.eps = float(h.eps);
  s.neg_step = float(-(h.lr / (1.0 - std::pow(h.beta1, double(t)))));

  // Pass 2, over the chunks in reverse: the grads pass 1 read last are the likeliest still in cache.
  pool.parallel_for(n_chunks, threads, [&](int64_t task, int) {
    const Chunk& ch = chunks_[size_t(n_chunks - 1 - task)];
    const ParamSpec& p = params_[size_t(ch.param)];
    const int64_t n = ch.end - ch.begin;
    const float* g = grads[ch.param] + ch.begin;
    float* mm = m(ch.param) + ch.begin;
    float* vv = v(ch.param) + ch.begin;
    if (p.dtype == ParamDtype::f32)
      k.update_f32(static_cast<float*>(p.data) + ch.begin, g, mm, vv, n, s);
    else
      k.update_bf16(master(ch.param) + ch.begin, static_cast<uint16_t*>(p.data) + ch.begin, g, mm, vv, n, s);
  });
  step_ = t;
  report.step = t;
  return report;
}

}  // namespace moe_sft::optim
