"""numpy API over the C ABI: MoESFT, Grads."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import _backend, _quantize
from ._arrays import _address, _as_bf16, _as_f32, _check, _check_shape, _expert_ids, _out_array, bfloat16
from ._errors import invalid

_DTYPE_CODE = {bfloat16: 0, np.dtype(np.float32): 1}


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
    channel) or "int4_awq" (per group of group_size along K, default 128). Pre-quantized weights (including
    "int4_k2" checkpoints) go to MoESFT.from_quantized.

    check_finite: stop at the first NaN/Inf with an error naming the stage, tensor, position and value
    (None: on when the environment has MOE_SFT_CHECK_FINITE=1). Base weights are checked here, once.
    """

    def __init__(self, gate_proj, up_proj, down_proj, *, lora_rank=16, lora_alpha=32.0, max_cache_depth=1,
                 num_threads=None, tp_count=1, check_finite=None, weight_format="bf16", group_size=None):
        self._create(_quantize.from_bf16(gate_proj, up_proj, down_proj, weight_format, group_size), lora_rank,
                     lora_alpha, max_cache_depth, num_threads, tp_count, check_finite)

    @classmethod
    def from_quantized(cls, gate_proj, up_proj, down_proj, *, lora_rank=16, lora_alpha=32.0, max_cache_depth=1,
                       num_threads=None, tp_count=1, check_finite=None):
        """A layer on pre-quantized base weights: three QuantizedWeight (from moe_sft.quantize, or built from a
        checkpoint, e.g. Kimi-K2's weight_packed / weight_scale as QuantizedWeight("int4_k2", 32, packed,
        scale, None)) of one format and group size, for gate_proj, up_proj [E, I, H] and down_proj [E, H, I].
        The other arguments are MoESFT's."""
        base = _quantize.prequantized(gate_proj, up_proj, down_proj)
        layer = cls.__new__(cls)
        layer._create(base, lora_rank, lora_alpha, max_cache_depth, num_threads, tp_count, check_finite)
        return layer

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, layer_idx, **layer_kwargs):
        """A layer on the routed experts of layer ``layer_idx`` of a Hugging Face checkpoint directory (bf16,
        f16, f32 or compressed-tensors int4 weights; see moe_sft.load_experts). layer_kwargs are MoESFT's."""
        from ._checkpoints import load_experts
        return load_experts(checkpoint_dir, layer_idx).create_layer(cls, **layer_kwargs)

    def _create(self, base, lora_rank, lora_alpha, max_cache_depth, num_threads, tp_count, check_finite):
        E, H, I = base.experts, base.hidden, base.intermediate
        self.expert_num, self.intermediate_size, self.hidden_size = E, I, H
        self.weight_format, self.group_size = base.weight_format, base.group_size
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha)
        self.max_cache_depth = int(max_cache_depth)
        self.tp_count = int(tp_count)
        threads = 0 if num_threads is None else int(num_threads)
        self._handle = 0
        self._lora = None
        self._pending = []
        # The C layer makes each call atomic; this lock also keeps _pending in the order the C cache was
        # pushed and popped when one MoESFT is shared by threads.
        self._lock = threading.Lock()
        addresses = base.addresses()
        status, handle = _backend.backend.create(E, H, I, self.lora_rank, self.lora_alpha, self.max_cache_depth,
                                                 threads, self.tp_count, *addresses[:3],
                                                 -1 if check_finite is None else int(bool(check_finite)),
                                                 _quantize.format_code(base.weight_format), base.group_size,
                                                 int(base.prequantized), *addresses[3:])
        _check(status)
        self._handle = handle

    def __del__(self):
        self.close()

    def close(self):
        """Frees the layer now (also done when it is garbage-collected). Waits for a call in flight."""
        if getattr(self, "_handle", 0):
            with self._lock:
                if self._handle:
                    _backend.backend.destroy(self._handle)
                    self._handle = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        if not self._handle:
            raise invalid("the layer is closed")
        return self._handle

    @property
    def isa(self):
        """Kernel family this layer runs on (e.g. 'generic')."""
        with self._lock:
            return _backend.backend.layer_isa(self._live())

    @property
    def cache_depth(self):
        """Saved forwards awaiting backward."""
        with self._lock:
            status, depth = _backend.backend.cache_depth(self._live())
        _check(status)
        return depth

    def lora_shapes(self):
        E, H, I, r = self.expert_num, self.hidden_size, self.intermediate_size, self.lora_rank
        return {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H), "up_b": (E, I, r),
                "down_a": (E, r, I), "down_b": (E, H, r)}

    def update_lora(self, gate_a, gate_b, up_a, up_b, down_a, down_b):
        """Binds the six LoRA arrays (all float32 or all bfloat16, C-contiguous) by reference: the layer
        reads them at every call, so in-place updates (``a -= lr * g``) need no new update_lora."""
        arrays = dict(gate_a=gate_a, gate_b=gate_b, up_a=up_a, up_b=up_b, down_a=down_a, down_b=down_b)
        dtype = None
        for name, shape in self.lora_shapes().items():
            a = arrays[name]
            if not isinstance(a, np.ndarray):
                raise invalid(f"{name} must be a numpy array (it is kept by reference), got {type(a).__name__}")
            if a.dtype not in _DTYPE_CODE:
                raise invalid(f"{name} has dtype {a.dtype}; LoRA arrays must be float32 or bfloat16 (they are "
                              "read in place, so they are never converted)")
            dtype = dtype or a.dtype
            if a.dtype != dtype:
                raise invalid(f"{name} has dtype {a.dtype} but gate_a has {dtype}; all six must share one dtype")
            _check_shape(a, name, shape)
            if not a.flags.c_contiguous:
                raise invalid(f"{name} must be C-contiguous (it is read in place, never copied)")
        with self._lock:  # the binding in C and the references kept here change together
            _check(_backend.backend.update_lora(self._live(), _DTYPE_CODE[dtype],
                                                *(_address(arrays[n]) for n in Grads.LORA_FIELDS)))
            self._lora = arrays  # keep them alive while the layer holds their addresses

    def forward(self, x, expert_ids, routing_weights, save_for_backward=False):
        """out[t] = sum_j routing_weights[t, j] * expert_{expert_ids[t, j]}(x[t]); returns x's dtype.

        x: [T, H] bf16 or float; expert_ids: [T, k] int64/int32 with -1 for "no expert"; routing_weights [T, k].
        """
        x_in = np.asarray(x)
        xb = _as_bf16(x_in, "x")
        if xb.ndim != 2 or xb.shape[1] != self.hidden_size:
            raise invalid(f"x has shape {xb.shape}; expected [tokens, {self.hidden_size}]")
        T = xb.shape[0]
        ids, k = _expert_ids(expert_ids, T)
        w = _as_f32(routing_weights, "routing_weights", (T, k))
        out = np.empty((T, self.hidden_size), dtype=bfloat16)
        with self._lock:
            handle = self._live()
            _check(_backend.backend.forward(handle, T, k, _address(ids), _address(w), _address(xb), _address(out),
                                            int(bool(save_for_backward))))
            if save_for_backward:
                self._pending.append(_Pending(T, k, x_in.dtype if x_in.dtype.kind == "f" else bfloat16))
        return out if out.dtype == x_in.dtype or x_in.dtype.kind != "f" else out.astype(x_in.dtype)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def backward(self, grad_output, out=None, accumulate=False, lora_grads=True):
        """Backward of the most recent forward(save_for_backward=True), which it consumes.

        Returns Grads. With ``out`` (a Grads), writes into its arrays instead of allocating; with
        ``accumulate=True`` the LoRA grads are added to ``out``'s instead of overwriting them
        (grad input and routing-weight grads are always overwritten). ``lora_grads=False`` skips them.
        """
        with self._lock:  # pending forward and C cache change together
            return self._backward(grad_output, out, accumulate, lora_grads)

    def _backward(self, grad_output, out, accumulate, lora_grads):
        handle = self._live()  # under self._lock
        if not self._pending:  # let the library report it, with its status and message
            _check(_backend.backend.backward(handle, *([0] * 9), int(bool(accumulate))))
        pending = self._pending[-1]
        T, k, H = pending.qlen, pending.top_k, self.hidden_size
        go = _as_bf16(grad_output, "grad_output", (T, H))
        want_lora = lora_grads and self.lora_rank > 0
        if out is None:
            if accumulate:
                raise invalid("accumulate=True needs out= (the grads to add into)")
            shapes = self.lora_shapes()
            out = Grads(np.empty((T, H), dtype=pending.dtype), np.empty((T, k), dtype=np.float32),
                        **{n: (np.empty(shapes[n], np.float32) if want_lora else None) for n in Grads.LORA_FIELDS})
        else:
            if not isinstance(out, Grads):
                raise invalid(f"out must be a moe_sft.Grads, got {type(out).__name__}")
            if not isinstance(out.input, np.ndarray) or out.input.dtype.kind != "f" and out.input.dtype != bfloat16:
                raise invalid("out.input must be a float or bfloat16 numpy array")
            _check_shape(out.input, "out.input", (T, H))
            _out_array(out.routing_weights, "out.routing_weights", (T, k), np.float32)
            if want_lora:
                for n, shape in self.lora_shapes().items():
                    _out_array(getattr(out, n), f"out.{n}", shape, np.float32)
        direct = out.input.dtype == bfloat16 and out.input.flags.c_contiguous and out.input.flags.writeable
        gi = out.input if direct else np.empty((T, H), dtype=bfloat16)
        lora_addresses = [_address(getattr(out, n)) if want_lora else 0 for n in Grads.LORA_FIELDS]
        _check(_backend.backend.backward(handle, _address(go), _address(gi), _address(out.routing_weights),
                                         *lora_addresses, int(bool(accumulate))))
        if self._pending:
            self._pending.pop()
        if not direct:
            out.input[...] = gi.astype(out.input.dtype)
        return out

