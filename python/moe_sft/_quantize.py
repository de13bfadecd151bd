"""Quantized base weights (moe_sft_weight_format in moe_sft.h): the formats' layouts, moe_sft.quantize, and the
checks of the pre-quantized arrays MoESFT.from_quantized packs."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from . import _backend
from ._arrays import _as_bf16, _bits, _check, _check_shape, bfloat16, enum_codes
from ._errors import invalid


@dataclass(frozen=True)
class _Layout:
    """How a quantized format stores one projection [N, K] of one expert (see moe_sft_weight_format)."""

    weights: np.dtype  # the stored words
    per_word: int  # values along K in one word of weights
    scale: np.dtype
    grouped: bool  # one scale (and zero point) per group of group_size along K; else one per output channel
    zero: bool  # AWQ's zero points
    default_group_size: int

    def shapes(self, N, K, group_size):
        """Shapes of weights, scale and zero (None when the format has none) for one expert's [N, K]."""
        scale = (N, K // group_size) if self.grouped else (N,)
        return (N, K // self.per_word), scale, scale if self.zero else None


_LAYOUTS = {
    "int8": _Layout(np.dtype(np.int8), 1, np.dtype(np.float32), grouped=False, zero=False, default_group_size=0),
    "int4_awq": _Layout(np.dtype(np.uint8), 2, np.dtype(np.float32), grouped=True, zero=True, default_group_size=128),
    "int4_k2": _Layout(np.dtype(np.int32), 8, bfloat16, grouped=True, zero=False, default_group_size=32),
}
_FROM_BF16 = ("int8", "int4_awq")  # K2 weights only come quantized, from their checkpoints


class QuantizedWeight(NamedTuple):
    """One projection in a quantized format's layout: exactly the arrays moe_sft_create takes for it.

    weight_format "int8": weights int8 [.., N, K], scale f32 [.., N], zero None, group_size 0.
    weight_format "int4_awq": weights uint8 [.., N, K/2] (even k in the low nibble), scale f32 [.., N, K/g],
    zero uint8 [.., N, K/g]. weight_format "int4_k2" (compressed-tensors pack-quantized): weights int32
    [.., N, K/8] (weight_packed), scale bf16 or uint16 bf16 bits [.., N, K/g] (weight_scale), zero None.
    """

    weight_format: str
    group_size: int
    weights: np.ndarray
    scale: np.ndarray
    zero: Optional[np.ndarray]


def format_code(weight_format, name="weight_format"):
    """The moe_sft_weight_format value of a format name; ``name`` is the argument's, for the error."""
    codes = enum_codes("weight_format")  # the library's names
    if not isinstance(weight_format, str) or weight_format not in codes:
        raise invalid(f"{name} = {weight_format!r}; expected one of {', '.join(map(repr, codes))}")
    return codes[weight_format]


def group_size_for(weight_format, group_size, dims):
    """group_size (None: the format's default) checked against every K it groups, ``dims`` [(name, K)]."""
    layout = _LAYOUTS.get(weight_format)
    grouped = layout is not None and layout.grouped
    if group_size is None:
        group_size, given = (layout.default_group_size if grouped else 0), f" ({weight_format}'s default)"
    else:
        try:
            group_size, given = operator.index(group_size), ""
        except TypeError:
            raise invalid(f"group_size = {group_size!r} is not an integer") from None
    if not grouped:
        if group_size != 0:
            per_channel = " (one scale per output channel)" if layout else ""
            raise invalid(f"group_size = {group_size}, but {weight_format} has no groups along K{per_channel}: "
                          "leave it None or 0")
        return 0
    if group_size <= 0:
        raise invalid(f"group_size = {group_size}; {weight_format} needs a positive group size along K "
                      f"(usually {layout.default_group_size})")
    for name, K in dims:
        if K % layout.per_word:
            raise invalid(f"{name} = {K}: {weight_format} packs {layout.per_word} values per word along it, so it "
                          f"must be a multiple of {layout.per_word}")
        if K % group_size:
            raise invalid(f"group_size = {group_size}{given} does not divide {name} = {K}")
    return group_size


def quantize(w, weight_format, group_size=None):
    """Quantizes bf16 weights w [N, K] or [experts, N, K] (rows = output channels; floats are rounded to bf16,
    uint16 are bf16 bits) into ``weight_format``'s layout, exactly as MoESFT does at create: "int8" (per-channel
    symmetric) or "int4_awq" (per group of ``group_size`` along K, default 128, with zero points).

    Returns a QuantizedWeight with the arrays MoESFT.from_quantized and the C ABI take.
    """
    a = _as_bf16(w, "w")
    if a.ndim not in (2, 3):
        raise invalid(f"w has shape {a.shape}; expected [N, K] or [experts, N, K]")
    code = format_code(weight_format)
    rows, K = int(np.prod(a.shape[:-1])), a.shape[-1]  # rows are independent: experts stack into one matrix
    matrix = _bits(a).reshape(rows, K)
    if weight_format not in _FROM_BF16:
        # the library refuses it (bf16 is not a quantized format; K2 weights come quantized) and says why
        _check(_backend.backend.quantize(code, 0, matrix, None, None, None))
        raise AssertionError(f"moe_sft_quantize accepted {weight_format}")
    layout = _LAYOUTS[weight_format]
    group_size = group_size_for(weight_format, group_size, [("K (w.shape[-1])", K)])
    lead = a.shape[:-2]
    weights_shape, scale_shape, zero_shape = layout.shapes(a.shape[-2], K, group_size)
    weights = np.empty(lead + weights_shape, layout.weights)
    scale = np.empty(lead + scale_shape, layout.scale)
    zero = None if zero_shape is None else np.empty(lead + zero_shape, np.uint8)
    _check(_backend.backend.quantize(code, group_size, matrix, weights, scale, zero))
    return QuantizedWeight(weight_format, group_size, weights, scale, zero)


def dequantize(q):
    """The weights a QuantizedWeight stands for, float32 [.., N, K]: (code - zero)·scale, as the layer computes
    with them (for inspecting what a format costs; the layer itself never makes this copy)."""
    layout = _LAYOUTS.get(q.weight_format)
    if layout is None:
        raise invalid(f"q.weight_format = {q.weight_format!r} is not a quantized format")
    scale = np.asarray(q.scale)
    scale = (scale.view(bfloat16) if scale.dtype == np.uint16 else scale).astype(np.float32)
    if q.weight_format == "int8":
        return q.weights.astype(np.float32) * scale[..., None]
    words = np.asarray(q.weights).view(np.uint8 if layout.per_word == 2 else np.uint32)
    shifts = (4 * np.arange(layout.per_word)).astype(words.dtype)
    codes = ((words[..., None] >> shifts) & 0xF).reshape(words.shape[:-1] + (-1,)).astype(np.float32)
    zero = np.float32(8) if q.zero is None else np.repeat(q.zero.astype(np.float32), q.group_size, axis=-1)
    return (codes - zero) * np.repeat(scale, q.group_size, axis=-1)


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class BaseWeights:
    """The three projections as moe_sft_create takes them: the config's format fields and, per projection, the
    (weights, scale, zero) arrays (scale and zero None for bf16 weights, which the library quantizes itself)."""

    experts: int
    hidden: int
    intermediate: int
    weight_format: str
    group_size: int
    prequantized: bool
    projections: dict  # PROJECTIONS -> (weights, scale, zero)

    def arrays(self):
        """The config's arrays by the backends' create() argument names: gate/up/down, their scales and zero
        points (None where the format has none; bf16 as its uint16 bits)."""
        weights, scales, zeros = zip(*(self.projections[n] for n in PROJECTIONS))
        arrays = {}
        for name, weight, scale, zero in zip(("gate", "up", "down"), weights, scales, zeros):
            arrays.update({name: _bits(weight), f"{name}_scale": _bits(scale), f"{name}_zero": zero})
        return arrays


def from_bf16(gate_proj, up_proj, down_proj, weight_format, group_size):
    """BaseWeights of bf16 gate_proj, up_proj [E, I, H] and down_proj [E, H, I], to be stored as ``weight_format``."""
    gate = _as_bf16(gate_proj, "gate_proj")
    if gate.ndim != 3:
        raise invalid(f"gate_proj has shape {gate.shape}; expected 3-D [experts, intermediate, hidden]")
    E, I, H = gate.shape
    up = _as_bf16(up_proj, "up_proj", (E, I, H))
    down = _as_bf16(down_proj, "down_proj", (E, H, I))
    format_code(weight_format)  # an unknown name is reported as such, before its group size is judged
    group_size = group_size_for(weight_format, group_size, [("hidden_size", H), ("intermediate_size", I)])
    projections = {"gate_proj": (gate, None, None), "up_proj": (up, None, None), "down_proj": (down, None, None)}
    return BaseWeights(E, H, I, weight_format, group_size, False, projections)


def _stored(a, name, dtype, shape):
    """A pre-quantized array as the library reads it: exactly ``dtype`` (bf16 may come as uint16 bits; nothing
    is converted, the values are an encoding) and ``shape``, C-contiguous (copied if it is not)."""
    expected = "bfloat16 or uint16 (bf16 bits)" if dtype == bfloat16 else str(dtype)
    if a is None:
        raise invalid(f"{name} is None; expected {expected} of shape {shape}")
    a = np.asarray(a)
    if dtype == bfloat16 and a.dtype == np.uint16:
        a = a.view(bfloat16)
    if a.dtype != dtype:
        raise invalid(f"{name} has dtype {a.dtype}; expected {expected}")
    _check_shape(a, name, shape)
    return np.ascontiguousarray(a)


def _quantized_weight(p, name):
    """p's QuantizedWeight fields, from a QuantizedWeight or anything that has them."""
    try:
        return QuantizedWeight(*(getattr(p, field) for field in QuantizedWeight._fields))
    except AttributeError:
        raise invalid(f"{name} must be a moe_sft.QuantizedWeight (or have its fields "
                      f"{', '.join(QuantizedWeight._fields)}), got {type(p).__name__}") from None


def prequantized(gate_proj, up_proj, down_proj):
    """BaseWeights of three QuantizedWeight of one format: gate_proj, up_proj of [E, I, H], down_proj of [E, H, I]."""
    given = {n: _quantized_weight(p, n) for n, p in zip(PROJECTIONS, (gate_proj, up_proj, down_proj))}
    gate = given["gate_proj"]
    fmt = gate.weight_format
    format_code(fmt, "gate_proj.weight_format")
    if fmt not in _LAYOUTS:
        raise invalid(f"gate_proj.weight_format = {fmt!r} is not a quantized format; from_quantized takes "
                      f"{', '.join(map(repr, _LAYOUTS))} (bf16 weights go to MoESFT(...))")
    for name in PROJECTIONS[1:]:
        for field in ("weight_format", "group_size"):
            if getattr(given[name], field) != getattr(gate, field):
                raise invalid(f"{name}.{field} = {getattr(given[name], field)!r} but gate_proj.{field} = "
                              f"{getattr(gate, field)!r}: the three projections share one format and group size")
    layout = _LAYOUTS[fmt]
    gate_weights = np.asarray(gate.weights)
    if gate_weights.ndim != 3:
        packed = f" / {layout.per_word}" if layout.per_word > 1 else ""
        raise invalid(f"gate_proj.weights has shape {gate_weights.shape}; expected 3-D [experts, intermediate, "
                      f"hidden{packed}]")
    E, I, H = gate_weights.shape[0], gate_weights.shape[1], gate_weights.shape[2] * layout.per_word
    group_size = group_size_for(fmt, gate.group_size, [("hidden_size", H), ("intermediate_size", I)])
    projections = {}
    for name, (N, K) in zip(PROJECTIONS, ((I, H), (I, H), (H, I))):
        q = given[name]
        weights_shape, scale_shape, zero_shape = layout.shapes(N, K, group_size)
        if zero_shape is None and q.zero is not None:
            raise invalid(f"{name}.zero must be None: {fmt} is symmetric (no zero points)")
        projections[name] = (
            _stored(q.weights, f"{name}.weights", layout.weights, (E,) + weights_shape),
            _stored(q.scale, f"{name}.scale", layout.scale, (E,) + scale_shape),
            None if zero_shape is None else _stored(q.zero, f"{name}.zero", np.dtype(np.uint8), (E,) + zero_shape))
    return BaseWeights(E, H, I, fmt, group_size, True, projections)
