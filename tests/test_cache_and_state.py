"""Forward caches, the shared scratch arena, accumulate, and zero-copy LoRA binding."""
import threading

import numpy as np
import pytest

import moe_sft
import abi
import reference as R
from conftest import AVAILABLE_ISAS, assert_matches_reference, make_layer, run_layer


def as_f32(a):
    return np.asarray(a, np.float32)


def assert_same_grads(a, b, names=("input", "routing_weights") + R.LORA_NAMES):
    for n in names:
        assert np.array_equal(as_f32(getattr(a, n)), as_f32(getattr(b, n))), n


@pytest.mark.parametrize("layers", [2, 3])
def test_interleaved_layers_share_the_arena_without_corruption(isa, layers):
    problems = [R.make_problem(4 + i, 48 + 16 * i, 40 - 8 * i, 2, 20 + 13 * i, 4, seed=20 + i) for i in range(layers)]
    nets = [make_layer(p) for p in problems]
    # all forwards first (each layer's cache must survive the others' scratch use), then backwards
    outs = [n.forward(p.x, p.ids, p.weights, save_for_backward=True) for n, p in zip(nets, problems)]
    grads = [n.backward(p.grad_out) for n, p in reversed(list(zip(nets, problems)))][::-1]
    for p, out, g in zip(problems, outs, grads):
        assert_matches_reference(p, out, g)


def test_lifo_cache_depth_three(isa):
    base = R.make_problem(4, 48, 40, 2, 12, 4, seed=30)
    batches = [R.make_problem(4, 48, 40, 2, 12 + 5 * i, 4, seed=31 + i) for i in range(3)]
    layer = make_layer(base, max_cache_depth=3)
    for b in batches:
        b.gate, b.up, b.down, b.lora = base.gate, base.up, base.down, base.lora
        layer.forward(b.x, b.ids, b.weights, save_for_backward=True)
    assert layer.cache_depth == 3
    with pytest.raises(moe_sft.MoESFTError) as err:
        layer.forward(base.x, base.ids, base.weights, save_for_backward=True)
    assert err.value.status == abi.status_name(abi.CACHE_FULL) and "max_cache_depth = 3" in str(err.value)
    for depth, b in zip((2, 1, 0), reversed(batches)):
        g = layer.backward(b.grad_out)
        assert layer.cache_depth == depth
        assert_matches_reference(b, R.forward(b), g)
    with pytest.raises(moe_sft.MoESFTError) as err:
        layer.backward(base.grad_out)
    assert err.value.status == abi.status_name(abi.CACHE_EMPTY)


def test_accumulate_twice_equals_twice_the_grads(isa):
    p = R.make_problem(4, 48, 40, 2, 16, 4, seed=40)
    layer = make_layer(p)
    _, once = run_layer(layer, p)
    _, acc = run_layer(layer, p)
    layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    layer.backward(p.grad_out, out=acc, accumulate=True)
    for n in R.LORA_NAMES:
        twice = 2 * getattr(once, n)  # f32 sums in another order: rounding-level differences only
        np.testing.assert_allclose(getattr(acc, n), twice, rtol=1e-5, atol=1e-6 * np.abs(twice).max(), err_msg=n)
    assert_same_grads(acc, once, ("input", "routing_weights"))  # always overwritten


def test_overwrite_replaces_stale_grads(isa):
    p = R.make_problem(6, 32, 40, 1, 3, 2, seed=41)  # most experts get no token
    layer = make_layer(p)
    _, fresh = run_layer(layer, p)
    stale = moe_sft.Grads(**{n: np.full_like(getattr(fresh, n), 7.0) for n in ("input", "routing_weights") + R.LORA_NAMES})
    layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    layer.backward(p.grad_out, out=stale)
    assert_same_grads(stale, fresh)


def test_in_place_lora_update_is_seen_without_rebinding(isa):
    p = R.make_problem(4, 48, 40, 2, 16, 4, seed=50)
    layer = make_layer(p)
    before = as_f32(layer.forward(p.x, p.ids, p.weights))
    for name in R.LORA_NAMES:
        p.lora[name] *= 1.5  # in place, as an optimizer step does
        after = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
        assert not np.array_equal(as_f32(after), before), f"in-place change of {name} not seen"
        assert_matches_reference(p, after, layer.backward(p.grad_out))
        before = as_f32(after)


def test_two_layers_from_two_threads_equal_serial(isa):
    problems = [R.make_problem(4, 64, 48, 2, 40, 4, seed=60 + i) for i in range(2)]
    serial = [[run_layer(make_layer(p), p) for _ in range(3)] for p in problems]
    results = [None, None]

    def drive(i):
        layer = make_layer(problems[i])
        results[i] = [run_layer(layer, problems[i]) for _ in range(3)]

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for (out_s, g_s), (out_t, g_t) in zip(serial[i], results[i]):
            assert np.array_equal(as_f32(out_s), as_f32(out_t))
            assert_same_grads(g_s, g_t)


# The NaN fill of fresh scratch (MOE_SFT_DEBUG_SCRATCH=1) is read once per process, so one subprocess runs
# every kernel family this machine has on every weight format and tp_count 1 and 2, and prints each result's
# bytes; this process computes the same without the fill.
_SCRATCH_PROGRAM = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_cache_and_state import scratch_results
print(json.dumps(scratch_results(json.loads(sys.argv[2]))))
"""
SCRATCH_CASES = [(isa, weights, tp) for isa in AVAILABLE_ISAS
                 for weights in ("bf16", "int8", "int4_awq", "int4_k2") for tp in (1, 2)]


def scratch_results(cases):
    """{case: sha256 of every output and grad's bytes} for (isa, weight format, tp_count) cases, on one problem
    whose quantized formats have groups of 4 (int4_awq) and 8 (int4_k2) so that blocks end inside groups."""
    import hashlib
    import os
    from test_quantized import quantized_layer
    p = R.make_problem(5, 40, 48, 2, 30, 3, seed=70)
    results = {}
    for isa, weights, tp in cases:
        os.environ["MOE_SFT_ISA"] = isa
        if weights == "bf16":
            layer = make_layer(p, tp_count=tp)
        else:
            layer = quantized_layer(p, weights, {"int8": 0, "int4_awq": 4, "int4_k2": 8}[weights], tp_count=tp)[0]
        assert layer.isa == isa
        out, g = run_layer(layer, p)
        arrays = [out] + [getattr(g, n) for n in ("input", "routing_weights") + R.LORA_NAMES]
        assert not any(np.isnan(np.asarray(a, np.float32)).any() for a in arrays), (isa, weights, tp)
        results[f"{isa}/{weights}/tp{tp}"] = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                                                     for a in arrays)).hexdigest()
    return results


def test_scratch_debug_fill_changes_nothing(monkeypatch):
    """The arena's NaN fill only shows reads of never-written scratch; results must be identical bit for bit.
    Quantized formats dequantize blocks into scratch, and every kernel family must read only what was written
    there."""
    import json
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    assert os.environ.get("MOE_SFT_DEBUG_SCRATCH", "0") in ("", "0"), "run the suite without MOE_SFT_DEBUG_SCRATCH"
    cases = [list(c) for c in SCRATCH_CASES]
    env = dict(os.environ, MOE_SFT_DEBUG_SCRATCH="1")
    run = subprocess.run([sys.executable, "-c", _SCRATCH_PROGRAM, here, json.dumps(cases)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    monkeypatch.setenv("MOE_SFT_ISA", "generic")  # scratch_results sets it per case; monkeypatch restores it
    plain = scratch_results(cases)
    debug = json.loads(run.stdout)
    assert len(plain) == len(SCRATCH_CASES)
    assert debug == plain, [c for c in plain if debug.get(c) != plain[c]]
