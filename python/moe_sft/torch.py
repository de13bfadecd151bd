"""PyTorch front end: an autograd Function and an nn.Module over a moe_sft.MoESFT (``pip install "moe_sft[torch]"``).

    import moe_sft.torch as mt
    experts = mt.MoEExperts.from_weights(gate_proj, up_proj, down_proj, lora_rank=16, lora_alpha=32)
    out = experts(hidden_states, top_k_index, top_k_weights)     # [T, H]; grads for x, weights and LoRA
    opt = torch.optim.AdamW(experts.parameters(), lr=1e-4)      # updates the Parameters the layer reads

``import moe_sft`` never imports this module (nor torch).

Tensors cross without copies: a CPU tensor is handed to the layer as a numpy view of its storage (bf16 through
an int16 view, see ``as_numpy``) and the layer's outputs come back as tensors over its numpy arrays. Hidden
states in float32/float16 are rounded to bf16 once (the layer computes in bf16) and the output is widened back;
hidden states on another device are moved to the CPU and back.

LoRA tensors are bound to the layer by reference: it reads their storage in place at every call, so an
optimizer updating them in place needs nothing else. What is bound is checked at every call (data pointer,
shape, dtype, contiguity, device): a tensor replaced instead of updated in place (``module.gate_a =
nn.Parameter(...)``, ``param.data = new``, a dtype change) is bound again before the layer runs. The arrays
bound last keep their tensors alive, so the layer never reads freed memory.

Saved forwards and autograd. The layer keeps what a backward needs in its own LIFO cache (``max_cache_depth``
deep). Each saved forward gets a serial number, stored in a one-element "token" tensor that the autograd
context saves like any other tensor (``ctx.save_for_backward``); backward reads the serial back from the token
and uses the layer's saved forward only when it is that serial's and on top of the cache. Pairing therefore
follows torch's own saved-tensor machinery:
- gradient checkpointing (non-reentrant): the first forward's token is dropped by checkpoint's pack hook, so its
  saved forward is discarded at once; the forward recomputed during backward makes a new token, which torch
  hands to the original node's backward, so that backward takes the recomputed saved forward;
- a graph dropped without backward: its tokens die with it, and their saved forwards are discarded (at once
  when on top of the cache, else as soon as what lies above them is gone);
- any other case where a backward does not find its saved forward on top (``retain_graph`` and a second
  backward, backwards in another order than the forwards, a cache that was full): the backward recomputes its
  forward from the saved inputs and takes that. It costs one forward more, never a wrong pairing.
A forward that finds the cache full drops the most recent saved forward (whose backward then recomputes) and
warns once: give the layer a larger ``max_cache_depth`` for several forwards before one backward.
Forwards that need no grad (``torch.no_grad()``, inference mode, no input requiring grad) save nothing.

Drive a layer either through this module or directly, not both at once: a saved forward pushed or dropped
behind this module's back makes the next call here raise (``layer.discard_saved(layer.cache_depth)`` resets).
"""
from __future__ import annotations

import contextlib
import re
import threading
import warnings
import weakref

import ml_dtypes
import numpy as np
import torch

from ._arrays import bfloat16
from ._errors import MoESFTError, invalid
from ._layer import Grads, MoESFT
from ._optim import LORA_NAMES, lora_init
from ._quantize import QuantizedWeight

__all__ = ["as_numpy", "as_tensor", "experts_forward", "MoEExperts", "PROJECTIONS"]

PROJECTIONS = ("gate", "up", "down")

# torch dtypes numpy has no type for: viewed through an integer dtype of the same size, then as ml_dtypes' type
_VIA_INTEGER = {
    torch.bfloat16: (torch.int16, bfloat16),
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
}
_FROM_ML_DTYPES = {np_type: (np.dtype(np.int16 if np_type.itemsize == 2 else np.uint8), torch_type)
                   for torch_type, (_, np_type) in _VIA_INTEGER.items()}
_LORA_DTYPES = (torch.float32, torch.bfloat16)


# ---- tensors <-> numpy, without copies ---------------------------------------------------------------------------

def as_numpy(tensor, name, *, contiguous=True):
    """A numpy view of a CPU tensor's storage (no copy; it keeps the tensor alive): bfloat16 as
    ``ml_dtypes.bfloat16`` (through an int16 view), float8_e4m3fn / float8_e5m2 as ml_dtypes' types, every
    other dtype numpy has as it is. ``name`` is the argument named in errors. With ``contiguous`` (default) a
    non-contiguous tensor is an error (the library reads C-contiguous memory); ``contiguous=False`` gives a
    strided view instead. Autograd is not involved: the view is of ``tensor.detach()``."""
    if not isinstance(tensor, torch.Tensor):
        raise invalid(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise invalid(f"{name} is on {tensor.device}; a numpy view needs a CPU tensor (move it with .cpu())")
    if tensor.layout != torch.strided or tensor.is_conj() or tensor.is_neg():
        lazy = " with a lazy conjugation or negation" if tensor.layout == torch.strided else ""
        raise invalid(f"{name} is a {tensor.layout} tensor{lazy}; a numpy view needs a plain strided tensor "
                      "(.resolve_conj().resolve_neg() or .to_dense() makes one)")
    if contiguous and not tensor.is_contiguous():
        raise invalid(f"{name} is not contiguous (shape {tuple(tensor.shape)}, strides {tensor.stride()}); the "
                      "library reads it in place, so it must be contiguous (.contiguous() makes a copy)")
    t = tensor.detach()
    via = _VIA_INTEGER.get(t.dtype)
    try:
        return t.view(via[0]).numpy().view(via[1]) if via else t.numpy()
    except TypeError:
        raise invalid(f"{name} has dtype {t.dtype}, which numpy cannot view") from None


def as_tensor(array):
    """A CPU tensor over a numpy array's memory (no copy; it keeps the array alive); ``ml_dtypes.bfloat16``,
    float8_e4m3fn and float8_e5m2 arrays become torch's dtypes. The inverse of ``as_numpy``."""
    array = np.asarray(array)
    via = _FROM_ML_DTYPES.get(array.dtype)
    return torch.from_numpy(array.view(via[0])).view(via[1]) if via else torch.from_numpy(array)


# ---- one layer's saved forwards and binding, as this module sees them -------------------------------------------

class _LayerState:
    """This module's bookkeeping for one MoESFT: which of the layer's saved forwards are whose, and which tensors
    are bound. Every call on the layer from this module runs under ``lock`` (see ``locked``)."""

    def __init__(self, layer):
        self.layer_ref = weakref.ref(layer)
        self.lock = threading.Lock()
        self.stack = []  # serials of the saved forwards pushed here, oldest first: the top of the layer's cache
        self.dead = set()  # serials whose token died: no backward will come for them
        self.next_serial = 1
        self.bound = None  # (signature of the bound tensors, the numpy arrays bound) or None
        self.warned_full = False

    # -- saved forwards --

    def check_in_step(self, layer):
        """The layer's cache holds exactly the saved forwards pushed here (else raise): a saved forward pushed or
        dropped by direct calls on the layer would make positions meaningless."""
        depth = layer.cache_depth
        if depth == len(self.stack):
            return
        if depth == 0:  # all dropped (e.g. discard_saved(cache_depth)): their backwards will recompute
            self.stack.clear()
            self.dead.clear()
            return
        raise invalid(f"the layer holds {depth} saved forward(s) but moe_sft.torch pushed {len(self.stack)}: it was "
                      "also driven directly (forward(save_for_backward=True), backward or discard_saved). Drive a "
                      "layer through moe_sft.torch or directly, not both; layer.discard_saved(layer.cache_depth) "
                      "resets it (pending backwards then recompute their forwards)")

    def sweep(self, layer):
        """Discards the saved forwards on top of the cache whose tokens died."""
        while self.stack and self.stack[-1] in self.dead:
            layer.discard_saved(1)
            self.dead.discard(self.stack.pop())
        if self.dead:
            self.dead.intersection_update(self.stack)

    @contextlib.contextmanager
    def locked(self):
        """Holds the lock; after releasing it, drops what tokens that died meanwhile left (their finalizers could
        not take the lock, see sweep_if_free)."""
        try:
            with self.lock:
                yield
        finally:
            self.sweep_if_free()

    def sweep_if_free(self):
        """Discards the dead saved forwards on top of the cache, unless a call holds the lock: that call sweeps
        when it releases it (a finalizer may run on any thread, at any point, even inside such a call). Nor while
        the layer is busy with a direct call: it may be this thread's (a garbage collection inside it), which
        would wait for itself; the next call here sweeps instead."""
        layer = self.layer_ref()
        if not self.dead or layer is None or layer.busy or not self.lock.acquire(blocking=False):
            return
        try:
            self.check_in_step(layer)
            self.sweep(layer)
        except MoESFTError:
            pass  # a closed layer, or one also driven directly: its next call reports it
        finally:
            self.lock.release()

    def make_room(self, layer):
        """Discards the most recent saved forward(s) until one more fits (their backwards will recompute)."""
        if layer.max_cache_depth == 0:
            raise invalid("the layer has max_cache_depth = 0: it cannot save a forward, so it has no backward; make "
                          "it with max_cache_depth >= 1, or run it under torch.no_grad()")
        while len(self.stack) >= layer.max_cache_depth:
            layer.discard_saved(1)
            self.dead.discard(self.stack.pop())
            if not self.warned_full:
                self.warned_full = True
                warnings.warn(f"moe_sft.torch: the layer's forward cache is full (max_cache_depth = "
                              f"{layer.max_cache_depth}): the most recent saved forward was dropped and its backward "
                              "will recompute it. Make the layer with a larger max_cache_depth to run several "
                              "forwards before one backward without recomputing", RuntimeWarning, stacklevel=5)

    def push(self, layer):
        """Records a forward just saved on the layer; returns its token (a tensor holding its serial) with a
        finalizer that marks the saved forward dead when the token dies. The finalizer holds the layer: a graph
        keeps its layer alive through the tokens it saved, so a graph already backpropagated (saved tensors
        freed) does not (its node only has a weak reference), and the layer is freed with its module."""
        serial = self.next_serial
        self.next_serial += 1
        self.stack.append(serial)
        token = torch.tensor([serial], dtype=torch.int64, device="cpu")
        weakref.finalize(token, _token_died, self, serial, layer).atexit = False
        return token

    # -- binding --

    def bind(self, layer, lora):
        """Makes the layer read exactly ``lora`` (name -> tensor, validated; missing names read zeros; None: no
        adapters), rebinding when anything about them changed since the last call."""
        if not lora:
            if self.bound is not None or layer.lora is not None:
                layer.update_lora(None)
                self.bound = None
            return
        signature = tuple((n, t.data_ptr(), t.shape, t.dtype, t.is_contiguous(), t.device) for n, t in lora.items())
        current = layer.lora
        if self.bound is not None and self.bound[0] == signature and current is not None and all(
                current[n] is a for n, a in self.bound[1].items()):
            return
        dtype = _check_lora(layer, lora)
        arrays = {name: _zeros(name, shape, dtype) if lora.get(name) is None else as_numpy(lora[name], name)
                  for name, shape in layer.lora_shapes().items()}
        layer.update_lora(**arrays)
        self.bound = (signature, arrays)


# Adapters that are not given, and the grads nobody asked for, are shared by all layers of a shape: a model of many
# layers trained on some projections only would otherwise keep one set of each per layer.
# Keyed by name too: gate_a and up_a of one shape must stay distinct arrays (the same array bound as both is a
# shared A to the layer; the same array as both grads would be written twice at once).
_ZEROS = {}  # (name, shape, torch dtype) -> zero array standing in for an adapter that is not given
_SCRATCH = threading.local()  # .arrays: (name, shape) -> f32 array unwanted LoRA grads are written to, never read


def _zeros(name, shape, dtype):
    """A zero array for an adapter that is not given: np.zeros maps untouched pages, which the layers only read,
    so it costs address space, not memory. Never written, so layers and threads can share it."""
    key = (name, shape, dtype)
    if key not in _ZEROS:
        zeros = np.zeros(shape, bfloat16 if dtype == torch.bfloat16 else np.float32)
        _ZEROS.setdefault(key, zeros)
    return _ZEROS[key]


def _scratch_grad(name, shape):
    """An f32 array for LoRA grads the layer writes but nobody wants: one per name, shape and thread (a backward
    writes it, and two threads may run backwards on two layers at once)."""
    arrays = _SCRATCH.__dict__.setdefault("arrays", {})
    key = (name, shape)
    if key not in arrays:
        arrays[key] = np.empty(shape, np.float32)
    return arrays[key]


def _token_died(state, serial, layer):  # noqa: ARG001 - layer: held until the token dies (see push)
    """A saved forward's token died (its graph was dropped or backpropagated, or checkpointing packed it away): no
    backward will use that saved forward."""
    state.dead.add(serial)
    state.sweep_if_free()


_STATES = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def _state(layer):
    state = _STATES.get(layer)
    if state is None:
        with _STATES_LOCK:
            state = _STATES.setdefault(layer, _LayerState(layer))
    return state


# ---- arguments ---------------------------------------------------------------------------------------------------

def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise invalid(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_lora(layer, lora):
    """Validates LoRA tensors (name -> tensor) in torch terms; returns their dtype. Devices and contiguity are
    checked by as_numpy when they are bound."""
    if layer.lora_rank == 0:
        raise invalid("the layer has lora_rank = 0: it takes no LoRA tensors (pass lora=None)")
    shapes = layer.lora_shapes()
    first = None
    for name, t in lora.items():
        if name not in shapes:
            raise invalid(f"lora has an unknown key {name!r}; LoRA tensors are named {', '.join(shapes)}")
        if t.dtype not in _LORA_DTYPES:
            raise invalid(f"{name} has dtype {t.dtype}; LoRA tensors must be torch.float32 or torch.bfloat16 (the "
                          "layer reads them in place, so they are never converted)")
        first = first or name
        if t.dtype != lora[first].dtype:
            raise invalid(f"{name} has dtype {t.dtype} but {first} has {lora[first].dtype}; all LoRA tensors of a "
                          "layer share one dtype")
        if tuple(t.shape) != shapes[name]:
            raise invalid(f"{name} has shape {tuple(t.shape)}; expected {shapes[name]} for this layer "
                          f"(experts {layer.expert_num}, hidden {layer.hidden_size}, intermediate "
                          f"{layer.intermediate_size}, rank {layer.lora_rank})")
    return lora[first].dtype


def _lora_dict(lora):
    if lora is None:
        return {}
    if not hasattr(lora, "items"):
        raise invalid(f"lora must be a dict name -> torch.Tensor (or None), got {type(lora).__name__}")
    lora = {name: t for name, t in lora.items() if t is not None}
    for name, t in lora.items():
        _check_tensor(t, f"lora[{name!r}]")
    return lora


def _inputs(layer, hidden_states, top_k_index, top_k_weights):
    """The layer's inputs as numpy views of CPU tensors: x bf16 [T, H], ids int64/int32 [T, k], weights f32 [T, k].
    A copy is made only to move a tensor to the CPU, to round x to bf16 or to make it contiguous."""
    H = layer.hidden_size
    _check_tensor(hidden_states, "hidden_states")
    _check_tensor(top_k_index, "top_k_index")
    _check_tensor(top_k_weights, "top_k_weights")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != H:
        raise invalid(f"hidden_states has shape {tuple(hidden_states.shape)}; expected [tokens, {H}]")
    if not hidden_states.is_floating_point():
        raise invalid(f"hidden_states has dtype {hidden_states.dtype}; expected torch.bfloat16, torch.float32 or "
                      "torch.float16")
    T = hidden_states.shape[0]
    if top_k_index.dtype not in (torch.int64, torch.int32):
        raise invalid(f"top_k_index has dtype {top_k_index.dtype}; expected torch.int64 or torch.int32")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
        raise invalid(f"top_k_index has shape {tuple(top_k_index.shape)}; expected [{T}, top_k] (hidden_states has "
                      f"{T} tokens)")
    if not top_k_weights.is_floating_point():
        raise invalid(f"top_k_weights has dtype {top_k_weights.dtype}; expected a floating dtype")
    if top_k_weights.shape != top_k_index.shape:
        raise invalid(f"top_k_weights has shape {tuple(top_k_weights.shape)}; expected {tuple(top_k_index.shape)}, "
                      "the shape of top_k_index")
    x = hidden_states.detach().to("cpu", torch.bfloat16).contiguous()
    ids = top_k_index.detach().to("cpu").contiguous()
    w = top_k_weights.detach().to("cpu", torch.float32).contiguous()
    return as_numpy(x, "hidden_states"), as_numpy(ids, "top_k_index"), as_numpy(w, "top_k_weights")


def _like(t, like):
    """t in like's dtype and on like's device (t itself when it already is)."""
    return t.to(device=like.device, dtype=like.dtype)


# The layer's messages name its numpy arguments and methods; these calls came from torch's.
_TORCH_TERMS = {"expert_ids": "top_k_index", "routing_weights": "top_k_weights",
                "layer.forward": "moe_sft.torch forward", "layer.backward": "moe_sft.torch backward"}
_NUMPY_TERM = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in _TORCH_TERMS) + r")\b")


@contextlib.contextmanager
def _in_torch_terms():
    """Re-raises the layer's errors (same class and status) with the message in experts_forward's terms."""
    try:
        yield
    except MoESFTError as e:
        message = _NUMPY_TERM.sub(lambda m: _TORCH_TERMS[m.group(0)], str(e))
        if message == str(e):
            raise
        raise type(e)(e.status, message).with_traceback(e.__traceback__) from None


# ---- forward and backward on the layer ---------------------------------------------------------------------------

def _run_forward(layer, inputs, lora, save):
    """The layer's output (numpy bf16) and, when saved, the token of the saved forward."""
    state = _state(layer)
    with _in_torch_terms(), state.locked():
        state.bind(layer, lora)
        if not save:
            return layer.forward(*inputs), None
        state.check_in_step(layer)
        state.sweep(layer)
        state.make_room(layer)
        out = layer.forward(*inputs, save_for_backward=True)
        return out, state.push(layer)


def _run_backward(layer, serial, recompute_inputs, lora, grad_output, top_k, wanted):
    """Grads (torch tensors: input bf16, routing weights f32, the LoRA tensors named in ``wanted`` f32; the layer
    writes the others' to scratch) of the saved forward ``serial``, recomputing that forward when it is not on top
    of the layer's cache."""
    state = _state(layer)
    go = as_numpy(grad_output.detach().to("cpu", torch.bfloat16).contiguous(), "grad_output")
    with _in_torch_terms(), state.locked():
        state.check_in_step(layer)
        state.sweep(layer)
        state.bind(layer, lora)
        if state.stack and state.stack[-1] == serial:
            state.stack.pop()  # the layer's top is this backward's: taken below, or dropped if that fails
        else:  # not saved, dropped, taken by an earlier backward, or below another: recompute it
            if serial in state.stack:
                state.dead.add(serial)  # no longer needed; dropped when it reaches the top
            state.make_room(layer)
            layer.forward(*recompute_inputs(), save_for_backward=True)
        T = go.shape[0]
        gi = torch.empty((T, layer.hidden_size), dtype=torch.bfloat16, device="cpu")
        gw = torch.empty((T, top_k), dtype=torch.float32, device="cpu")
        shapes = layer.lora_shapes()
        lora_grads = {n: torch.empty(shapes[n], dtype=torch.float32, device="cpu") for n in wanted}
        want_lora = bool(wanted)
        out = Grads(as_numpy(gi, "grad_input"), as_numpy(gw, "grad_routing_weights"),
                    **{n: (as_numpy(lora_grads[n], n) if n in lora_grads else _scratch_grad(n, shapes[n]))
                       if want_lora else None for n in LORA_NAMES})
        try:
            layer.backward(go, out=out, lora_grads=want_lora)
        except BaseException:
            if layer.cache_depth > len(state.stack):  # a failed backward leaves its saved forward: drop it
                layer.discard_saved(1)
            raise
    return gi, gw, lora_grads


class _ExpertsFunction(torch.autograd.Function):
    """The layer as an autograd node. Inputs after the non-tensor ones: hidden_states, top_k_index, top_k_weights,
    then the LoRA tensors named by ``names``."""

    @staticmethod
    def forward(ctx, layer, names, inputs, hidden_states, top_k_index, top_k_weights, *lora_tensors):
        out, token = _run_forward(layer, inputs, dict(zip(names, lora_tensors)), save=True)
        ctx.layer_ref, ctx.names = weakref.ref(layer), names  # the token keeps the layer alive (see push)
        # The LoRA tensors are saved so that torch reports an in-place update between forward and backward, as it
        # does for any tensor a backward needs; the inputs, to recompute the forward when its saved one is gone.
        ctx.save_for_backward(hidden_states, top_k_index, top_k_weights, token, *lora_tensors)
        return _like(as_tensor(out), hidden_states)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the layer's backward is not itself differentiable
    def backward(ctx, grad_output):
        # Read first, without any lock: under checkpointing this runs the recomputing forward.
        hidden_states, top_k_index, top_k_weights, token, *lora_tensors = ctx.saved_tensors
        layer = ctx.layer_ref()
        if layer is None:  # only a token the layer's finalizer did not see, e.g. one copied by a saved-tensor hook
            raise invalid("moe_sft.torch backward: the MoESFT layer of this forward was freed before its backward")
        lora = dict(zip(ctx.names, lora_tensors))
        need = dict(zip(("x", "w", *ctx.names), ctx.needs_input_grad[3:4] + ctx.needs_input_grad[5:]))
        gi, gw, lora_grads = _run_backward(
            layer, int(token.item()), lambda: _inputs(layer, hidden_states, top_k_index, top_k_weights), lora,
            grad_output, top_k_index.shape[1], [n for n in ctx.names if need[n]])
        return (None, None, None, _like(gi, hidden_states) if need["x"] else None, None,
                _like(gw, top_k_weights) if need["w"] else None,
                *(_like(lora_grads[n], lora[n]) if need[n] else None for n in ctx.names))


def experts_forward(layer, hidden_states, top_k_index, top_k_weights, lora=None):
    """The routed experts of ``layer`` (a moe_sft.MoESFT) on ``hidden_states`` [T, H], differentiable in
    hidden_states, top_k_weights and the LoRA tensors.

    hidden_states: bf16, float32 or float16, on any device (moved to the CPU and back); the result [T, H] has its
    dtype and device. top_k_index: [T, k] torch.int64 or torch.int32 expert ids, -1 for "no expert".
    top_k_weights: [T, k] floating routing weights (router training: their grad flows back). lora: a dict
    name -> tensor of the LoRA tensors (gate_a [E, r, H], gate_b [E, I, r], up_a, up_b, down_a [E, r, I],
    down_b [E, H, r]; CPU, contiguous, all torch.float32 or all torch.bfloat16), read in place; names left out
    read zeros (that projection runs without an adapter); None or {} runs the base layer only. The same tensor
    may be given as gate_a and up_a (one A shared, as in PEFT's fused gate_up_proj): its grads add up.
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace numpy views: a graph break, the layer runs eagerly
        # (disabled here, not by a decorator: torch.compiler.disable imports dynamo, seconds at import time)
        return torch.compiler.disable(experts_forward)(layer, hidden_states, top_k_index, top_k_weights, lora)
    if not isinstance(layer, MoESFT):
        raise invalid(f"layer must be a moe_sft.MoESFT, got {type(layer).__name__}")
    lora = _lora_dict(lora)
    inputs = _inputs(layer, hidden_states, top_k_index, top_k_weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, top_k_weights, *lora.values())):
        return _ExpertsFunction.apply(layer, tuple(lora), inputs, hidden_states, top_k_index, top_k_weights,
                                      *lora.values())
    out, _ = _run_forward(layer, inputs, lora, save=False)
    return _like(as_tensor(out), hidden_states)


# ---- the module --------------------------------------------------------------------------------------------------

def _weight_array(w, name):
    """A base weight as MoESFT takes it: numpy arrays and QuantizedWeight as they are, tensors as numpy views
    (moved to the CPU first: the layer packs its own copy)."""
    if isinstance(w, torch.Tensor):
        return as_numpy(w.detach().cpu(), name, contiguous=False)
    return w


class MoEExperts(torch.nn.Module):
    """The routed experts of one MoE layer, on a moe_sft.MoESFT, with LoRA adapters as nn.Parameters.

    Parameters ``{p}_a``, ``{p}_b`` for each p in ``projections`` (of "gate", "up", "down"), in the shapes of
    ``layer.lora_shapes()`` (A [E, r, in], B [E, out, r]), of ``lora_dtype`` (torch.float32 or torch.bfloat16),
    CPU and contiguous; the layer reads them in place. Projections not listed have no Parameters and run
    without an adapter: the layer reads a shared zero array (np.zeros: pages never written, so they cost no
    memory), and the grads it computes for them are written to a scratch array and dropped.

    ``init``: "peft" (PEFT's default: A Kaiming-uniform with a = sqrt(5), B zero, as moe_sft.lora_init),
    "gaussian" (PEFT's "gaussian"), "zeros", or None (left as allocated, zeros: for weights loaded afterwards);
    ``seed`` for moe_sft.lora_init; None: drawn from torch's default generator, so that torch.manual_seed makes
    the init reproducible, as it does PEFT's.
    """

    def __init__(self, layer, *, lora_dtype=torch.float32, init="peft", seed=None, projections=PROJECTIONS):
        super().__init__()
        if not isinstance(layer, MoESFT):
            raise invalid(f"layer must be a moe_sft.MoESFT, got {type(layer).__name__}")
        projections = tuple(projections)
        unknown = [p for p in projections if p not in PROJECTIONS]
        if unknown or len(set(projections)) != len(projections):
            raise invalid(f"projections = {projections!r}; expected distinct names among {PROJECTIONS}")
        if lora_dtype not in _LORA_DTYPES:
            raise invalid(f"lora_dtype = {lora_dtype}; LoRA parameters are torch.float32 or torch.bfloat16")
        if projections and layer.lora_rank == 0:
            raise invalid("the layer has lora_rank = 0: it has no adapters (pass projections=())")
        self._layer = layer
        self.projections = projections
        shapes = layer.lora_shapes()
        for p in projections:  # device="cpu" here and wherever this module makes a tensor: whatever the default
            for name in (f"{p}_a", f"{p}_b"):  # device (torch.set_default_device), the layer reads CPU memory
                self.register_parameter(name, torch.nn.Parameter(torch.zeros(shapes[name], dtype=lora_dtype,
                                                                             device="cpu")))
        self.reset_lora(init, seed)

    @classmethod
    def from_weights(cls, gate_proj, up_proj, down_proj, *, lora_dtype=torch.float32, init="peft", seed=None,
                     projections=PROJECTIONS, **moesft_kwargs):
        """A module over a new MoESFT made from gate_proj, up_proj [E, I, H] and down_proj [E, H, I]: torch
        tensors (any float dtype, any device) or numpy arrays, as MoESFT takes them, or three
        moe_sft.QuantizedWeight (MoESFT.from_quantized). ``moesft_kwargs`` go to MoESFT (lora_rank, lora_alpha,
        max_cache_depth, tp_count, weight_format, ...)."""
        weights = [_weight_array(w, n) for w, n in ((gate_proj, "gate_proj"), (up_proj, "up_proj"),
                                                     (down_proj, "down_proj"))]
        if all(isinstance(w, QuantizedWeight) for w in weights):
            layer = MoESFT.from_quantized(*weights, **moesft_kwargs)
        else:
            layer = MoESFT(*weights, **moesft_kwargs)
        return cls(layer, lora_dtype=lora_dtype, init=init, seed=seed, projections=projections)

    @property
    def layer(self):
        """The moe_sft.MoESFT this module runs on."""
        return self._layer

    def lora_state(self):
        """The LoRA Parameters by name (gate_a, gate_b, ... for the module's projections): the ones the layer
        reads at the next call."""
        return {name: getattr(self, name) for p in self.projections for name in (f"{p}_a", f"{p}_b")}

    @torch.no_grad()
    def reset_lora(self, init="peft", seed=None):
        """Re-initializes the LoRA Parameters in place (see the class for ``init``)."""
        params = self.lora_state()
        if init is None:
            return
        if init == "zeros":
            for p in params.values():
                p.zero_()
            return
        if init not in ("peft", "gaussian"):
            raise invalid(f"init = {init!r}; expected 'peft', 'gaussian', 'zeros' or None")
        dtype = next(iter(params.values())).dtype if params else torch.float32
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
        arrays = lora_init({n: tuple(p.shape) for n, p in params.items()}, init, seed,
                           bfloat16 if dtype == torch.bfloat16 else np.float32)
        for name, p in params.items():
            p.copy_(as_tensor(arrays[name]))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """experts_forward(self.layer, hidden_states, top_k_index, top_k_weights, self.lora_state())."""
        return experts_forward(self._layer, hidden_states, top_k_index, top_k_weights, self.lora_state())

    def extra_repr(self):
        layer = self._layer
        return (f"experts={layer.expert_num}, hidden_size={layer.hidden_size}, intermediate_size="
                f"{layer.intermediate_size}, lora_rank={layer.lora_rank}, lora_alpha={layer.lora_alpha}, "
                f"projections={self.projections}, weight_format={layer.weight_format!r}, tp_count={layer.tp_count}")
