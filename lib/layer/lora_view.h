// The six LoRA arrays of all experts, and typed per-expert views of them (never copied: read in place at
// every call, so an optimizer's in-place update is always seen). Every slice is taken from the full arrays
// with their full strides; a tensor-parallel part only offsets into them. The grads use the same view.
#pragma once
#include <array>
#include <cstdint>

#include "runtime/bf16.h"

namespace moe_sft::layer {

struct LoraShape {
  int64_t hidden, intermediate, rank;
};

// The six arrays, in this order everywhere (the ABI's order).
enum LoraArray : int { kGateA, kGateB, kUpA, kUpB, kDownA, kDownB };
constexpr int kLoraArrays = 6;

// Each array is [E, rows, cols]: A of gate/up [r, H], B of gate/up [I, r], A of down [r, I], B of down
// [H, r]. The one table every loop over "all six" (checks, zeroing, staging, the views' strides) reads.
struct LoraArrayDims {
  const char* name;
  int64_t rows, cols;
  int64_t per_expert() const { return rows * cols; }
};
inline std::array<LoraArrayDims, kLoraArrays> lora_array_dims(const LoraShape& s) {
  return {{{"gate_a", s.rank, s.hidden},
           {"gate_b", s.intermediate, s.rank},
           {"up_a", s.rank, s.hidden},
           {"up_b", s.intermediate, s.rank},
           {"down_a", s.rank, s.intermediate},
           {"down_b", s.hidden, s.rank}}};
}

// The adapters as the caller bound them, before their dtype is known to the code that reads them.
enum class LoraDtype { bf16, f32 };
struct LoraBinding {
  LoraDtype dtype = LoraDtype::f32;
  std::array<const void*, kLoraArrays> arrays{};
};
// The caller's f32 grad arrays, in LoraArray order.
using LoraGradArrays = std::array<float*, kLoraArrays>;

// Per-expert view of six arrays: Elem = const bf16 or const float (the adapters), float (their grads).
// rank 0 with null arrays is the view of a base-only pass.
template <class Elem>
struct LoraArraysView {
  std::array<Elem*, kLoraArrays> arrays{};
  std::array<int64_t, kLoraArrays> per_expert{};
  int64_t rank = 0;

  LoraArraysView() = default;
  LoraArraysView(const std::array<Elem*, kLoraArrays>& a, const LoraShape& s) : arrays(a), rank(s.rank) {
    const auto dims = lora_array_dims(s);
    for (int i = 0; i < kLoraArrays; ++i) per_expert[size_t(i)] = dims[size_t(i)].per_expert();
  }

  Elem* of(LoraArray which, int64_t expert) const { return arrays[which] + expert * per_expert[which]; }
  Elem* gate_a(int64_t e) const { return of(kGateA, e); }
  Elem* gate_b(int64_t e) const { return of(kGateB, e); }
  Elem* up_a(int64_t e) const { return of(kUpA, e); }
  Elem* up_b(int64_t e) const { return of(kUpB, e); }
  Elem* down_a(int64_t e) const { return of(kDownA, e); }
  Elem* down_b(int64_t e) const { return of(kDownB, e); }
};
template <class T>
using LoraView = LoraArraysView<const T>;
using LoraGradView = LoraArraysView<float>;

// Calls fn(LoraView<T>) with T = bf16 or float according to the bound dtype.
template <class Fn>
void with_lora_view(const LoraBinding& binding, const LoraShape& shape, Fn&& fn) {
  auto typed = [&](auto element) {
    using T = decltype(element);
    std::array<const T*, kLoraArrays> arrays;
    for (int i = 0; i < kLoraArrays; ++i) arrays[size_t(i)] = static_cast<const T*>(binding.arrays[size_t(i)]);
    fn(LoraView<T>(arrays, shape));
  };
  if (binding.dtype == LoraDtype::bf16)
    typed(bf16{});
  else
    typed(float{});
}

}  // namespace moe_sft::layer
