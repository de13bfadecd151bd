// The gated activations h = act(g, u) and their derivatives: the scalar definitions every kernel family's
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

// The SiLU-gated activation as a functor (the shape activation_rows.h's row loops take).
struct SiluGated {
  float operator()(float g, float u) const { return activation(g, u); }
  ActivationGrad grad(float g, float u, float dh) const { return activation_grad(g, u, dh); }
};

// gpt-oss's clamped SwiGLU: gate = min(g, limit), up = clamp(u, -limit, limit),
// h = (up + 1) · gate · sigmoid(alpha · gate). The comparisons are written so that a NaN passes through (as
// torch.clamp lets it), and a clamp that is active stops its gradient; at equality the gradient passes (torch's
// clamp backward: x <= max, x >= min).
struct ClampedSwiGlu {
  float alpha, limit;

  float clamp_gate(float g) const { return g > limit ? limit : g; }
  float clamp_up(float u) const { return u > limit ? limit : u < -limit ? -limit : u; }
  float operator()(float g, float u) const {
    const float gate = clamp_gate(g);
    return (clamp_up(u) + 1.0f) * (gate * sigmoid(alpha * gate));
  }
  // d glu / d gate = s + alpha · gate · s (1 - s) with s = sigmoid(alpha · gate), glu = gate · s.
  ActivationGrad grad(float g, float u, float dh) const {
    const float gate = clamp_gate(g), up = clamp_up(u);
    const float s = sigmoid(alpha * gate), glu = gate * s;
    const float dglu = s * (1.0f + alpha * gate * (1.0f - s));
    return {g > limit ? 0.0f : dh * (up + 1.0f) * dglu, u > limit || u < -limit ? 0.0f : dh * glu};
  }
};

// Which activation a layer runs, with its parameters (moe_sft_activation).
enum class ActivationKind { silu, swiglu_clamped };
struct ActivationParams {
  ActivationKind kind = ActivationKind::silu;
  float alpha = 0.0f, limit = 0.0f;  // swiglu_clamped's
};

}  // namespace moe_sft::kernels
