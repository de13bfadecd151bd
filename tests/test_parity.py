"""Backend parity: the same calls through nanobind and through cffi give the same bytes and the same errors.

The compute matrix runs once, on the backend moe_sft chose (the backends only marshal pointers); this file is
where both are compared, on a few cases that reach every entry point of the ABI: create (bf16, tp_count 2,
quantized at create and pre-quantized, gpt-oss's activation and biases), update_lora, forward, backward (overwrite and accumulate), cache_depth,
layer_isa, destroy (discard_saved: test_saved_forwards on the raw ABI of each backend), route, route_backward, quantize, weight_format_name, isa, status_string, last_error
(through every error below) and version. The raw-ABI error tests (test_errors, the raw parts of test_router
and test_quantized) also run once per backend."""
import numpy as np
import pytest

import moe_sft
import reference as R
from abi import STATUS
from conftest import BACKENDS, bind_lora, make_layer
from moe_sft import _backend


def _bytes(*arrays):
    return [None if a is None else (str(np.asarray(a).dtype), np.asarray(a).shape, np.ascontiguousarray(a).tobytes())
            for a in arrays]


def _error(call):
    """(exception type, status, message) of a call that must fail."""
    try:
        call()
    except moe_sft.MoESFTError as err:
        return type(err).__name__, err.status, str(err)
    raise AssertionError("the call did not fail")


def _grads(g):
    return _bytes(g.input, g.routing_weights, *(getattr(g, n) for n in R.LORA_NAMES))


def scenario():
    """Everything recorded: results as bytes, errors as (type, status, message)."""
    B = _backend.backend
    rec = {"version": moe_sft.library_version(), "isa": moe_sft.isa(), "raw version": B.version(),
           "status names": [B.status_string(code) for code in sorted(STATUS.values())],
           "format names": [B.weight_format_name(code) for code in range(-1, 6)]}
    p = R.make_problem(5, 48, 64, 2, 17, 3, seed=3)
    p.ids[4, 1] = -1
    gpt_oss = R.make_gpt_oss_problem(5, 48, 64, 2, 17, 3, seed=3)  # the clamped activation and biases
    for name, (prob, kwargs) in {"bf16": (p, {}), "tp2": (p, {"tp_count": 2}),
                                 "int4_awq": (p, {"weight_format": "int4_awq", "group_size": 16}),
                                 "gpt_oss": (gpt_oss, {"tp_count": 2})}.items():
        layer = make_layer(prob, max_cache_depth=2, **kwargs)
        out = layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
        layer.forward(prob.x[:9], prob.ids[:9], prob.weights[:9], save_for_backward=True)
        depth = layer.cache_depth
        full = _error(lambda: layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True))
        small = layer.backward(prob.grad_out[:9])
        g = layer.backward(prob.grad_out)
        layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
        layer.backward(prob.grad_out, out=g, accumulate=True)
        rec[name] = dict(isa=layer.isa, out=_bytes(out), depth=depth, full=full, small=_grads(small), acc=_grads(g),
                         empty=_error(lambda: layer.backward(prob.grad_out)))
        layer.close()
    quantized = {n: moe_sft.quantize(getattr(p, n), "int8") for n in ("gate", "up", "down")}
    rec["quantize"] = [_bytes(*q[2:]) for q in quantized.values()]
    rec["dequantize"] = _bytes(moe_sft.dequantize(quantized["gate"]))
    layer = bind_lora(moe_sft.MoESFT.from_quantized(*quantized.values(), lora_rank=p.rank, lora_alpha=p.alpha), p)
    out = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    rec["from_quantized"] = _bytes(out) + _grads(layer.backward(p.grad_out))
    bad_ids = p.ids.copy()
    bad_ids[2, 1] = 99
    rec["bad id"] = _error(lambda: layer.forward(p.x, bad_ids, p.weights))
    nan_x = p.x.copy()
    nan_x[3, 7] = np.nan
    checked = make_layer(p, check_finite=True)
    rec["non-finite"] = _error(lambda: checked.forward(nan_x, p.ids, p.weights))
    rec["quantize nan"] = _error(lambda: moe_sft.quantize(nan_x, "int8"))
    rec["k2 from bf16"] = _error(lambda: moe_sft.quantize(p.gate, "int4_k2"))
    pb = R.make_problem(3, 64, 96, 2, 9, 3, seed=4)  # the block-scaled formats (and moe_sft_quantize_blocks)
    for fmt, group in (("fp8_e4m3_block", (32, 32)), ("mxfp4", None)):
        blocks = {n: moe_sft.quantize(getattr(pb, n), fmt, group) for n in ("gate", "up", "down")}
        rec[f"quantize {fmt}"] = [_bytes(q.weights, q.scale) for q in blocks.values()]
        layer = bind_lora(moe_sft.MoESFT.from_quantized(*blocks.values(), lora_rank=pb.rank, lora_alpha=pb.alpha), pb)
        out = layer.forward(pb.x, pb.ids, pb.weights, save_for_backward=True)
        rec[f"from_quantized {fmt}"] = _bytes(out) + _grads(layer.backward(pb.grad_out))
    rec["quantize_blocks nan"] = _error(lambda: moe_sft.quantize(nan_x, "fp8_e4m3_block"))
    logits = np.random.default_rng(5).standard_normal((12, 8)).astype(np.float32)
    logits[3] = np.nan
    logits[5, [1, 6]] = np.inf
    for scoring in ("softmax", "sigmoid"):
        ids, w = moe_sft.route(logits, 3, scoring=scoring, renormalize=True,
                               correction_bias=np.linspace(-0.1, 0.1, 8).astype(np.float32))
        grad = moe_sft.route_backward(logits, ids, np.ones_like(w), scoring=scoring, renormalize=True)
        rec[f"route {scoring}"] = _bytes(ids, w, grad)
    rec["route bias"] = _error(lambda: moe_sft.route(logits, 2, correction_bias=np.full(8, np.nan, np.float32)))
    rec["route_backward id"] = _error(lambda: moe_sft.route_backward(logits, np.full((12, 2), 8), np.ones((12, 2))))
    return rec


def test_backends_give_the_same_bytes_and_errors(monkeypatch):
    names = [b for b in BACKENDS if isinstance(b, str)]
    if len(names) < 2:
        pytest.skip("parity needs both backends (MOE_SFT_BACKEND forces one, or cffi is missing)")
    saved = _backend.NAME
    records = {}
    try:
        for name in names:
            _backend.use(name)
            assert moe_sft.backend() == name
            records[name] = scenario()
    finally:
        _backend.use(saved)
    a, b = (records[n] for n in names)
    assert a.keys() == b.keys()
    differ = [key for key in a if a[key] != b[key]]
    assert not differ, {key: (a[key], b[key]) for key in differ if not isinstance(a[key], dict)} or differ
