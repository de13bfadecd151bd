"""AdamW over numpy arrays, and LoRA initialisation: the training loop without torch.

    lora = moe_sft.lora_init(layer, seed=0)                 # PEFT's init: A Kaiming-uniform, B zero
    layer.update_lora(**lora)
    opt = moe_sft.AdamW(lora, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    for batch in batches:
        out = layer.forward(x, ids, w, save_for_backward=True)
        report = opt.step(layer.backward(grad_of(out)))      # updates the arrays in place; layer sees them
        if report.skipped: print(report)                    # a NaN/Inf grad: nothing changed

The optimizer is the library's (moe_sft_adamw_* in moe_sft.h): torch.optim.AdamW's update in f32, global
grad-norm clipping, a non-finite guard, f32 masters for bf16 parameters, run on the library's worker pool.

The optimizer reaches the library through the package's backend (``_backend.backend``: the nanobind module
or cffi), whose ``adamw_*`` functions mirror moe_sft_adamw_* with numpy arrays in and statuses out, and whose
``AdamW`` object owns the moe_sft_adamw and keeps the parameter arrays alive (see ``_ext.cpp``).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from . import _backend
from ._arrays import _bits, _check, bfloat16 as _BF16
from ._errors import invalid

__all__ = ["AdamW", "StepReport", "lora_init"]

LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def _not_copyable(*_):
    raise TypeError("an AdamW owns library memory and cannot be copied or pickled; state_dict() copies its state")


# ---- AdamW ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepReport:
    """What ``AdamW.step`` did. ``grad_norm``: the global L2 norm of all grads before clipping (NaN/Inf when
    skipped); ``clip_coef``: the factor the grads were scaled by (1.0 = not clipped); ``skipped``: a grad held
    NaN/Inf and nothing changed, the first one being ``bad_param[bad_index] = bad_value`` (index in the
    array's shape); ``step``: the optimizer's step count after the call."""

    grad_norm: float
    clip_coef: float
    skipped: bool
    step: int
    bad_param: Optional[str] = None
    bad_index: Optional[tuple] = None
    bad_value: Optional[float] = None

    def __str__(self):
        if self.skipped:
            return (f"step skipped: {self.bad_param}{list(self.bad_index)} = {self.bad_value} "
                    f"(grad norm {self.grad_norm}); parameters and moments unchanged, step count {self.step}")
        clip = f", clipped by {self.clip_coef:.4g}" if self.clip_coef < 1 else ""
        return f"step {self.step}: grad norm {self.grad_norm:.6g}{clip}"


def _check_param_dtype(name, a):
    if not isinstance(a, np.ndarray):
        raise invalid(f"parameter {name!r} must be a numpy array (it is updated in place), got {type(a).__name__}")
    if a.dtype != np.float32 and a.dtype != _BF16:
        raise invalid(f"parameter {name!r} has dtype {a.dtype}; parameters must be float32 or bfloat16 "
                      "(they are updated in place, so they are never converted)")


class AdamW:
    """torch.optim.AdamW over a mapping name -> numpy array (float32 or ml_dtypes.bfloat16, C-contiguous,
    writable), updated in place. Hyperparameters as torch's, plus ``max_grad_norm`` (None or 0 = no clipping)
    for torch.nn.utils.clip_grad_norm_'s global clipping over all the parameters. Note torch's default
    weight_decay is 0.01; here it is 0.0 (set it). bf16 parameters are updated in an f32 master copy and
    written back rounded to nearest even (see moe_sft.h). The arrays are kept by reference; keep them alive
    and do not reallocate them (``a -= ...`` is fine, ``a = a - ...`` binds a new array the optimizer never
    sees)."""

    def __init__(self, params: Mapping[str, np.ndarray], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 max_grad_norm=None, num_threads=0):
        if not isinstance(params, Mapping) or not params:
            raise invalid("params must be a non-empty mapping name -> array")
        bad_key = next((n for n in params if not isinstance(n, str)), None)
        if bad_key is not None:
            raise invalid(f"params has the key {bad_key!r}; parameter names must be str")
        # One array under several names is one parameter (a fused adapter binds one A as both gate_a and up_a):
        # it is stepped once, from the grad of its first name; the others are aliases of it.
        self._aliases = {}
        self._names = []
        self._params = {}
        for name, a in params.items():
            first = next((n for n in self._names if self._params[n] is a), None)
            if first is not None:
                self._aliases[name] = first
                continue
            self._names.append(name)
            _check_param_dtype(name, a)
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise invalid(f"parameter {name!r} must be C-contiguous and writable (it is updated in place)")
            if a.size == 0:
                raise invalid(f"parameter {name!r} is empty (shape {a.shape})")
            self._params[name] = a
        self._lock = threading.Lock()
        self._backend = _backend.backend  # the one in use now, kept for this optimizer's lifetime
        self._handle = None
        b1, b2 = betas
        status, handle = self._backend.adamw_create(float(lr), float(b1), float(b2), float(eps), float(weight_decay),
                                                    float(max_grad_norm or 0.0), int(num_threads), self._names,
                                                    [_bits(self._params[n]) for n in self._names])
        _check(status, self._backend)
        self._handle = handle  # the backend's AdamW: owns the moe_sft_adamw, keeps the parameter arrays alive

    __copy__ = __deepcopy__ = __reduce__ = __reduce_ex__ = _not_copyable

    # ---- lifetime
    def close(self):
        """Frees the optimizer's state (never the parameters). Idempotent."""
        with self._lock:
            if self._handle is not None:
                self._backend.adamw_destroy(self._handle)
                self._handle = None

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self):
        if self._handle is None:
            raise invalid("the optimizer is closed")
        return self._handle

    # ---- the step
    def _grad_arrays(self, grads):
        is_mapping = isinstance(grads, Mapping)
        if is_mapping:
            extra = [k for k in grads if k not in self._params and k not in self._aliases]
            if extra:
                raise invalid(f"grads has {extra[0]!r}, which is not a parameter of this optimizer "
                              f"(parameters: {', '.join(self._names)})")
        out = []
        for name in self._names:
            if is_mapping:
                if name not in grads:
                    raise invalid(f"grads has no {name!r} (every parameter needs its grad)")
                g = grads[name]
            else:  # a Grads from MoESFT.backward, or any object with the parameters' names as attributes
                g = getattr(grads, name, None)
                if g is None:
                    raise invalid(f"grads has no attribute {name!r} (every parameter needs its grad)")
            if not isinstance(g, np.ndarray) or g.dtype != np.float32:
                raise invalid(f"grad {name!r} must be a float32 numpy array, got "
                              f"{getattr(g, 'dtype', type(g).__name__)}")
            p = self._params[name]
            if g.shape != p.shape:
                raise invalid(f"grad {name!r} has shape {g.shape}, its parameter {p.shape}")
            out.append(np.ascontiguousarray(g))  # a copy only for a strided grad; never written
        return out

    def step(self, grads) -> StepReport:
        """One AdamW step with ``grads`` (a mapping name -> float32 array in the parameter's shape, with the
        same keys as the parameters, or a ``Grads``). A grad holding NaN/Inf skips the step: nothing changes
        and the report says where (``report.skipped``)."""
        arrays = self._grad_arrays(grads)
        with self._lock:
            status, r = self._backend.adamw_step(self._live(), arrays)  # the GIL is released during the step
        _check(status, self._backend)
        grad_norm, clip_coef, skipped, bad_param, bad_index, bad_value, step = r
        if not skipped:
            return StepReport(float(grad_norm), float(clip_coef), False, int(step))
        name = self._names[bad_param]
        index = tuple(int(i) for i in np.unravel_index(int(bad_index), self._params[name].shape))
        return StepReport(float(grad_norm), float(clip_coef), True, int(step), name, index, float(bad_value))

    # ---- hyperparameters
    def _config(self):
        with self._lock:
            status, c = self._backend.adamw_get_config(self._live())
        _check(status, self._backend)
        return dict(zip(("lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "num_threads"), c))

    def _set_config(self, **changes):
        c = self._config()
        c.update(changes)
        with self._lock:
            _check(self._backend.adamw_set_config(self._live(), *c.values()), self._backend)

    @property
    def lr(self):
        return self._config()["lr"]

    @lr.setter
    def lr(self, value):
        with self._lock:
            _check(self._backend.adamw_set_lr(self._live(), float(value)), self._backend)

    @property
    def betas(self):
        c = self._config()
        return (c["beta1"], c["beta2"])

    @betas.setter
    def betas(self, value):
        b1, b2 = value
        self._set_config(beta1=float(b1), beta2=float(b2))

    @property
    def eps(self):
        return self._config()["eps"]

    @eps.setter
    def eps(self, value):
        self._set_config(eps=float(value))

    @property
    def weight_decay(self):
        return self._config()["weight_decay"]

    @weight_decay.setter
    def weight_decay(self, value):
        self._set_config(weight_decay=float(value))

    @property
    def max_grad_norm(self):
        v = self._config()["max_grad_norm"]
        return v if v > 0 else None

    @max_grad_norm.setter
    def max_grad_norm(self, value):
        self._set_config(max_grad_norm=float(value or 0.0))

    @property
    def step_count(self):
        """Steps applied (skipped ones do not count); the next step's bias correction uses step_count + 1."""
        with self._lock:
            status, step = self._backend.adamw_get_step(self._live())
        _check(status, self._backend)
        return int(step)

    @property
    def params(self):
        """The parameters, name -> array (the caller's arrays)."""
        return dict(self._params)

    # ---- state
    def _state_views(self, index):
        """Views of the optimizer's own state of parameter ``index`` (call with the lock held; copy before
        releasing it)."""
        status, views = self._backend.adamw_state(self._live(), index)
        _check(status, self._backend)
        shape = self._params[self._names[index]].shape
        return tuple(None if a is None else a.reshape(shape) for a in views)

    def state_dict(self):
        """A copy of everything the optimizer keeps: {"step", "hyper": {...}, "state": {name: {"exp_avg",
        "exp_avg_sq"[, "master"]}}} (float32 arrays in the parameters' shapes; "master" for bf16 ones).
        torch's names for the moments, so that a converter to a torch state_dict is a renaming."""
        hyper = self._config()
        hyper.pop("num_threads")
        state = {}
        with self._lock:
            for i, name in enumerate(self._names):
                m, v, master = self._state_views(i)
                entry = {"exp_avg": m.copy(), "exp_avg_sq": v.copy()}
                if master is not None:
                    entry["master"] = master.copy()
                state[name] = entry
            status, step = self._backend.adamw_get_step(self._live())
        _check(status, self._backend)
        return {"step": int(step), "hyper": hyper, "state": state}

    def load_state_dict(self, state_dict):
        """Restores what ``state_dict`` returned (from this optimizer or one over the same names and shapes).
        Everything is checked before anything is written. A bf16 parameter is set to its loaded master rounded
        to bf16 (the master is the value of record), so parameters and state agree after loading."""
        try:
            step = int(state_dict["step"])
            hyper = dict(state_dict["hyper"])
            state = state_dict["state"]
        except (KeyError, TypeError) as e:
            raise invalid(f"state_dict is not an AdamW state_dict (missing {e})") from None
        if step < 0:
            raise invalid(f"state_dict['step'] = {step} is negative")
        missing = [n for n in self._names if n not in state]
        extra = [n for n in state if n not in self._params]
        if missing or extra:
            raise invalid(f"state_dict's parameters differ from this optimizer's: missing {missing}, extra {extra}")
        loaded = {}
        for name in self._names:
            p = self._params[name]
            keys = ("exp_avg", "exp_avg_sq") + (("master",) if p.dtype == _BF16 else ())
            entry = state[name]
            for key in keys:
                if key not in entry:
                    raise invalid(f"state_dict['state'][{name!r}] has no {key!r}")
                a = np.asarray(entry[key])
                if a.shape != p.shape or a.dtype != np.float32:
                    raise invalid(f"state_dict['state'][{name!r}][{key!r}] has shape {a.shape} and dtype {a.dtype}; "
                                  f"expected {p.shape} float32")
            loaded[name] = entry
        current = self._config()
        unknown = [k for k in hyper if k not in current]
        if unknown:
            raise invalid(f"state_dict['hyper'] has unknown keys {unknown}")
        current.update({k: float(v) for k, v in hyper.items() if k != "num_threads"})
        with self._lock:  # hyperparameters first: the library validates them, and nothing is written on error
            _check(self._backend.adamw_set_config(self._live(), *current.values()), self._backend)
            _check(self._backend.adamw_set_step(self._live(), step), self._backend)
            for i, name in enumerate(self._names):
                m, v, master = self._state_views(i)
                m[...] = loaded[name]["exp_avg"]
                v[...] = loaded[name]["exp_avg_sq"]
                if master is not None:
                    master[...] = loaded[name]["master"]
                    self._params[name][...] = master.astype(_BF16)

    def __repr__(self):
        if self._handle is None:
            return "AdamW(closed)"
        c = self._config()
        return (f"AdamW({len(self._names)} parameters, lr={c['lr']:g}, betas=({c['beta1']:g}, {c['beta2']:g}), "
                f"eps={c['eps']:g}, weight_decay={c['weight_decay']:g}, max_grad_norm={c['max_grad_norm'] or None}, "
                f"step={self.step_count})")


# ---- LoRA initialisation ----------------------------------------------------------------------------------------

def _lora_shapes(layer_or_shapes):
    if hasattr(layer_or_shapes, "lora_shapes"):
        return dict(layer_or_shapes.lora_shapes())
    if isinstance(layer_or_shapes, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in layer_or_shapes.items()}
    try:
        E, H, I, r = (int(d) for d in layer_or_shapes)
    except (TypeError, ValueError):
        raise invalid("lora_init takes a MoESFT layer, a mapping name -> shape, or (experts, hidden, intermediate, "
                      f"rank); got {type(layer_or_shapes).__name__}") from None
    return {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H), "up_b": (E, I, r), "down_a": (E, r, I),
            "down_b": (E, H, r)}


def lora_init(layer_or_shapes, method="peft", seed=None, dtype=np.float32):
    """Initial LoRA arrays: {name: array}, C-contiguous, ready for ``layer.update_lora(**arrays)`` and
    ``AdamW(arrays)``.

    ``layer_or_shapes``: a ``MoESFT`` (its six LoRA shapes), a mapping name -> shape, or (experts, hidden,
    intermediate, rank). An array whose name ends in ``_a`` (shape [..., r, in]) is a LoRA A, one ending in
    ``_b`` a LoRA B (initialized to zeros).
    ``method``: "peft" — PEFT's default (init_lora_weights=True): A Kaiming-uniform with a = sqrt(5), i.e.
    uniform in [-1/sqrt(in), 1/sqrt(in)) with in = A's last dimension (nn.Linear's own init); "gaussian" —
    PEFT's init_lora_weights="gaussian": A normal with std 1/r, r = A's second-to-last dimension. B is zero
    in both, so the adapted layer starts equal to the base layer.
    ``seed``: for numpy's default_rng (None: fresh entropy); the arrays are drawn in name order.
    ``dtype``: float32 (default) or bfloat16 (the A values drawn in float64, rounded once)."""
    if method not in ("peft", "gaussian"):
        raise invalid(f"method = {method!r}: lora_init knows 'peft' (Kaiming-uniform A, zero B) and 'gaussian'")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), _BF16):
        raise invalid(f"dtype = {dt}: LoRA arrays are float32 or bfloat16")
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in _lora_shapes(layer_or_shapes).items():
        if len(shape) < 2 or any(d < 0 for d in shape):
            raise invalid(f"{name} has shape {shape}; LoRA arrays are [..., out, in]")
        if name.endswith("_b"):
            out[name] = np.zeros(shape, dt)
            continue
        if not name.endswith("_a"):
            raise invalid(f"{name!r} is neither a LoRA A (name ending in _a) nor a LoRA B (_b)")
        rank, fan_in = shape[-2], shape[-1]
        if method == "peft":
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            a = rng.uniform(-bound, bound, shape)
        else:
            a = rng.normal(0.0, 1.0 / rank if rank > 0 else 0.0, shape)
        out[name] = np.ascontiguousarray(a.astype(dt))
    return out
