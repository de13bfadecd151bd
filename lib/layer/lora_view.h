// Typed, per-expert view of the caller's six LoRA arrays (never copied: read in place at every call, so an
// optimizer's in-place update is always seen). Every slice is taken from the full arrays with their full
// strides; a tensor-parallel part only offsets into them.
#pragma once
#include <array>
#include <cstdint>

#include "moe_sft.h"
#include "runtime/bf16.h"

namespace moe_sft::layer {

struct LoraShape {
  int64_t hidden, intermediate, rank;
};

// The six arrays in ABI order, each [E, rows, cols]: A of gate/up [r, H], B of gate/up [I, r], A of down
// [r, I], B of down [H, r]. The one table every loop over "all six" (checks, zeroing, staging) reads.
struct LoraArrayDims {
  const char* name;
  int64_t rows, cols;
  int64_t per_expert() const { return rows * cols; }
};
inline std::array<LoraArrayDims, 6> lora_array_dims(const LoraShape& s) {
  return {{{"gate_a", s.rank, s.hidden},
           {"gate_b", s.intermediate, s.rank},
           {"up_a", s.rank, s.hidden},
           {"up_b", s.intermediate, s.rank},
           {"down_a", s.rank, s.intermediate},
           {"down_b", s.hidden, s.rank}}};
}

template <class T>
struct LoraView {
  const T *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;
  LoraShape s;

  // A of gate/up: [r, H]; B of gate/up: [I, r]; A of down: [r, I]; B of down: [H, r].
  const T* ga(int64_t e) const { return gate_a + e * s.rank * s.hidden; }
  const T* ua(int64_t e) const { return up_a + e * s.rank * s.hidden; }
  const T* gb(int64_t e) const { return gate_b + e * s.intermediate * s.rank; }
  const T* ub(int64_t e) const { return up_b + e * s.intermediate * s.rank; }
  const T* da(int64_t e) const { return down_a + e * s.rank * s.intermediate; }
  const T* db(int64_t e) const { return down_b + e * s.hidden * s.rank; }
  std::array<const T*, 6> arrays() const { return {gate_a, gate_b, up_a, up_b, down_a, down_b}; }
};

// The grads, same shapes as the arrays (f32).
struct LoraGradView {
  float *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;
  LoraShape s;

  float* ga(int64_t e) const { return gate_a + e * s.rank * s.hidden; }
  float* ua(int64_t e) const { return up_a + e * s.rank * s.hidden; }
  float* gb(int64_t e) const { return gate_b + e * s.intermediate * s.rank; }
  float* ub(int64_t e) const { return up_b + e * s.intermediate * s.rank; }
  float* da(int64_t e) const { return down_a + e * s.rank * s.intermediate; }
  float* db(int64_t e) const { return down_b + e * s.hidden * s.rank; }
  std::array<float*, 6> arrays() const { return {gate_a, gate_b, up_a, up_b, down_a, down_b}; }
};

template <class T>
LoraView<T> typed_view(const moe_sft_lora& l, LoraShape s) {
  return LoraView<T>{static_cast<const T*>(l.gate_a), static_cast<const T*>(l.gate_b),
                     static_cast<const T*>(l.up_a),   static_cast<const T*>(l.up_b),
                     static_cast<const T*>(l.down_a), static_cast<const T*>(l.down_b), s};
}

// Calls fn(LoraView<T>) with T = bf16 or float according to the bound dtype.
template <class Fn>
void with_lora_view(const moe_sft_lora& l, LoraShape s, Fn&& fn) {
  if (l.dtype == MOE_SFT_DTYPE_BF16)
    fn(typed_view<bf16>(l, s));
  else
    fn(typed_view<float>(l, s));
}

}  // namespace moe_sft::layer
