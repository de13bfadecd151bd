"""The C ABI at the pointer level, for the tests that must send what a C caller could: NULLs, misaligned
addresses, enum values outside the enum, counts that disagree with the buffers. The moe_sft backends cannot
(their arguments are typed arrays), so this reaches the installed library through cffi in ABI mode, with
arrays as integer addresses (0 = NULL) and layers as integer handles, exactly as a foreign runtime would.
"""
import os as _os

import cffi as _cffi
import moe_sft
from moe_sft._cffi_backend import declarations

__all__ = ["create", "destroy", "update_lora", "forward", "backward", "route", "route_backward", "quantize",
           "weight_format_name", "cache_depth", "discard_saved", "layer_isa", "isa", "status_string", "last_error",
           "version"]

_ffi = _cffi.FFI()
_ffi.cdef(declarations(_os.path.join(moe_sft.get_include(), "moe_sft.h")))
_lib = _ffi.dlopen(moe_sft.get_library())


def _layer(address):
    return _ffi.cast("moe_sft_layer *", address)


def _format(weight_format):
    """An int as moe_sft_weight_format: cffi refuses negative ints for an enum of non-negative values (the C
    library reports any value outside the enum, as it does for the nanobind module's plain int conversion)."""
    return _ffi.cast("moe_sft_weight_format", weight_format)


def _text(char_pointer):
    return _ffi.string(char_pointer).decode("utf-8", "replace") if char_pointer != _ffi.NULL else ""


def create(experts, hidden, intermediate, rank, alpha, max_cache_depth, num_threads, tp_count, gate, up, down,
           check_finite, weight_format, group_size, prequantized, gate_scale, up_scale, down_scale, gate_zero, up_zero,
           down_zero, block_rows=0, block_cols=0, scale_dtype=None):
    """The config's fields in its order; addresses of 0 are NULL; scale_dtype None keeps the default."""
    cfg = _ffi.new("moe_sft_config *")
    _lib.moe_sft_config_init(cfg)
    cfg.expert_num = experts
    cfg.hidden_size = hidden
    cfg.intermediate_size = intermediate
    cfg.lora_rank = rank
    cfg.lora_alpha = alpha
    cfg.max_cache_depth = max_cache_depth
    cfg.num_threads = num_threads
    cfg.tp_count = tp_count
    cfg.gate_proj, cfg.up_proj, cfg.down_proj, cfg.gate_scale, cfg.up_scale, cfg.down_scale = (
        _ffi.cast("const void *", a) for a in (gate, up, down, gate_scale, up_scale, down_scale))
    if check_finite >= 0:  # else the library's default (MOE_SFT_CHECK_FINITE)
        cfg.check_finite = check_finite
    cfg.weight_format = _format(weight_format)
    cfg.group_size = group_size
    cfg.prequantized = prequantized
    cfg.gate_zero, cfg.up_zero, cfg.down_zero = (
        _ffi.cast("const uint8_t *", a) for a in (gate_zero, up_zero, down_zero))
    cfg.block_rows, cfg.block_cols = block_rows, block_cols
    if scale_dtype is not None:
        cfg.scale_dtype = scale_dtype
    out = _ffi.new("moe_sft_layer **")
    status = _lib.moe_sft_create(cfg, out)
    return status, int(_ffi.cast("uintptr_t", out[0]))


def destroy(layer):
    _lib.moe_sft_destroy(_layer(layer))


def update_lora(layer, dtype, gate_a=None, gate_b=None, up_a=None, up_b=None, down_a=None, down_b=None):
    """dtype None: unbind (a NULL moe_sft_lora)."""
    if dtype is None:
        return _lib.moe_sft_update_lora(_layer(layer), _ffi.NULL)
    lora = _ffi.new("moe_sft_lora *", {"dtype": dtype})
    lora.gate_a, lora.gate_b, lora.up_a, lora.up_b, lora.down_a, lora.down_b = (
        _ffi.cast("const void *", a) for a in (gate_a, gate_b, up_a, up_b, down_a, down_b))
    return _lib.moe_sft_update_lora(_layer(layer), lora)


def forward(layer, qlen, top_k, ids, weights, input_, output, save):
    return _lib.moe_sft_forward(_layer(layer), qlen, top_k, _ffi.cast("const int64_t *", ids),
                                _ffi.cast("const float *", weights), _ffi.cast("const uint16_t *", input_),
                                _ffi.cast("uint16_t *", output), save)


def backward(layer, grad_output, grad_input, grad_weights, gate_a, gate_b, up_a, up_b, down_a, down_b, accumulate):
    """grads: six addresses, or all zero for "no LoRA grads" (NULL)."""
    addresses = (gate_a, gate_b, up_a, up_b, down_a, down_b)
    grads = _ffi.NULL
    if any(addresses):
        grads = _ffi.new("moe_sft_lora_grads *")
        grads.gate_a, grads.gate_b, grads.up_a, grads.up_b, grads.down_a, grads.down_b = (
            _ffi.cast("float *", a) for a in addresses)
    return _lib.moe_sft_backward(_layer(layer), _ffi.cast("const uint16_t *", grad_output),
                                 _ffi.cast("uint16_t *", grad_input), _ffi.cast("float *", grad_weights), grads,
                                 accumulate)


def route(qlen, experts, top_k, dtype, logits, scoring, renormalize, bias, ids, weights):
    return _lib.moe_sft_route(qlen, experts, top_k, dtype, _ffi.cast("const void *", logits), scoring, renormalize,
                              _ffi.cast("const float *", bias), _ffi.cast("int64_t *", ids),
                              _ffi.cast("float *", weights))


def route_backward(qlen, experts, top_k, dtype, logits, scoring, renormalize, ids, grad_weights, grad_logits):
    return _lib.moe_sft_route_backward(qlen, experts, top_k, dtype, _ffi.cast("const void *", logits), scoring,
                                       renormalize, _ffi.cast("const int64_t *", ids),
                                       _ffi.cast("const float *", grad_weights), _ffi.cast("float *", grad_logits))


def quantize(weight_format, group_size, rows, cols, w, weights, scale, zero):
    return _lib.moe_sft_quantize(_format(weight_format), group_size, rows, cols, _ffi.cast("const uint16_t *", w),
                                 _ffi.cast("void *", weights), _ffi.cast("float *", scale),
                                 _ffi.cast("uint8_t *", zero))


def quantize_blocks(weight_format, block_rows, block_cols, scale_dtype, rows, cols, w, weights, scale):
    return _lib.moe_sft_quantize_blocks(_format(weight_format), block_rows, block_cols, scale_dtype, rows, cols,
                                        _ffi.cast("const uint16_t *", w), _ffi.cast("uint8_t *", weights),
                                        _ffi.cast("void *", scale))


def weight_format_name(weight_format):
    """None for a value that names no format."""
    name = _lib.moe_sft_weight_format_name(_format(weight_format))
    return _text(name) if name != _ffi.NULL else None


def cache_depth(layer):
    depth = _ffi.new("int32_t *")
    status = _lib.moe_sft_cache_depth(_layer(layer), depth)
    return status, depth[0]


def discard_saved(layer, n):
    return _lib.moe_sft_discard_saved(_layer(layer), n)


def layer_isa(layer):
    return _text(_lib.moe_sft_layer_isa(_layer(layer)))


def isa():
    name = _ffi.new("const char **")
    status = _lib.moe_sft_isa(name)
    return status, _text(name[0])


def status_string(status):
    return _text(_lib.moe_sft_status_string(status))


def last_error():
    return _text(_lib.moe_sft_last_error())


def version():
    return _lib.moe_sft_version()
