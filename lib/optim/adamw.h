// AdamW (torch.optim.AdamW's update, decoupled weight decay, bias correction) over a fixed set of flat
// tensors, f32 or bf16, with global grad-norm clipping and a non-finite guard. It knows nothing about MoE
// layers or files: a parameter is a name, a dtype, a pointer and an element count.
//
// State: f32 first and second moments per element and, for a bf16 parameter, an f32 master copy. A bf16
// parameter is updated in the master and then written as the master rounded to nearest even: bf16 keeps 8
// bits of mantissa, so an update smaller than half a unit in the last place of the weight (|lr * m / denom|
// < 2^-9 |p|, the usual case late in training) would round back to the old value every step and the
// parameter would never move; the master accumulates them.
//
// A step is two passes over the chunks of all tensors on the runtime's worker pool: the sum of squares of
// every chunk's grads in double (which also finds NaN/Inf: a finite sum means finite grads), then, if nothing is
// non-finite, the update with the clipping factor. Per-chunk sums are added in chunk order, so the norm and
// the update do not depend on the number of threads. Not thread-safe: the ABI handle serializes calls.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe_sft::optim {

enum class ParamDtype { f32, bf16 };

struct Hyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 0.0;  // 0 = no clipping
};

struct ParamSpec {
  std::string name;
  ParamDtype dtype = ParamDtype::f32;
  void* data = nullptr;  // float* or uint16_t* (bf16 bits), updated in place
  int64_t count = 0;
};

struct StepReport {
  double grad_norm = 0;   // global L2 norm of all grads, before clipping (NaN/Inf if some grad is)
  double clip_coef = 1;   // the factor the grads were read with (1 = not clipped)
  bool skipped = false;   // a grad was NaN/Inf: nothing changed
  int32_t bad_param = -1; // the first such grad: tensor index, element index, value
  int64_t bad_index = -1;
  float bad_value = 0;
  int64_t step = 0;       // the step count after this step
};

class AdamW {
 public:
  // threads: 0 = the runtime's default (all cores). Allocates and zeroes the moments, copies bf16
  // parameters into their masters. Throws std::bad_alloc.
  AdamW(const Hyper& hyper, int threads, std::vector<ParamSpec> params);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // grads[i]: param(i).count floats each.
  StepReport step(const float* const* grads);

  const Hyper& hyper() const { return hyper_; }
  void set_hyper(const Hyper& hyper) { hyper_ = hyper; }
  int threads() const { return threads_; }  // as configured (0 = default)
  void set_threads(int threads) { threads_ = threads; }
  int64_t step_count() const { return step_; }
  void set_step_count(int64_t step) { step_ = step; }

  int32_t size() const { return int32_t(params_.size()); }
  const ParamSpec& param(int32_t i) const { return params_[size_t(i)]; }
  float* m(int32_t i) { return m_.get() + offset_[size_t(i)]; }
  float* v(int32_t i) { return v_.get() + offset_[size_t(i)]; }
  float* master(int32_t i) {  // nullptr for an f32 parameter
    return params_[size_t(i)].dtype == ParamDtype::bf16 ? master_.get() + master_offset_[size_t(i)] : nullptr;
  }
  // Byte ranges of the optimizer's own arrays (the ABI refuses grads that overlap them).
  struct Range {
    const void* begin;
    size_t bytes;
  };
  std::vector<Range> state_ranges() const;

 private:
  struct Chunk {
    int32_t param;
    int64_t begin, end;
  };
  struct AlignedFree {
    void operator()(float* p) const;
  };
  using Buffer = std::unique_ptr<float[], AlignedFree>;

  int resolved_threads() const;

  Hyper hyper_;
  int threads_;
  int64_t step_ = 0;
  std::vector<ParamSpec> params_;
  std::vector<int64_t> offset_, master_offset_;  // each tensor's start in m_/v_ and master_ (64-byte aligned)
  int64_t total_ = 0, master_total_ = 0;
  Buffer m_, v_, master_;
  std::vector<Chunk> chunks_;
  std::vector<double> chunk_sums_;     // pass 1 results, one per chunk
  std::vector<int64_t> chunk_bad_;     // first non-finite element of a chunk (absolute index), or -1
};

}  // namespace moe_sft::optim
