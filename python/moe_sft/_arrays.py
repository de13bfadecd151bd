"""Checks and conversions of the numpy arrays that cross into the library, and of its statuses, shared by the
layer, the router and quantization: each names the argument at fault, and yields arrays the backend can hand
to the C ABI as they are (bf16 crosses as its uint16 bits, see ``_bits``)."""
import functools

import ml_dtypes
import numpy as np

from . import _backend
from ._errors import error_for, invalid, python_message

bfloat16 = np.dtype(ml_dtypes.bfloat16)


def _check(status, backend=None):
    """Raises the status's exception with the library's message (read from ``backend``, the one in use by
    default; an object that keeps the backend it was made on passes its own)."""
    if status != 0:
        raise error_for(status, python_message((backend or _backend.backend).last_error()))


@functools.lru_cache(maxsize=None)
def enum_codes(kind):
    """{name: code} of one of the ABI's enums ("weight_format", "dtype", "scoring"), from the library's own
    name function (moe_sft_<kind>_name), for codes 0, 1, ... until it names none."""
    lookup = getattr(_backend.backend, f"{kind}_name")
    codes = {}
    while (name := lookup(len(codes))) is not None:
        codes[name] = len(codes)
    return codes


def _bits(a):
    """A bf16 array as the uint16 view the backends take (no copy; the view keeps ``a`` alive); other
    arrays as they are."""
    return a.view(np.uint16) if a is not None and a.dtype == bfloat16 else a


def _as_bf16(a, name, shape=None):
    """A C-contiguous bf16 view of ``a`` (bf16 as is, uint16 reinterpreted, floats rounded)."""
    a = np.asarray(a)
    if a.dtype == np.uint16:
        a = a.view(bfloat16)
    elif a.dtype != bfloat16:
        if a.dtype.kind != "f":
            raise invalid(f"{name} has dtype {a.dtype}; expected bfloat16, uint16 (bf16 bits) or a float type")
        a = a.astype(bfloat16)
    if shape is not None:
        _check_shape(a, name, shape)
    return np.ascontiguousarray(a)


def _check_shape(a, name, shape):
    if a.shape != tuple(shape):
        raise invalid(f"{name} has shape {a.shape}; expected {tuple(shape)}")


def _as_f32(a, name, shape):
    """A C-contiguous float32 copy or view of a float array of exactly ``shape``."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise invalid(f"{name} has dtype {a.dtype}; expected a float type")
    _check_shape(a, name, shape)
    return np.ascontiguousarray(a, dtype=np.float32)


def _expert_ids(expert_ids, T):
    """expert_ids as a C-contiguous int64 [T, k] array, and k."""
    ids = np.asarray(expert_ids)
    if ids.dtype.kind not in "iu":
        raise invalid(f"expert_ids has dtype {ids.dtype}; expected int64 or int32")
    if ids.ndim != 2 or ids.shape[0] != T:
        raise invalid(f"expert_ids has shape {ids.shape}; expected [{T}, top_k]")
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise invalid(f"expert_ids holds {ids.max()}, beyond int64: it would wrap to a negative id")
    return np.ascontiguousarray(ids, dtype=np.int64), ids.shape[1]


def _forward_inputs(x, expert_ids, routing_weights, hidden_size):
    """A forward's arguments checked and converted: (x as given, x as bf16 [T, H], int64 ids [T, k], f32 weights)."""
    x_in = np.asarray(x)
    xb = _as_bf16(x_in, "x")
    if xb.ndim != 2 or xb.shape[1] != hidden_size:
        raise invalid(f"x has shape {xb.shape}; expected [tokens, {hidden_size}]")
    ids, k = _expert_ids(expert_ids, xb.shape[0])
    return x_in, xb, ids, _as_f32(routing_weights, "routing_weights", (xb.shape[0], k))


def _out_array(a, name, shape, dtype):
    """A caller-provided output: must already be exactly right, it is written in place."""
    if not isinstance(a, np.ndarray):
        raise invalid(f"{name} must be a numpy array, got {type(a).__name__}")
    _check_shape(a, name, shape)
    if a.dtype != dtype:
        raise invalid(f"{name} has dtype {a.dtype}; expected {dtype}")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise invalid(f"{name} must be a writeable C-contiguous array")
    return a
