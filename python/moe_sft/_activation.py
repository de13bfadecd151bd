"""A layer's activation and frozen biases (moe_sft_activation and the bias fields of moe_sft_config), and gpt-oss's
expert layout turned into the library's.

gpt-oss (transformers' GptOssExperts) stores, per layer, all experts stacked:
    gate_up_proj [E, H, 2I]   transposed (x @ gate_up_proj[e]) with gate and up interleaved: gate = columns 0::2,
                              up = columns 1::2
    gate_up_proj_bias [E, 2I] interleaved the same way
    down_proj [E, I, H]       transposed (h @ down_proj[e])
    down_proj_bias [E, H]
and computes out = sum_j w_j ((up + 1) · gate · sigmoid(alpha · gate) @ down_proj[e] + down_proj_bias[e]) with
gate = min(g, limit), up = clamp(u, -limit, limit): the library's SWIGLU_CLAMPED with gate_proj = gate_up_proj[e,
:, 0::2]^T [I, H], up_proj = gate_up_proj[e, :, 1::2]^T, down_proj = down_proj[e]^T [H, I] and the biases' halves.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._arrays import _as_bf16, _check_shape, bfloat16, enum_codes
from ._errors import invalid

GPT_OSS_ALPHA = 1.702  # transformers' GptOssExperts: self.alpha = config.swiglu_alpha (1.702 in every release)
GPT_OSS_LIMIT = 7.0  # config.json's swiglu_limit in the released gpt-oss-20b / 120b


@dataclass(frozen=True)
class Activation:
    """``name`` ("silu" or "swiglu_clamped") with swiglu_clamped's ``alpha`` and ``limit`` (None for silu)."""

    name: str = "silu"
    alpha: Optional[float] = None
    limit: Optional[float] = None

    def create_kwargs(self):
        """The backends' create() arguments for it."""
        return {"activation": enum_codes("activation")[self.name], "swiglu_alpha": self.alpha,
                "swiglu_limit": self.limit}


def activation(name, swiglu_alpha, swiglu_limit):
    """The Activation MoESFT(activation=, swiglu_alpha=, swiglu_limit=) asks for: swiglu_clamped's parameters default
    to gpt-oss's (1.702, 7.0) and must be finite and > 0 as float32; silu takes none."""
    codes = enum_codes("activation")
    if not isinstance(name, str) or name not in codes:
        raise invalid(f"activation = {name!r}; expected one of {', '.join(map(repr, codes))}")
    given = {"swiglu_alpha": swiglu_alpha, "swiglu_limit": swiglu_limit}
    if name == "silu":
        extra = [n for n, v in given.items() if v is not None]
        if extra:
            raise invalid(f"{extra[0]} = {given[extra[0]]!r} is given but activation = 'silu' does not read it "
                          "(activation='swiglu_clamped' is gpt-oss's)")
        return Activation()
    values = {}
    for n, v in given.items():
        if v is None:
            v = GPT_OSS_ALPHA if n == "swiglu_alpha" else GPT_OSS_LIMIT
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise invalid(f"{n} = {v!r} is not a number")
        as_float = float(v)
        if not (math.isfinite(as_float) and 0 < as_float <= float(np.finfo(np.float32).max)):
            raise invalid(f"{n} = {v!r}: the clamped SwiGLU needs a finite float32 > 0 (gpt-oss: swiglu_alpha "
                          f"{GPT_OSS_ALPHA}, swiglu_limit {GPT_OSS_LIMIT})")
        values[n] = as_float
    return Activation("swiglu_clamped", values["swiglu_alpha"], values["swiglu_limit"])


def bias(a, name, shape):
    """A frozen bias as the library copies it: float32 [shape], C-contiguous (bf16, uint16 as bf16 bits, f16 and f64
    converted: the values the layer adds), or None."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype == np.uint16:
        a = a.view(bfloat16)
    if a.dtype != bfloat16 and a.dtype.kind != "f":
        raise invalid(f"{name} has dtype {a.dtype}; expected a float type, bfloat16 or uint16 (bf16 bits)")
    _check_shape(a, name, shape)
    return np.ascontiguousarray(a, dtype=np.float32)


def biases(gate_bias, up_bias, down_bias, experts, hidden, intermediate):
    """The backends' create() bias arguments: gate_bias, up_bias [E, I] and down_bias [E, H] as float32, or None."""
    return {"gate_bias": bias(gate_bias, "gate_bias", (experts, intermediate)),
            "up_bias": bias(up_bias, "up_bias", (experts, intermediate)),
            "down_bias": bias(down_bias, "down_bias", (experts, hidden))}


def split_gate_up(a):
    """gpt-oss's interleaved [.., 2I] (a bias) as its gate and up halves [.., I], C-contiguous."""
    return np.ascontiguousarray(a[..., 0::2]), np.ascontiguousarray(a[..., 1::2])


def _shape_error(name, a, expected):
    return invalid(f"{name} has shape {tuple(np.shape(a))}; expected {expected} (gpt-oss's layout)")


def _mxfp4(q, name):
    """An MXFP4 QuantizedWeight of gpt-oss's rows [E, N, ...]: (weights as [E, N, K/2], scale [E, N, K/32])."""
    weights, scale = np.asarray(q.weights), np.asarray(q.scale)
    if q.weight_format != "mxfp4":
        raise invalid(f"{name}.weight_format = {q.weight_format!r}; gpt-oss's quantized experts are 'mxfp4'")
    if weights.ndim == 4 and weights.shape[-1] == 16:  # the checkpoint's *_blocks [E, N, K/32, 16]
        weights = weights.reshape(weights.shape[:2] + (-1,))
    if weights.ndim != 3 or weights.dtype != np.uint8 or scale.shape != weights.shape[:2] + (weights.shape[2] // 16,):
        raise invalid(f"{name} has weights {weights.dtype} {weights.shape} and scale {scale.dtype} {scale.shape}; "
                      "expected uint8 [E, N, K/2] (or *_blocks [E, N, K/32, 16]) and uint8 [E, N, K/32]")
    return weights, scale


def gpt_oss_mxfp4(gate_up_proj, down_proj):
    """gpt-oss's MXFP4 experts (QuantizedWeight "mxfp4", in the checkpoint's orientation: rows are outputs,
    gate_up_proj [E, 2I, H/2] with gate and up rows interleaved, down_proj [E, H, I/2]) as the library's gate, up
    and down QuantizedWeight: the rows are de-interleaved in the quantized bytes (a copy of 0.27x the bf16 size;
    nothing is dequantized)."""
    from ._quantize import QuantizedWeight
    gu_w, gu_s = _mxfp4(gate_up_proj, "gate_up_proj")
    dn_w, dn_s = _mxfp4(down_proj, "down_proj")
    E, I2, H = gu_w.shape[0], gu_w.shape[1], gu_w.shape[2] * 2
    if I2 % 2 or dn_w.shape != (E, H, I2 // 4):
        raise invalid(f"gate_up_proj has weights {gu_w.shape} and down_proj {dn_w.shape}; expected [E, 2I, H/2] and "
                      f"[E, H, I/2] (gpt-oss's MXFP4 rows)")
    gate, up = (QuantizedWeight("mxfp4", 32, *(np.ascontiguousarray(a[:, rows]) for a in (gu_w, gu_s)), None)
                for rows in (slice(0, None, 2), slice(1, None, 2)))
    return {"gate_proj": gate, "up_proj": up, "down_proj": QuantizedWeight("mxfp4", 32, dn_w, dn_s, None)}, (E, H, I2 // 2)


def gpt_oss_arrays(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias):
    """gpt-oss's experts in the library's layout: {gate_proj, up_proj [E, I, H], down_proj [E, H, I], gate_bias,
    up_bias [E, I], down_bias [E, H] (float32, None where gpt-oss's bias is None)}, and whether the projections are
    quantized. bf16 / float: gate_up_proj [E, H, 2I] is de-interleaved (gate = columns 0::2, up = 1::2) and
    transposed, down_proj [E, I, H] transposed: each passes through one bf16 copy (the layer's bf16 bytes) before
    MoESFT packs it. MXFP4 (QuantizedWeight): see gpt_oss_mxfp4."""
    if hasattr(gate_up_proj, "weight_format"):
        out, (E, H, I) = gpt_oss_mxfp4(gate_up_proj, down_proj)
        quantized = True
    else:
        gu = np.asarray(gate_up_proj)
        if gu.ndim != 3 or gu.shape[2] % 2:
            raise _shape_error("gate_up_proj", gu, "[experts, hidden, 2 * intermediate]")
        E, H, I = gu.shape[0], gu.shape[1], gu.shape[2] // 2
        dn = np.asarray(down_proj)
        if dn.shape != (E, I, H):
            raise _shape_error("down_proj", dn, f"[experts, intermediate, hidden] = {(E, I, H)} (from gate_up_proj)")
        out = {"gate_proj": _as_bf16(gu[:, :, 0::2].transpose(0, 2, 1), "gate_up_proj"),
               "up_proj": _as_bf16(gu[:, :, 1::2].transpose(0, 2, 1), "gate_up_proj"),
               "down_proj": _as_bf16(dn.transpose(0, 2, 1), "down_proj")}
        quantized = False
    gate_bias = up_bias = None
    if gate_up_proj_bias is not None:
        gate_bias, up_bias = split_gate_up(bias(gate_up_proj_bias, "gate_up_proj_bias", (E, 2 * I)))
    out.update(gate_bias=gate_bias, up_bias=up_bias,
               down_bias=bias(down_proj_bias, "down_proj_bias", (E, H)))
    return out, quantized
