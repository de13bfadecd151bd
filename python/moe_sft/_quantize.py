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
    # e2m1 nibbles, low nibble first, and e8m0 scale bytes per group of 32 along K
    "mxfp4": _Layout(np.dtype(np.uint8), 2, np.dtype(np.uint8), grouped=True, zero=False, default_group_size=32),
}
_FROM_BF16 = ("int8", "int4_awq")  # K2 weights only come quantized, from their checkpoints
# Formats with scale blocks: moe_sft_quantize_blocks makes them from bf16. fp8_e4m3_block's layout (e4m3 bytes
# [N, K], scale_inv [ceil(N/bn), ceil(K/bk)] f32 or bf16) is its own: its scales cover 2-D blocks.
FP8 = "fp8_e4m3_block"
_BLOCK_FORMATS = (FP8, "mxfp4")
DEFAULT_BLOCK_SIZE = (128, 128)  # every published FP8 checkpoint's quantization_config.weight_block_size
_SCALE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": bfloat16}
_DTYPE_CODES = {np.dtype(np.float32): 1, bfloat16: 0}  # moe_sft_dtype


def _blocks(n, b):
    return -(-n // b)


def block_size_for(block_size, name="group_size"):
    """fp8_e4m3_block's scale block (block_rows, block_cols), from its group_size: None is 128 x 128, an int b is
    b x b."""
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    try:
        pair = (block_size, block_size) if not hasattr(block_size, "__len__") else tuple(block_size)
        pair = tuple(operator.index(b) for b in pair)
    except TypeError:
        raise invalid(f"{name} = {block_size!r} is not an integer or a pair (block_rows, block_cols)") from None
    if len(pair) != 2 or min(pair) <= 0:
        raise invalid(f"{name} = {block_size!r}; {FP8} expects positive (block_rows, block_cols), e.g. the "
                      f"checkpoint's quantization_config.weight_block_size [128, 128]")
    if pair[1] % 2:
        raise invalid(f"{name} = {block_size!r}: block_cols = {pair[1]} is odd (the packed layout keeps pairs "
                      "of K under one scale)")
    return pair


def scale_dtype_for(weight_format, scale_dtype):
    """fp8_e4m3_block's scale dtype (None: float32; float32 or bfloat16); None for other formats."""
    if weight_format != FP8:
        if scale_dtype is not None:
            raise invalid(f"scale_dtype = {scale_dtype!r}, but only {FP8}'s scales come in a chosen dtype")
        return None
    if scale_dtype is None:
        return np.dtype(np.float32)
    try:
        dtype = np.dtype(scale_dtype)
    except TypeError:
        dtype = None
    if dtype not in _DTYPE_CODES:
        raise invalid(f"scale_dtype = {scale_dtype!r}; expected float32 or bfloat16")
    return dtype


class QuantizedWeight(NamedTuple):
    """One projection in a quantized format's layout: exactly the arrays moe_sft_create takes for it.

    weight_format "int8": weights int8 [.., N, K], scale f32 [.., N], zero None, group_size 0.
    weight_format "int4_awq": weights uint8 [.., N, K/2] (even k in the low nibble), scale f32 [.., N, K/g],
    zero uint8 [.., N, K/g]. weight_format "int4_k2" (compressed-tensors pack-quantized): weights int32
    [.., N, K/8] (weight_packed), scale bf16 or uint16 bf16 bits [.., N, K/g] (weight_scale), zero None.
    weight_format "fp8_e4m3_block" (DeepSeek-V3 / Qwen3-FP8): weights uint8 e4m3fn bytes [.., N, K] (weight),
    scale f32 or bf16 [.., ceil(N/bn), ceil(K/bk)] (weight_scale_inv), zero None, group_size the block
    (bn, bk) (quantization_config.weight_block_size, (128, 128)). weight_format "mxfp4" (gpt-oss): weights uint8
    [.., N, K/2] or [.., N, K/32, 16] (*_blocks: e2m1 nibbles, even k in the low nibble), scale uint8 e8m0
    [.., N, K/32] (*_scales), zero None, group_size 32.
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
    if weight_format == "mxfp4" and group_size is not None and group_size != 32:
        raise invalid(f"group_size = {group_size!r}, but mxfp4 scales groups of 32 along K: leave it None or 32")
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
        if weight_format == "mxfp4" and K % 32:
            raise invalid(f"{name} = {K} is not a multiple of 32: mxfp4 scales whole groups of 32 along K")
        if K % layout.per_word:
            raise invalid(f"{name} = {K}: {weight_format} packs {layout.per_word} values per word along it, so it "
                          f"must be a multiple of {layout.per_word}")
        if K % group_size:
            raise invalid(f"group_size = {group_size}{given} does not divide {name} = {K}")
    return group_size


def quantize(w, weight_format, group_size=None, *, scale_dtype=None):
    """Quantizes bf16 weights w [N, K] or [experts, N, K] (rows = output channels; floats are rounded to bf16,
    uint16 are bf16 bits) into ``weight_format``'s layout, exactly as MoESFT does at create: "int8" (per-channel
    symmetric), "int4_awq" (per group of ``group_size`` along K, default 128, with zero points),
    "fp8_e4m3_block" (per ``group_size`` block (rows, cols), default (128, 128): scale_inv = amax / 448 in
    ``scale_dtype``, float32 or bfloat16, and e4m3 codes) or "mxfp4" (per group of 32 along K: an e8m0 power of
    two and e2m1 codes; the math of both is moe_sft_quantize_blocks' in moe_sft.h).

    Returns a QuantizedWeight with the arrays MoESFT.from_quantized and the C ABI take.
    """
    a = _as_bf16(w, "w")
    if a.ndim not in (2, 3):
        raise invalid(f"w has shape {a.shape}; expected [N, K] or [experts, N, K]")
    code = format_code(weight_format)
    scale_type = scale_dtype_for(weight_format, scale_dtype)
    if weight_format in _BLOCK_FORMATS:
        return _quantize_blocks(a, weight_format, code, group_size, scale_type)
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


def _quantize_blocks(a, weight_format, code, group_size, scale_type):
    """quantize() of the block-scaled formats, one expert at a time (their scale blocks never span experts)."""
    N, K = a.shape[-2:]
    if weight_format == "mxfp4":
        group_size_for("mxfp4", group_size, [("K (w.shape[-1])", K)])
        block, weights_shape, scale_shape, scale_type = (1, 32), (N, K // 2), (N, K // 32), np.dtype(np.uint8)
    else:
        block = block_size_for(group_size)
        weights_shape, scale_shape = (N, K), (_blocks(N, block[0]), _blocks(K, block[1]))
    lead = a.shape[:-2]
    weights = np.empty(lead + weights_shape, np.uint8)
    scale = np.empty(lead + scale_shape, scale_type)
    dtype_code = _DTYPE_CODES.get(scale_type, 1)
    for e in np.ndindex(*lead):
        _check(_backend.backend.quantize_blocks(code, block[0], block[1], dtype_code, _bits(a[e]), weights[e],
                                                _bits(scale[e])))
    if weight_format == "mxfp4":
        return QuantizedWeight("mxfp4", 32, weights, scale, None)
    return QuantizedWeight(FP8, block, weights, scale, None)


def _e4m3_values():
    """The 256 e4m3fn codes' values, from the format's definition (moe_sft.h)."""
    c = np.arange(256)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag[(c & 0x7F) == 0x7F] = np.nan
    return np.where(c & 0x80, -mag, mag).astype(np.float32)


_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _dequantize_blocks(q):
    """dequantize() of the block-scaled formats: the codes' values times their blocks' scales, in float32."""
    weights = np.asarray(q.weights)
    if q.weight_format == "mxfp4":
        if weights.ndim >= 3 and weights.shape[-1] == 16 and np.asarray(q.scale).shape == weights.shape[:-1]:
            weights = weights.reshape(weights.shape[:-2] + (-1,))  # gpt-oss's [.., N, K/32, 16]
        codes = np.stack([weights & 0xF, weights >> 4], axis=-1).reshape(weights.shape[:-1] + (-1,))
        s = np.asarray(q.scale).astype(np.int32)
        with np.errstate(over="ignore"):  # 2^128 (byte 255, NaN below) and 6 * 2^127 are beyond float32: inf
            scale = np.where(s == 255, np.float32(np.nan), np.ldexp(np.float32(1), s - 127).astype(np.float32))
            return _E2M1[codes] * np.repeat(scale, 32, axis=-1)
    bn, bk = block_size_for(q.group_size, "q.group_size")
    scale = np.asarray(q.scale)
    scale = (scale.view(bfloat16) if scale.dtype == np.uint16 else scale).astype(np.float32)
    N, K = weights.shape[-2:]
    full = np.repeat(np.repeat(scale, bn, axis=-2), bk, axis=-1)[..., :N, :K]
    return _e4m3_values()[weights] * full


def dequantize(q):
    """The weights a QuantizedWeight stands for, float32 [.., N, K]: (code - zero)·scale for the integer formats,
    value(code)·scale for fp8_e4m3_block and mxfp4 (for inspecting what a format costs; the layer itself never
    makes this copy, and rounds each dequantized value to bf16 as its kernels consume them)."""
    if q.weight_format in _BLOCK_FORMATS:
        return _dequantize_blocks(q)
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
    scale_dtype: Optional[np.dtype] = None  # fp8_e4m3_block's scale dtype

    def block_fields(self):
        """The config's block fields by the backends' create() argument names (fp8_e4m3_block's group_size is
        its block (rows, cols); the config's group_size is then 0)."""
        rows, cols = self.group_size if self.weight_format == FP8 else (0, 0)
        return dict(block_rows=rows, block_cols=cols, scale_dtype=_DTYPE_CODES.get(self.scale_dtype, 1))

    def config_group_size(self):
        return 0 if self.weight_format == FP8 else self.group_size

    def arrays(self):
        """The config's arrays by the backends' create() argument names: gate/up/down, their scales and zero
        points (None where the format has none; bf16 as its uint16 bits)."""
        weights, scales, zeros = zip(*(self.projections[n] for n in PROJECTIONS))
        arrays = {}
        for name, weight, scale, zero in zip(("gate", "up", "down"), weights, scales, zeros):
            arrays.update({name: _bits(weight), f"{name}_scale": _bits(scale), f"{name}_zero": zero})
        return arrays


def from_bf16(gate_proj, up_proj, down_proj, weight_format, group_size, scale_dtype=None):
    """BaseWeights of bf16 gate_proj, up_proj [E, I, H] and down_proj [E, H, I], to be stored as ``weight_format``."""
    gate = _as_bf16(gate_proj, "gate_proj")
    if gate.ndim != 3:
        raise invalid(f"gate_proj has shape {gate.shape}; expected 3-D [experts, intermediate, hidden]")
    E, I, H = gate.shape
    up = _as_bf16(up_proj, "up_proj", (E, I, H))
    down = _as_bf16(down_proj, "down_proj", (E, H, I))
    format_code(weight_format)  # an unknown name is reported as such, before its group size is judged
    scale_type = scale_dtype_for(weight_format, scale_dtype)
    if weight_format == FP8:
        group_size = block_size_for(group_size)
    else:
        group_size = group_size_for(weight_format, group_size, [("hidden_size", H), ("intermediate_size", I)])
    projections = {"gate_proj": (gate, None, None), "up_proj": (up, None, None), "down_proj": (down, None, None)}
    return BaseWeights(E, H, I, weight_format, group_size, False, projections, scale_type)


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
    if fmt not in _LAYOUTS and fmt != FP8:
        raise invalid(f"gate_proj.weight_format = {fmt!r} is not a quantized format; from_quantized takes "
                      f"{', '.join(map(repr, list(_LAYOUTS) + [FP8]))} (bf16 weights go to MoESFT(...))")
    for name in PROJECTIONS[1:]:
        for field in ("weight_format", "group_size"):
            if _comparable(getattr(given[name], field)) != _comparable(getattr(gate, field)):
                raise invalid(f"{name}.{field} = {getattr(given[name], field)!r} but gate_proj.{field} = "
                              f"{getattr(gate, field)!r}: the three projections share one format and group size")
    if fmt == FP8:
        return _prequantized_fp8(given)
    layout = _LAYOUTS[fmt]
    gate_weights = np.asarray(gate.weights)
    if gate_weights.ndim != 3:
        packed = f" / {layout.per_word}" if layout.per_word > 1 else ""
        raise invalid(f"gate_proj.weights has shape {gate_weights.shape}; expected 3-D [experts, intermediate, "
                      f"hidden{packed}]")
    if fmt == "mxfp4":
        gate_weights = _mxfp4_rows(gate_weights)
    E, I, H = gate_weights.shape[0], gate_weights.shape[1], gate_weights.shape[2] * layout.per_word
    group_size = group_size_for(fmt, gate.group_size, [("hidden_size", H), ("intermediate_size", I)])
    projections = {}
    for name, (N, K) in zip(PROJECTIONS, ((I, H), (I, H), (H, I))):
        q = given[name]
        weights_shape, scale_shape, zero_shape = layout.shapes(N, K, group_size)
        if zero_shape is None and q.zero is not None:
            raise invalid(f"{name}.zero must be None: {fmt} is symmetric (no zero points)")
        weights = _mxfp4_rows(np.asarray(q.weights)) if fmt == "mxfp4" else q.weights
        projections[name] = (
            _stored(weights, f"{name}.weights", layout.weights, (E,) + weights_shape),
            _stored(q.scale, f"{name}.scale", layout.scale, (E,) + scale_shape),
            None if zero_shape is None else _stored(q.zero, f"{name}.zero", np.dtype(np.uint8), (E,) + zero_shape))
    return BaseWeights(E, H, I, fmt, group_size, True, projections)


def _comparable(v):
    """A group size as given (a list [128, 128] from a config equals the tuple (128, 128))."""
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _mxfp4_rows(weights):
    """gpt-oss's *_blocks [E, N, K/32, 16] as the [E, N, K/2] rows they are (a view; other shapes as given)."""
    if weights.ndim == 4 and weights.shape[-1] == 16:
        return weights.reshape(weights.shape[:2] + (-1,))
    return weights


def _prequantized_fp8(given):
    """prequantized() of fp8_e4m3_block: e4m3 bytes [E, N, K] and scale_inv [E, ceil(N/bn), ceil(K/bk)] of one
    dtype (float32 or bfloat16) for all three projections."""
    gate = given["gate_proj"]
    bn, bk = block_size_for(gate.group_size, "gate_proj.group_size")
    gate_weights = np.asarray(gate.weights)
    if gate_weights.ndim != 3:
        raise invalid(f"gate_proj.weights has shape {gate_weights.shape}; expected 3-D [experts, intermediate, hidden]")
    E, I, H = gate_weights.shape
    gate_scale = np.asarray(gate.scale)
    scale_type = bfloat16 if gate_scale.dtype in (bfloat16, np.uint16) else np.dtype(np.float32)
    if gate_scale.dtype not in (bfloat16, np.uint16, np.float32):
        raise invalid(f"gate_proj.scale has dtype {gate_scale.dtype}; expected float32 or bfloat16 (weight_scale_inv)")
    projections = {}
    for name, (N, K) in zip(PROJECTIONS, ((I, H), (I, H), (H, I))):
        q = given[name]
        if q.zero is not None:
            raise invalid(f"{name}.zero must be None: {FP8} is symmetric (no zero points)")
        projections[name] = (
            _stored(q.weights, f"{name}.weights", np.dtype(np.uint8), (E, N, K)),
            _stored(q.scale, f"{name}.scale", scale_type, (E, _blocks(N, bn), _blocks(K, bk))), None)
    return BaseWeights(E, H, I, FP8, (bn, bk), True, projections, scale_type)
