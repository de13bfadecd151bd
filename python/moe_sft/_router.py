"""NaN-safe top-k router: route / route_backward over moe_sft_route / moe_sft_route_backward.

The rules for NaN and Inf logits are the C ABI's (moe_sft.h, moe_sft_route); in short every row gets top_k
distinct expert ids and finite weights, and rows without NaN or Inf are plain softmax/sigmoid top-k.
"""
import operator

import numpy as np

from . import _backend
from ._errors import invalid
from ._arrays import _as_f32, _check, _expert_ids, bfloat16, enum_codes


def _logits(logits):
    """A C-contiguous [T, E] array the library reads as is (bf16 bits or f32; other floats become f32)."""
    a = np.asarray(logits)
    if a.dtype == bfloat16:
        a = a.view(np.uint16)
    elif a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    elif a.dtype != np.uint16:
        raise invalid(f"logits has dtype {a.dtype}; expected float32, bfloat16, uint16 (bf16 bits) or a float type")
    if a.ndim != 2:
        raise invalid(f"logits has shape {a.shape}; expected 2-D [tokens, experts]")
    return np.ascontiguousarray(a)


def _scoring(scoring):
    codes = enum_codes("scoring")
    if scoring not in codes:
        raise invalid(f"scoring = {scoring!r} is not one of {', '.join(map(repr, codes))}")
    return codes[scoring]


def _top_k(top_k, experts):
    try:
        k = operator.index(top_k)
    except TypeError:
        raise invalid(f"top_k = {top_k!r} is not an integer") from None
    if not 1 <= k <= experts:
        raise invalid(f"top_k = {k} is out of range [1, {experts}]")
    return k


def route(logits, top_k, scoring="softmax", renormalize=True, correction_bias=None):
    """Top-k routing of gate logits [T, E] (float32 or bfloat16; other floats are rounded to float32).

    scores = softmax over each row (``scoring="softmax"``) or sigmoid of each logit (``"sigmoid"``); the
    top_k experts by score + ``correction_bias`` [E] (selection only, DeepSeek-V3 style; ties to the lower
    id); weights = their scores, divided by their sum when ``renormalize``. Returns (expert_ids [T, k]
    int64, routing_weights [T, k] float32), ready for ``MoESFT.forward``. NaN/Inf logits never give
    repeated ids or non-finite weights (rules in moe_sft.h, moe_sft_route).
    """
    a = _logits(logits)
    T, E = a.shape
    k = _top_k(top_k, E)
    code = _scoring(scoring)
    bias = None if correction_bias is None else _as_f32(correction_bias, "correction_bias", (E,))
    ids = np.empty((T, k), np.int64)
    weights = np.empty((T, k), np.float32)
    _check(_backend.backend.route(a, code, bool(renormalize), bias, ids, weights))
    return ids, weights


def route_backward(logits, expert_ids, grad_routing_weights, scoring="softmax", renormalize=True):
    """Gradient of the routing weights w.r.t. the logits: grad_logits [T, E] float32, for the weights that
    ``route(logits, k, scoring, renormalize)`` gives the selection ``expert_ids`` [T, k] (held fixed; ids in
    [0, E)). ``grad_routing_weights`` [T, k] is e.g. ``Grads.routing_weights`` from ``MoESFT.backward``.
    Non-finite logits get 0."""
    a = _logits(logits)
    T, E = a.shape
    ids, k = _expert_ids(expert_ids, T)
    k = _top_k(k, E)
    grad = _as_f32(grad_routing_weights, "grad_routing_weights", (T, k))
    code = _scoring(scoring)
    grad_logits = np.empty((T, E), np.float32)
    _check(_backend.backend.route_backward(a, code, bool(renormalize), ids, grad, grad_logits))
    return grad_logits
