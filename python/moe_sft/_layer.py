"""numpy API over the C ABI: MoESFT, Grads."""
from __future__ import annotations

import operator
import threading
from dataclasses import dataclass

import numpy as np

from . import _activation, _backend, _quantize
from ._arrays import _as_bf16, _bits, _check, _check_shape, _forward_inputs, _out_array, bfloat16
from ._errors import CacheEmptyError, invalid

_LORA_DTYPES = (bfloat16, np.dtype(np.float32))


@dataclass
class Grads:
    """Gradients from MoESFT.backward. ``input`` [T, H] in the forward input's dtype; ``routing_weights``
    [T, k] f32; the six LoRA grads f32 in the shapes of the LoRA arrays."""

    input: np.ndarray
    routing_weights: np.ndarray
    gate_a: np.ndarray
    gate_b: np.ndarray
    up_a: np.ndarray
    up_b: np.ndarray
    down_a: np.ndarray
    down_b: np.ndarray

    LORA_FIELDS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


@dataclass
class _Pending:  # what Python needs to know about a saved forward
    qlen: int
    top_k: int
    dtype: np.dtype


class MoESFT:
    """A Mixture-of-Experts layer with trainable LoRA adapters on its routed experts.

    gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I] (bf16, or floats rounded to bf16). They are packed
    into the layer; the arrays may be dropped afterwards.

    weight_format: how the layer stores them: "bf16", or quantized at create (QLoRA-style) "int8" (per output
    channel), "int4_awq" (per group of group_size along K, default 128), "fp8_e4m3_block" (e4m3 codes with a
    scale per group_size block (rows, cols), default (128, 128), scales in scale_dtype, float32 or bfloat16) or
    "mxfp4"
    (e2m1 codes with an e8m0 scale per 32 along K). Pre-quantized weights (including "int4_k2", FP8 and
    gpt-oss MXFP4 checkpoints) go to MoESFT.from_quantized.

    check_finite: stop at the first NaN/Inf with an error naming the stage, tensor, position and value
    (None: on when the environment has MOE_SFT_CHECK_FINITE=1). Base weights and biases are checked here, once.

    activation: "silu" (h = silu(g)·u, default) or "swiglu_clamped" (gpt-oss's: gate = min(g, limit), up =
    clamp(u, -limit, limit), h = (up + 1)·gate·sigmoid(alpha·gate), with swiglu_alpha (default 1.702) and
    swiglu_limit (default 7.0)). gate_bias, up_bias [E, I] and down_bias [E, H]: optional frozen biases added to
    g, u and the expert output y (before the routing weight multiplies it), copied at create as float32. gpt-oss's
    own layout (interleaved, transposed) goes to MoESFT.from_gpt_oss.

    The shape and format attributes (expert_num, hidden_size, intermediate_size, lora_rank, lora_alpha,
    max_cache_depth, tp_count, weight_format, group_size, activation, swiglu_alpha, swiglu_limit) are fixed at
    create and read-only. A layer owns memory in the library: it cannot be copied or pickled (make another from
    the same weights).
    """

    _READ_ONLY = ("expert_num", "hidden_size", "intermediate_size", "lora_rank", "lora_alpha", "max_cache_depth",
                  "tp_count", "weight_format", "group_size", "activation", "swiglu_alpha", "swiglu_limit")

    def __init__(self, gate_proj, up_proj, down_proj, *, lora_rank=16, lora_alpha=32.0, max_cache_depth=1,
                 num_threads=None, tp_count=1, check_finite=None, weight_format="bf16", group_size=None,
                 scale_dtype=None, activation="silu", swiglu_alpha=None, swiglu_limit=None, gate_bias=None,
                 up_bias=None, down_bias=None):
        self._layer = None  # set first: __del__ runs even when create fails
        self._create(_quantize.from_bf16(gate_proj, up_proj, down_proj, weight_format, group_size, scale_dtype),
                     lora_rank, lora_alpha, max_cache_depth, num_threads, tp_count, check_finite,
                     _activation.activation(activation, swiglu_alpha, swiglu_limit), (gate_bias, up_bias, down_bias))

    @classmethod
    def from_quantized(cls, gate_proj, up_proj, down_proj, *, lora_rank=16, lora_alpha=32.0, max_cache_depth=1,
                       num_threads=None, tp_count=1, check_finite=None, activation="silu", swiglu_alpha=None,
                       swiglu_limit=None, gate_bias=None, up_bias=None, down_bias=None):
        """A layer on pre-quantized base weights: three QuantizedWeight (from moe_sft.quantize, or built from a
        checkpoint, e.g. Kimi-K2's weight_packed / weight_scale as QuantizedWeight("int4_k2", 32, packed,
        scale, None)) of one format and group size, for gate_proj, up_proj [E, I, H] and down_proj [E, H, I].
        The other arguments are MoESFT's."""
        layer = cls.__new__(cls)
        object.__setattr__(layer, "_layer", None)
        layer._create(_quantize.prequantized(gate_proj, up_proj, down_proj), lora_rank, lora_alpha, max_cache_depth,
                      num_threads, tp_count, check_finite,
                      _activation.activation(activation, swiglu_alpha, swiglu_limit), (gate_bias, up_bias, down_bias))
        return layer

    @classmethod
    def from_gpt_oss(cls, gate_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None, *,
                     swiglu_alpha=_activation.GPT_OSS_ALPHA, swiglu_limit=_activation.GPT_OSS_LIMIT, **layer_kwargs):
        """A layer on gpt-oss's experts as transformers' GptOssExperts holds them: gate_up_proj [E, H, 2I] (gate
        and up interleaved: gate = columns 0::2, up = 1::2), down_proj [E, I, H], gate_up_proj_bias [E, 2I],
        down_proj_bias [E, H] (bf16 or float arrays), with the clamped SwiGLU (swiglu_alpha, swiglu_limit: the
        model config's). The projections are de-interleaved and transposed into one bf16 copy of the layer's
        weights (3·E·H·I·2 bytes beside the caller's arrays, freed after create) before the layer packs them.

        MXFP4 as the original release ships it: gate_up_proj and down_proj as QuantizedWeight("mxfp4", 32, blocks,
        scales, None) in the checkpoint's orientation (gate_up_proj_blocks [E, 2I, H/32, 16] or [E, 2I, H/2] with
        interleaved rows, _scales [E, 2I, H/32]; down_proj_blocks [E, H, I/32, 16], _scales [E, H, I/32]): the rows
        are de-interleaved in the quantized bytes and the layer stores MXFP4; nothing is dequantized.

        layer_kwargs are MoESFT's (lora_rank, weight_format, tp_count, ...); LoRA arrays are the library's (gate
        and up separate, on the de-interleaved halves; moe_sft.save_adapter(..., gpt_oss=True) writes PEFT's
        form)."""
        arrays, quantized = _activation.gpt_oss_arrays(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)
        make = cls.from_quantized if quantized else cls
        return make(arrays.pop("gate_proj"), arrays.pop("up_proj"), arrays.pop("down_proj"),
                    activation="swiglu_clamped", swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit,
                    **arrays, **layer_kwargs)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, layer_idx, **layer_kwargs):
        """A layer on the routed experts of layer ``layer_idx`` of a Hugging Face checkpoint directory (bf16,
        f16, f32 or compressed-tensors int4 weights; see moe_sft.load_experts). layer_kwargs are MoESFT's."""
        from ._checkpoints import load_experts
        return load_experts(checkpoint_dir, layer_idx).create_layer(cls, **layer_kwargs)

    def _create(self, base, lora_rank, lora_alpha, max_cache_depth, num_threads, tp_count, check_finite, act,
                bias_arrays):
        def integer(value, name):
            try:
                return operator.index(value)
            except TypeError:
                raise invalid(f"{name} = {value!r} is not an integer") from None

        fields = dict(expert_num=base.experts, hidden_size=base.hidden, intermediate_size=base.intermediate,
                      lora_rank=integer(lora_rank, "lora_rank"), lora_alpha=float(lora_alpha),
                      max_cache_depth=integer(max_cache_depth, "max_cache_depth"),
                      tp_count=integer(tp_count, "tp_count"), weight_format=base.weight_format,
                      group_size=base.group_size, activation=act.name, swiglu_alpha=act.alpha,
                      swiglu_limit=act.limit)
        bias_kwargs = _activation.biases(*bias_arrays, base.experts, base.hidden, base.intermediate)
        set_ = object.__setattr__
        set_(self, "_fields", fields)
        set_(self, "_lora", None)  # the bound LoRA arrays, by name (the backend's Layer keeps them alive)
        set_(self, "_pending", [])  # what Python needs to know about each saved forward, oldest first
        # The C layer makes each call atomic; this lock also keeps _pending in the order the C cache was
        # pushed and popped when one MoESFT is shared by threads.
        set_(self, "_lock", threading.Lock())
        set_(self, "_backend", _backend.backend)  # the layer keeps the backend that made it
        set_(self, "_backend_name", _backend.NAME)
        status, layer = self._backend.create(
            base.experts, base.hidden, base.intermediate, fields["lora_rank"], fields["lora_alpha"],
            fields["max_cache_depth"], 0 if num_threads is None else integer(num_threads, "num_threads"),
            fields["tp_count"], None if check_finite is None else bool(check_finite),
            _quantize.format_code(base.weight_format), base.config_group_size(), base.prequantized, **base.arrays(),
            **base.block_fields(), **act.create_kwargs(), **bias_kwargs)
        _check(status)
        set_(self, "_layer", layer)

    # ---- read-only configuration ----

    def __setattr__(self, name, value):
        if name in self._READ_ONLY:
            raise AttributeError(f"MoESFT.{name} is read-only: it is fixed when the layer is created (the library "
                                 f"sized its packed weights and caches by it); make a new layer to change it")
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if name in self._READ_ONLY:
            raise AttributeError(f"MoESFT.{name} is read-only")
        object.__delattr__(self, name)

    expert_num = property(lambda self: self._fields["expert_num"], doc="E, the number of routed experts")
    hidden_size = property(lambda self: self._fields["hidden_size"], doc="H")
    intermediate_size = property(lambda self: self._fields["intermediate_size"], doc="I")
    lora_rank = property(lambda self: self._fields["lora_rank"], doc="r (0: no adapters)")
    lora_alpha = property(lambda self: self._fields["lora_alpha"], doc="LoRA scale s = lora_alpha / lora_rank")
    max_cache_depth = property(lambda self: self._fields["max_cache_depth"], doc="saved forwards allowed at once")
    tp_count = property(lambda self: self._fields["tp_count"], doc="tensor-parallel parts of I")
    weight_format = property(lambda self: self._fields["weight_format"], doc="how the base weights are stored")
    group_size = property(lambda self: self._fields["group_size"],
                          doc="elements along K per scale (0: none); fp8_e4m3_block's block (rows, columns)")
    activation = property(lambda self: self._fields["activation"], doc="'silu' or 'swiglu_clamped'")
    swiglu_alpha = property(lambda self: self._fields["swiglu_alpha"], doc="swiglu_clamped's alpha (None for silu)")
    swiglu_limit = property(lambda self: self._fields["swiglu_limit"], doc="swiglu_clamped's limit (None for silu)")

    # ---- not copyable ----

    def _not_copyable(self, *_):
        raise TypeError("a moe_sft.MoESFT cannot be copied or pickled: it owns packed weights and saved forwards "
                        "in the C library. Make another layer from the same weights with MoESFT(...) instead")

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = __getstate__ = _not_copyable

    # ---- lifetime ----

    def __del__(self):
        self.close()

    def close(self):
        """Frees the layer now (also done when it is garbage-collected). Waits for a call in flight."""
        if getattr(self, "_layer", None) is not None:
            with self._lock:
                if self._layer is not None:
                    self._backend.destroy(self._layer)
                    object.__setattr__(self, "_layer", None)
                    object.__setattr__(self, "_lora", None)
                    self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        if self._layer is None:
            raise invalid("the layer is closed")
        return self._layer

    def __repr__(self):
        f = self._fields if "_fields" in self.__dict__ else None
        if f is None:
            return "MoESFT(<not created>)"
        parts = [f"experts={f['expert_num']}", f"hidden_size={f['hidden_size']}",
                 f"intermediate_size={f['intermediate_size']}", f"lora_rank={f['lora_rank']}",
                 f"lora_alpha={f['lora_alpha']}", f"weight_format={f['weight_format']!r}"]
        if f["group_size"]:
            parts.append(f"group_size={f['group_size']}")
        if f["activation"] != "silu":
            parts.append(f"activation={f['activation']!r}, swiglu_alpha={f['swiglu_alpha']}, "
                         f"swiglu_limit={f['swiglu_limit']}")
        parts.append(f"tp_count={f['tp_count']}")
        if self._layer is None:
            return f"MoESFT({', '.join(parts)}, closed)"
        parts += [f"isa={self.isa!r}", f"backend={self._backend_name!r}",
                  f"lora={'bound' if self._lora is not None else 'unbound'}", f"saved={len(self._pending)}"]
        return f"MoESFT({', '.join(parts)})"

    # ---- state ----

    @property
    def isa(self):
        """Kernel family this layer runs on (e.g. 'generic')."""
        with self._lock:
            return self._backend.layer_isa(self._live())

    @property
    def backend(self):
        """The backend this layer was made with: 'nanobind' or 'cffi'."""
        return self._backend_name

    @property
    def cache_depth(self):
        """Saved forwards awaiting backward."""
        with self._lock:
            status, depth = self._backend.cache_depth(self._live())
        _check(status)
        return depth

    @property
    def busy(self):
        """True while a call on this layer runs, on any thread. Callbacks the garbage collector runs (weakref
        finalizers) check it before calling the layer: one can run inside such a call on that call's own thread,
        where a second call would wait for the first forever."""
        return self._lock.locked()

    @property
    def lora(self):
        """The bound LoRA arrays as a dict (gate_a, ..., down_b), or None when none are bound."""
        return None if self._lora is None else dict(self._lora)

    def lora_shapes(self):
        E, H, I, r = self.expert_num, self.hidden_size, self.intermediate_size, self.lora_rank
        return {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H), "up_b": (E, I, r),
                "down_a": (E, r, I), "down_b": (E, H, r)}

    # ---- calls ----

    def update_lora(self, gate_a=None, gate_b=None, up_a=None, up_b=None, down_a=None, down_b=None):
        """Binds the six LoRA arrays (all float32 or all bfloat16, C-contiguous) by reference: the layer
        reads them at every call, so in-place updates (``a -= lr * g``) need no new update_lora, and keeps
        them alive while they are bound. ``update_lora(None)`` (no arrays) unbinds them: the layer then runs
        the base layer only (forward without the adapters; backward gives zero LoRA grads)."""
        arrays = dict(gate_a=gate_a, gate_b=gate_b, up_a=up_a, up_b=up_b, down_a=down_a, down_b=down_b)
        missing = [n for n, a in arrays.items() if a is None]
        if len(missing) == len(arrays):
            with self._lock:
                _check(self._backend.update_lora(self._live(), None))
                object.__setattr__(self, "_lora", None)
            return
        if self.lora_rank == 0:
            raise invalid("layer.update_lora: this layer has lora_rank = 0, so it has no adapters to bind")
        if missing:
            raise invalid(f"layer.update_lora takes all six LoRA arrays, or none to unbind; {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} missing")
        dtype = None
        for name, shape in self.lora_shapes().items():
            a = arrays[name]
            if not isinstance(a, np.ndarray):
                raise invalid(f"{name} must be a numpy array (it is kept by reference), got {type(a).__name__}")
            if a.dtype not in _LORA_DTYPES:
                raise invalid(f"{name} has dtype {a.dtype}; LoRA arrays must be float32 or bfloat16 (they are "
                              "read in place, so they are never converted)")
            dtype = dtype or a.dtype
            if a.dtype != dtype:
                raise invalid(f"{name} has dtype {a.dtype} but gate_a has {dtype}; all six must share one dtype")
            _check_shape(a, name, shape)
            if not a.flags.c_contiguous:
                raise invalid(f"{name} must be C-contiguous (it is read in place, never copied)")
        with self._lock:  # the binding in C and the references kept here change together
            _check(self._backend.update_lora(self._live(), [_bits(arrays[n]) for n in Grads.LORA_FIELDS]))
            object.__setattr__(self, "_lora", arrays)

    def forward(self, x, expert_ids, routing_weights, save_for_backward=False):
        """out[t] = sum_j routing_weights[t, j] * expert_{expert_ids[t, j]}(x[t]); returns x's dtype.

        x: [T, H] bf16 or float; expert_ids: [T, k] int64/int32 with -1 for "no expert"; routing_weights [T, k].
        With save_for_backward, what backward needs is kept until backward (or discard_saved) takes it.
        """
        x_in, xb, ids, w = _forward_inputs(x, expert_ids, routing_weights, self.hidden_size)
        T, k = ids.shape
        out = np.empty((T, self.hidden_size), dtype=bfloat16)
        with self._lock:
            _check(self._backend.forward(self._live(), ids, w, _bits(xb), _bits(out), bool(save_for_backward)))
            if save_for_backward:
                self._pending.append(_Pending(T, k, x_in.dtype if x_in.dtype.kind == "f" else bfloat16))
        return out if out.dtype == x_in.dtype or x_in.dtype.kind != "f" else out.astype(x_in.dtype)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def backward(self, grad_output, out=None, accumulate=False, lora_grads=True):
        """Backward of the most recent forward(save_for_backward=True), which it consumes.

        Returns Grads. With ``out`` (a Grads, e.g. the previous call's), writes into its arrays instead of
        allocating; with ``accumulate=True`` the LoRA grads are added to ``out``'s instead of overwriting
        them (gradient accumulation over micro-batches of any sizes). ``out.input`` and
        ``out.routing_weights`` belong to this call: reused when they fit its T, replaced when they do not,
        always overwritten. ``lora_grads=False`` skips the LoRA grads.
        """
        with self._lock:  # pending forward and C cache change together
            return self._backward(grad_output, out, accumulate, lora_grads)

    def _backward(self, grad_output, out, accumulate, lora_grads):
        layer = self._live()  # under self._lock
        if not self._pending:
            raise CacheEmptyError(CacheEmptyError.status_name, "layer.backward: no saved forward to take: call "
                                  "layer.forward(..., save_for_backward=True) first")
        pending = self._pending[-1]
        T, k, H = pending.qlen, pending.top_k, self.hidden_size
        go = _as_bf16(grad_output, "grad_output", (T, H))
        want_lora = lora_grads and self.lora_rank > 0
        shapes = self.lora_shapes()
        if out is None:
            if accumulate:
                raise invalid("layer.backward: accumulate=True needs out= (the grads to add into)")
            out = Grads(None, None, **{n: None for n in Grads.LORA_FIELDS})
        elif not isinstance(out, Grads):
            raise invalid(f"out must be a moe_sft.Grads, got {type(out).__name__}")
        # Everything is prepared in locals and reaches `out` only after the library succeeded: a failing call
        # leaves the caller's Grads as it was (the library writes nothing on error either).
        # per-call grads: reused when they fit this call, else replaced
        gi_out = out.input
        if not (isinstance(gi_out, np.ndarray) and gi_out.shape == (T, H) and gi_out.flags.writeable
                and (gi_out.dtype.kind == "f" or gi_out.dtype == bfloat16)):
            gi_out = np.empty((T, H), dtype=pending.dtype)
        gw = out.routing_weights
        if not (isinstance(gw, np.ndarray) and gw.shape == (T, k) and gw.dtype == np.float32
                and gw.flags.c_contiguous and gw.flags.writeable):
            gw = np.empty((T, k), np.float32)
        lora_out = {}
        if want_lora:
            for n, shape in shapes.items():
                a = getattr(out, n)
                if a is None and not accumulate:
                    a = np.empty(shape, np.float32)
                _out_array(a, f"out.{n}", shape, np.float32)
                lora_out[n] = a
        # A fused adapter binds one A as both gate_a and up_a: its grad is the sum of the two, accumulated in
        # out.gate_a, and out.up_a becomes that same array. The library writes up_a's share into a temporary.
        bound = self._lora or {}
        shared_a = want_lora and bound.get("gate_a") is not None and bound.get("gate_a") is bound.get("up_a")
        if shared_a:
            up_share = (np.zeros if accumulate else np.empty)(shapes["up_a"], np.float32)
        direct = gi_out.dtype == bfloat16 and gi_out.flags.c_contiguous
        gi = gi_out if direct else np.empty((T, H), dtype=bfloat16)
        grads = None
        if want_lora:
            grads = [up_share if shared_a and n == "up_a" else lora_out[n] for n in Grads.LORA_FIELDS]
        _check(self._backend.backward(layer, _bits(go), _bits(gi), gw, grads, bool(accumulate)))
        self._pending.pop()
        if not direct:
            gi_out[...] = gi.astype(gi_out.dtype)
        if shared_a:
            lora_out["gate_a"] += up_share
            lora_out["up_a"] = lora_out["gate_a"]
        out.input, out.routing_weights = gi_out, gw
        for n, a in lora_out.items():
            setattr(out, n, a)
        return out

    def discard_saved(self, n=1):
        """Drops the ``n`` most recent saved forwards without a backward, e.g. after an exception between
        forward(save_for_backward=True) and backward, after a NonFiniteError in backward, or after an eval
        forward saved by mistake; otherwise the next saving forward would raise CacheFullError."""
        try:
            n = operator.index(n)
        except TypeError:
            raise invalid(f"layer.discard_saved: n = {n!r} is not an integer") from None
        with self._lock:
            _check(self._backend.discard_saved(self._live(), n))
            if n > 0:
                del self._pending[-n:]
