"""check_finite: one NaN or Inf injected into each checked tensor in turn. The error names the stage, the
tensor, the position in the caller's coordinates and the value; outputs and the forward cache are as they
were. With the check off, the same inputs run to completion (no crash, no hang)."""
import numpy as np
import pytest

import moe_sft
import abi
import reference as R
from conftest import make_layer

E, H, I, K, T, RANK = 4, 32, 40, 2, 6, 4


@pytest.fixture
def prob():
    p = R.make_problem(E, H, I, K, T, RANK, seed=5)
    p.ids[:] = [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]]  # known routing: token 2 uses experts 2, 3
    return p


def fails(call, *needles):
    with pytest.raises(moe_sft.MoESFTError) as err:
        call()
    assert err.value.status == abi.status_name(abi.NON_FINITE), str(err.value)
    for needle in needles:
        assert needle in str(err.value), f"{needle!r} not in {str(err.value)!r}"
    return str(err.value)


def forward_fails(layer, p, *needles):
    before = layer.cache_depth
    fails(lambda: layer.forward(p.x, p.ids, p.weights, save_for_backward=True), *needles)
    assert layer.cache_depth == before


def poison(a, index, value):
    a[index] = np.asarray(value, dtype=a.dtype)


@pytest.mark.parametrize("value,text", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_input(isa, prob, value, text):
    layer = make_layer(prob, check_finite=True)
    poison(prob.x, (3, 5), value)
    forward_fails(layer, prob, f"non-finite value {text} in input at token 3, column 5", "(stage 1 of 7: input)")


def test_routing_weight(isa, prob):
    layer = make_layer(prob, check_finite=True)
    poison(prob.weights, (2, 1), np.nan)
    forward_fails(layer, prob, "routing weights at token 2, slot 1", "(stage 2 of 7: routing weights)")


def test_routing_weight_of_an_empty_slot_is_ignored(isa, prob):
    layer = make_layer(prob, check_finite=True)
    prob.ids[2, 1] = -1
    poison(prob.weights, (2, 1), np.nan)  # padding may hold anything
    layer.forward(prob.x, prob.ids, prob.weights)


@pytest.mark.parametrize("name", R.LORA_NAMES)
def test_lora_weight_changed_in_place_after_a_good_forward(isa, prob, name):
    layer = make_layer(prob, check_finite=True)
    layer.forward(prob.x, prob.ids, prob.weights)
    a = prob.lora[name]
    poison(a, (2, 1, 3), np.inf)
    forward_fails(layer, prob, f"LoRA weight {name} at expert 2, row 1, column 3", "(stage 3 of 7: LoRA weights)")


def test_gate_projection_output(isa, prob):
    prob.lora["gate_b"][3] = 3e38  # finite weights whose product overflows: expert 3's gate output is inf
    layer = make_layer(prob, check_finite=True)
    forward_fails(layer, prob, "gate projection output at token 2, expert 3, column 0", "(stage 4 of 7: gate/up projection)")


def test_activation_output(isa, prob):
    prob.lora["gate_b"][1] = 1e20  # g and u ~1e20: finite, their product is not
    prob.lora["up_b"][1] = 1e20
    layer = make_layer(prob, check_finite=True)
    forward_fails(layer, prob, "activation output at token", ", expert 1, column", "(stage 5 of 7: activation)")


def test_down_projection_output(isa, prob):
    prob.lora["down_b"][0] = 3e38
    layer = make_layer(prob, check_finite=True)
    forward_fails(layer, prob, "down projection output at token 0, expert 0, column 0", "(stage 6 of 7: down projection)")


def test_layer_output(isa, prob):
    prob.lora["down_b"][2] = 1e36  # y of expert 2 is large but finite; a routing weight of 1e4 overflows it
    prob.weights[4, 1] = 1e4
    layer = make_layer(prob, check_finite=True)
    forward_fails(layer, prob, "layer output at token 4", "(stage 7 of 7: layer output)")


def test_base_weights_at_create(isa, prob):
    poison(prob.down, (1, 7, 9), np.nan)
    fails(lambda: make_layer(prob, check_finite=True), "down_proj at expert 1, row 7, column 9",
          "base weights, checked at create")


def backward_fails(layer, p, grad_out, *needles):
    out = moe_sft.Grads(np.full((T, H), 5.0, np.float32), np.full((T, K), 5.0, np.float32),
                        **{n: np.full(p.lora[n].shape, 5.0, np.float32) for n in R.LORA_NAMES})
    snapshot = {n: getattr(out, n).copy() for n in ("input", "routing_weights") + R.LORA_NAMES}
    fails(lambda: layer.backward(grad_out, out=out, accumulate=True), *needles)
    assert layer.cache_depth == 1  # the saved forward is still there
    for n, a in snapshot.items():
        assert np.array_equal(getattr(out, n), a), f"{n} was written"


def test_grad_output(isa, prob):
    layer = make_layer(prob, check_finite=True)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    go = prob.grad_out.copy()
    poison(go, (5, 31), np.nan)
    backward_fails(layer, prob, go, "grad_output at token 5, column 31", "(stage 1 of 5: grad_output)")
    layer.backward(prob.grad_out)  # and the cache still serves a good backward


def test_grad_of_intermediate(isa, prob):
    layer = make_layer(prob, check_finite=True)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    go = np.full((T, H), 3e38, np.float32)  # finite, but dO·Wd overflows
    backward_fails(layer, prob, go, "grad of gate projection output at token 0", "(stage 2 of 5: grad of the intermediate)")


def test_lora_grads(isa, prob):
    # gate_a = 0 keeps the forward and grad_input clear of gate_b; a huge gate_b makes dG·Bg ~1e38 (finite),
    # and the grad of gate_a = s (dG·Bg)^T x, summed over an expert's rows, overflows.
    prob.lora["gate_a"][:] = 0
    prob.lora["gate_b"][:] = 1e37
    layer = make_layer(prob, check_finite=True)
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    backward_fails(layer, prob, prob.grad_out, "LoRA grad gate_a at expert", "(stage 5 of 5: LoRA grads)")


def test_check_off_runs_through_poison(isa, prob):
    layer = make_layer(prob, check_finite=False)
    poison(prob.x, (0, 0), np.nan)
    out = layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    assert np.isnan(np.asarray(out, np.float32)).any()
    layer.backward(prob.grad_out)


def test_environment_default(isa, prob, monkeypatch):
    monkeypatch.setenv("MOE_SFT_CHECK_FINITE", "1")
    poison(prob.x, (1, 2), np.nan)
    forward_fails(make_layer(prob), prob, "input at token 1, column 2")
    monkeypatch.setenv("MOE_SFT_CHECK_FINITE", "0")
    make_layer(prob).forward(prob.x, prob.ids, prob.weights)


def test_router_reports_poisoned_logits_when_checking(monkeypatch):
    logits = np.zeros((4, 6), np.float32)
    logits[2, 5] = np.nan
    ids, w = moe_sft.route(logits, 2)  # check off: routed safely
    assert np.isfinite(w).all() and (ids >= 0).all()
    monkeypatch.setenv("MOE_SFT_CHECK_FINITE", "1")
    fails(lambda: moe_sft.route(logits, 2), "non-finite value nan in logits at token 2, expert 5",
          "(stage 1 of 1: router input)")
