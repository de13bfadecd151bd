"""cffi backend: the C ABI of moe_sft.h reached through cffi in ABI mode, with no compiler at import time.

The declarations are the installed header's own CDEF block, given to ffi.cdef() unchanged, so this module
cannot drift from the ABI; the library is the one installed next to the nanobind module. The functions
mirror ``_ext.cpp`` (same names, arguments and return values): numpy arrays in, statuses out. The arrays
come checked from moe_sft._layer / _router / _quantize (dtype, shape, C-contiguity); here they only become
pointers. A Layer owns its moe_sft_layer and keeps the bound LoRA arrays alive; an AdamW owns its
moe_sft_adamw and keeps the parameter arrays it updates in place alive. cffi releases the GIL for
the duration of every ABI-mode call.
"""
import os as _os

import cffi as _cffi
import numpy as _np

from . import _paths

__all__ = ["Layer", "create", "destroy", "update_lora", "forward", "backward", "discard_saved", "cache_depth",
           "layer_isa", "route", "route_backward", "plan_exchange", "quantize", "quantize_blocks", "isa",
           "status_string", "weight_format_name", "activation_name", "dtype_name", "scoring_name", "last_error",
           "version", "AdamW", "adamw_create", "adamw_destroy", "adamw_step", "adamw_get_config", "adamw_set_config",
           "adamw_set_lr", "adamw_get_step", "adamw_set_step", "adamw_state"]

CDEF_BEGIN = "/* MOE_SFT_CDEF_BEGIN */"
CDEF_END = "/* MOE_SFT_CDEF_END */"


def declarations(header_path):
    """The text between the CDEF markers of the header at ``header_path``."""
    with open(header_path, encoding="utf-8") as f:
        text = f.read()
    begin, end = text.find(CDEF_BEGIN), text.find(CDEF_END)
    if begin < 0 or end < begin:
        raise ImportError(f"{header_path} has no {CDEF_BEGIN} ... {CDEF_END} block")
    return text[begin + len(CDEF_BEGIN):end]


_ffi = _cffi.FFI()
_ffi.cdef(declarations(_os.path.join(_paths.get_include(), "moe_sft.h")))
_lib = _ffi.dlopen(_paths.get_library())


def _ptr(ctype, a):
    """A C pointer to array a's data; None and empty arrays are NULL, as a C caller with nothing would send."""
    if a is None or a.size == 0:
        return _ffi.NULL
    return _ffi.cast(ctype, a.__array_interface__["data"][0])


def _dtype(a):
    if a.dtype == _np.float32:
        return _lib.MOE_SFT_DTYPE_F32
    if a.dtype == _np.uint16:
        return _lib.MOE_SFT_DTYPE_BF16
    raise TypeError("arrays must be float32 or bf16 bits (uint16)")


def _text(char_pointer):
    return _ffi.string(char_pointer).decode("utf-8", "replace") if char_pointer != _ffi.NULL else ""


def _name(char_pointer):
    return None if char_pointer == _ffi.NULL else _text(char_pointer)


def _not_copyable(*_):
    raise TypeError("a moe_sft layer owns library memory and cannot be copied or pickled")


class Layer:
    """A moe_sft_layer; made by create(), freed with its last reference or destroy()."""

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _not_copyable

    def __init__(self, handle):
        self.handle = handle
        self.lora = None  # the bound LoRA arrays: the library reads them in place at every call

    def __del__(self):
        destroy(self)

    def live(self):
        if self.handle is None:
            raise ValueError("the layer is closed")
        return self.handle


def create(experts, hidden, intermediate, lora_rank, lora_alpha, max_cache_depth, num_threads, tp_count,
           check_finite, weight_format, group_size, prequantized, gate, up, down, gate_scale=None, up_scale=None,
           down_scale=None, gate_zero=None, up_zero=None, down_zero=None, block_rows=0, block_cols=0, scale_dtype=1,
           activation=0, swiglu_alpha=None, swiglu_limit=None, gate_bias=None, up_bias=None, down_bias=None):
    cfg = _ffi.new("moe_sft_config *")
    _lib.moe_sft_config_init(cfg)
    cfg.expert_num, cfg.hidden_size, cfg.intermediate_size = experts, hidden, intermediate
    cfg.lora_rank, cfg.lora_alpha, cfg.max_cache_depth = lora_rank, lora_alpha, max_cache_depth
    cfg.num_threads, cfg.tp_count = num_threads, tp_count
    if check_finite is not None:  # else the library's default (MOE_SFT_CHECK_FINITE)
        cfg.check_finite = int(check_finite)
    cfg.weight_format, cfg.group_size, cfg.prequantized = weight_format, group_size, int(prequantized)
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = (_ptr("const void *", a) for a in (gate, up, down))
    cfg.gate_scale, cfg.up_scale, cfg.down_scale = (_ptr("const void *", a) for a in (gate_scale, up_scale, down_scale))
    cfg.gate_zero, cfg.up_zero, cfg.down_zero = (_ptr("const uint8_t *", a) for a in (gate_zero, up_zero, down_zero))
    cfg.block_rows, cfg.block_cols, cfg.scale_dtype = block_rows, block_cols, scale_dtype
    cfg.activation = activation
    if swiglu_alpha is not None:  # else the library's defaults (gpt-oss's)
        cfg.swiglu_alpha = swiglu_alpha
    if swiglu_limit is not None:
        cfg.swiglu_limit = swiglu_limit
    cfg.gate_bias, cfg.up_bias, cfg.down_bias = (_ptr("const float *", a) for a in (gate_bias, up_bias, down_bias))
    out = _ffi.new("moe_sft_layer **")
    status = _lib.moe_sft_create(cfg, out)
    return status, (Layer(out[0]) if status == 0 else None)


def destroy(layer):
    if layer.handle is not None:
        _lib.moe_sft_destroy(layer.handle)
    layer.handle, layer.lora = None, None


def update_lora(layer, arrays):
    """Binds six arrays of one dtype (float32, or bf16 bits as uint16), or unbinds with None."""
    if arrays is None:
        status = _lib.moe_sft_update_lora(layer.live(), _ffi.NULL)
    else:
        arrays = tuple(arrays)
        if len(arrays) != 6 or any(a.dtype != arrays[0].dtype for a in arrays):
            raise TypeError("update_lora takes six LoRA arrays of one dtype")
        lora = _ffi.new("moe_sft_lora *", {"dtype": _dtype(arrays[0])})
        lora.gate_a, lora.gate_b, lora.up_a, lora.up_b, lora.down_a, lora.down_b = (
            _ptr("const void *", a) for a in arrays)
        status = _lib.moe_sft_update_lora(layer.live(), lora)
    if status == 0:
        layer.lora = arrays
    return status


def forward(layer, expert_ids, routing_weights, input, output, save_for_backward):
    qlen, top_k = expert_ids.shape
    return _lib.moe_sft_forward(layer.live(), qlen, top_k, _ptr("const int64_t *", expert_ids),
                                _ptr("const float *", routing_weights), _ptr("const uint16_t *", input),
                                _ptr("uint16_t *", output), int(save_for_backward))


def backward(layer, grad_output, grad_input, grad_routing_weights, lora_grads, accumulate):
    """lora_grads: six float32 arrays, or None to skip the LoRA grads."""
    grads = _ffi.NULL
    if lora_grads is not None:
        grads = _ffi.new("moe_sft_lora_grads *")
        grads.gate_a, grads.gate_b, grads.up_a, grads.up_b, grads.down_a, grads.down_b = (
            _ptr("float *", a) for a in lora_grads)
    return _lib.moe_sft_backward(layer.live(), _ptr("const uint16_t *", grad_output), _ptr("uint16_t *", grad_input),
                                 _ptr("float *", grad_routing_weights), grads, int(accumulate))


def discard_saved(layer, n):
    return _lib.moe_sft_discard_saved(layer.live(), n)


def cache_depth(layer):
    depth = _ffi.new("int32_t *")
    status = _lib.moe_sft_cache_depth(layer.live(), depth)
    return status, depth[0]


def layer_isa(layer):
    return _text(_lib.moe_sft_layer_isa(layer.live()))


def route(logits, scoring, renormalize, correction_bias, expert_ids, routing_weights):
    (qlen, experts), top_k = logits.shape, expert_ids.shape[1]
    return _lib.moe_sft_route(qlen, experts, top_k, _dtype(logits), _ptr("const void *", logits), scoring,
                              int(renormalize), _ptr("const float *", correction_bias),
                              _ptr("int64_t *", expert_ids), _ptr("float *", routing_weights))


def route_backward(logits, scoring, renormalize, expert_ids, grad_routing_weights, grad_logits):
    (qlen, experts), top_k = logits.shape, expert_ids.shape[1]
    return _lib.moe_sft_route_backward(qlen, experts, top_k, _dtype(logits), _ptr("const void *", logits), scoring,
                                       int(renormalize), _ptr("const int64_t *", expert_ids),
                                       _ptr("const float *", grad_routing_weights), _ptr("float *", grad_logits))


def plan_exchange(expert_ids, placement, world, send_counts, send_offsets, send_pairs):
    """The send plan of expert_ids under placement (see moe_sft_plan_exchange); returns (status, send_rows)."""
    rows = _ffi.new("int64_t *")
    (qlen, top_k), experts = expert_ids.shape, placement.shape[0]
    status = _lib.moe_sft_plan_exchange(qlen, top_k, _ptr("const int64_t *", expert_ids), experts,
                                        _ptr("const int32_t *", placement), world, _ptr("int64_t *", send_counts),
                                        _ptr("int64_t *", send_offsets), _ptr("int64_t *", send_pairs), rows)
    return status, rows[0]


def quantize(weight_format, group_size, w, weights, scale, zero):
    """w [rows, cols] as bf16 bits; weights, scale, zero in weight_format's layout (None where it has none)."""
    rows, cols = w.shape
    return _lib.moe_sft_quantize(weight_format, group_size, rows, cols, _ptr("const uint16_t *", w),
                                 _ptr("void *", weights), _ptr("float *", scale), _ptr("uint8_t *", zero))


def quantize_blocks(weight_format, block_rows, block_cols, scale_dtype, w, weights, scale):
    """w [rows, cols] as bf16 bits; weights uint8 and scale (f32, bf16 bits or e8m0 bytes) in weight_format's layout."""
    rows, cols = w.shape
    return _lib.moe_sft_quantize_blocks(weight_format, block_rows, block_cols, scale_dtype, rows, cols,
                                        _ptr("const uint16_t *", w), _ptr("uint8_t *", weights), _ptr("void *", scale))


def isa():
    name = _ffi.new("const char **")
    status = _lib.moe_sft_isa(name)
    return status, _text(name[0])


# ---- AdamW

def _not_copyable_optimizer(*_):
    raise TypeError("a moe_sft optimizer owns library memory and cannot be copied or pickled")


class AdamW:
    """A moe_sft_adamw; made by adamw_create(), freed with its last reference or adamw_destroy()."""

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _not_copyable_optimizer

    def __init__(self, handle, params):
        self.handle = handle
        self.params = params  # the arrays the library updates in place at every step

    def __del__(self):
        adamw_destroy(self)

    def live(self):
        if self.handle is None:
            raise ValueError("the optimizer is closed")
        return self.handle


def _adamw_config(lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads):
    cfg = _ffi.new("moe_sft_adamw_config *")
    _lib.moe_sft_adamw_config_init(cfg)
    cfg.lr, cfg.beta1, cfg.beta2, cfg.eps = lr, beta1, beta2, eps
    cfg.weight_decay, cfg.max_grad_norm, cfg.num_threads = weight_decay, max_grad_norm, num_threads
    return cfg


def adamw_create(lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads, names, params):
    """params: float32 arrays, or bf16 bits as uint16, updated in place by every step; names: one per parameter."""
    names, params = list(names), list(params)
    if len(names) != len(params):
        raise ValueError("adamw_create: one name per parameter")
    cfg = _adamw_config(lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads)
    keep = [_ffi.new("char[]", str(n).encode("utf-8")) for n in names]
    descs = _ffi.new("moe_sft_adamw_param[]", max(len(params), 1))
    for i, a in enumerate(params):
        if a.size == 0:
            raise ValueError(f"parameter {names[i]!r} is empty")
        descs[i].name = keep[i]
        descs[i].dtype = _dtype(a)
        descs[i].data = _ptr("void *", a)
        descs[i].count = a.size
    out = _ffi.new("moe_sft_adamw **")
    status = _lib.moe_sft_adamw_create(cfg, len(params), descs, out)
    return status, (AdamW(out[0], params) if status == 0 else None)


def adamw_destroy(opt):
    if opt.handle is not None:
        _lib.moe_sft_adamw_destroy(opt.handle)
    opt.handle, opt.params = None, None


def adamw_step(opt, grads):
    """grads: one float32 array per parameter, of its element count (read only)."""
    handle = opt.live()
    grads = list(grads)
    if len(grads) != len(opt.params):
        raise ValueError("adamw_step: one grad per parameter")
    for i, (g, p) in enumerate(zip(grads, opt.params)):
        if g.dtype != _np.float32 or g.size != p.size:
            raise ValueError(f"adamw_step: grads[{i}] must be float32 with {p.size} elements")
    pointers = _ffi.new("float *[]", [_ptr("float *", g) for g in grads])
    report = _ffi.new("moe_sft_adamw_report *")
    report.struct_size = _ffi.sizeof("moe_sft_adamw_report")
    status = _lib.moe_sft_adamw_step(handle, pointers, report)
    return status, (report.grad_norm, report.clip_coef, report.skipped, report.bad_param, report.bad_index,
                    report.bad_value, report.step)


def adamw_get_config(opt):
    cfg = _ffi.new("moe_sft_adamw_config *")
    status = _lib.moe_sft_adamw_get_config(opt.live(), cfg)
    return status, (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.max_grad_norm, cfg.num_threads)


def adamw_set_config(opt, lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads):
    cfg = _adamw_config(lr, beta1, beta2, eps, weight_decay, max_grad_norm, num_threads)
    return _lib.moe_sft_adamw_set_config(opt.live(), cfg)


def adamw_set_lr(opt, lr):
    return _lib.moe_sft_adamw_set_lr(opt.live(), lr)


def adamw_get_step(opt):
    step = _ffi.new("int64_t *")
    status = _lib.moe_sft_adamw_get_step(opt.live(), step)
    return status, step[0]


def adamw_set_step(opt, step):
    return _lib.moe_sft_adamw_set_step(opt.live(), step)


def adamw_state(opt, index):
    """Writable flat float32 views of parameter ``index``'s moments and master (None for an f32 parameter) over
    the optimizer's own memory: use them between steps and before adamw_destroy only."""
    m, v, master = _ffi.new("float **"), _ffi.new("float **"), _ffi.new("float **")
    status = _lib.moe_sft_adamw_state(opt.live(), index, m, v, master, _ffi.NULL)
    if status != 0:
        return status, None
    n = opt.params[index].size

    def view(p):
        return None if p[0] == _ffi.NULL else _np.frombuffer(_ffi.buffer(p[0], 4 * n), _np.float32)
    return status, (view(m), view(v), view(master))


# Name lookups take plain ints so that a caller can probe values the enums do not hold (cffi refuses
# negative ints for an enum of non-negative values, hence the casts).
def status_string(status):
    return _text(_lib.moe_sft_status_string(_ffi.cast("moe_sft_status", status)))


def weight_format_name(value):
    return _name(_lib.moe_sft_weight_format_name(_ffi.cast("moe_sft_weight_format", value)))


def activation_name(value):
    return _name(_lib.moe_sft_activation_name(_ffi.cast("moe_sft_activation", value)))


def dtype_name(value):
    return _name(_lib.moe_sft_dtype_name(_ffi.cast("moe_sft_dtype", value)))


def scoring_name(value):
    return _name(_lib.moe_sft_scoring_name(_ffi.cast("moe_sft_scoring", value)))


def last_error():
    return _text(_lib.moe_sft_last_error())


def version():
    return _lib.moe_sft_version()
