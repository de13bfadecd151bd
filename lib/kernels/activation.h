// SiLU-gated activation h = silu(g) * u and its derivative: the scalar definition every kernel family's
// activation rows follow (backward recomputes h from the saved g and u, so both must round alike).
#pragma once
#include <cmath>

namespace moe_sft::kernels {

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

struct ActivationGrad {
  float gate, up;
};

// h = silu(g) * u.
inline float activation(float g, float u) { return g * sigmoid(g) * u; }

// Grads of h = silu(g) * u given dh: d/dg silu(g) = s (1 + g (1 - s)) with s = sigmoid(g).
inline ActivationGrad activation_grad(float g, float u, float dh) {
  const float s = sigmoid(g);
  return {dh * u * s * (1.0f + g * (1.0f - s)), dh * g * s};
}

}  // namespace moe_sft::kernels
