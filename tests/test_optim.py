"""moe_sft.AdamW, the numpy AdamW over the library's optimizer, and moe_sft.lora_init, through the package API
on each backend (the `backend` fixture). The update itself is checked against float64
and torch at the C ABI in test_adamw_abi.py; here: the Python surface (mappings and Grads, reports,
hyperparameters, state_dict round trips, errors naming the tensor, lifetime), the two backends giving the same
bits, torch.optim.AdamW itself where torch is importable, and PEFT's initialisation."""
import math

import ml_dtypes
import numpy as np
import pytest

import moe_sft
import reference as R
from moe_sft import AdamW, StepReport, lora_init
from moe_sft import _backend

BF16 = np.dtype(ml_dtypes.bfloat16)


def _params(rng, dtype=np.float32):
    return {"w": rng.standard_normal((3, 40)).astype(dtype), "b": rng.standard_normal(7).astype(dtype)}


def test_step_updates_in_place_and_reports():
    rng = np.random.default_rng(0)
    params = _params(rng)
    before = {n: a.copy() for n, a in params.items()}
    opt = AdamW(params, lr=1e-2, weight_decay=0.01, max_grad_norm=0.5)
    grads = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in params.items()}
    report = opt.step(grads)
    assert isinstance(report, StepReport) and not report.skipped and report.step == 1
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert report.grad_norm == pytest.approx(norm, rel=1e-12)
    assert report.clip_coef == pytest.approx(0.5 / (norm + 1e-6), rel=1e-12)
    assert "clipped" in str(report)
    for n in params:  # first step: each element moves by ~lr against its grad's sign
        assert np.all(np.sign(before[n] - params[n]) == np.sign(grads[n]))
    assert opt.step_count == 1


def test_skipped_step_names_the_element_in_the_array_shape():
    rng = np.random.default_rng(1)
    params = _params(rng, BF16)
    opt = AdamW(params, lr=1e-2)
    grads = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in params.items()}
    grads["w"][2, 17] = -np.inf
    before = {n: a.copy() for n, a in params.items()}
    report = opt.step(grads)
    assert report.skipped and report.bad_param == "w" and report.bad_index == (2, 17)
    assert report.bad_value == -np.inf and report.step == 0
    assert "w[2, 17] = -inf" in str(report)
    for n in params:
        assert params[n].tobytes() == before[n].tobytes()


def test_grads_from_backward_are_accepted():
    p = R.make_problem(4, 32, 24, 2, 6, 4, seed=3)
    layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha)
    lora = lora_init(layer, seed=0)
    lora = {n: a + np.float32(0.01) for n, a in lora.items()}  # B non-zero, so that every grad is
    layer.update_lora(**lora)
    opt = AdamW(lora, lr=1e-3)
    layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    g = layer.backward(p.grad_out)
    before = {n: a.copy() for n, a in lora.items()}
    report = opt.step(g)
    assert not report.skipped and report.grad_norm > 0
    for n in lora:
        assert not np.array_equal(before[n], lora[n]), n
    layer.close()


def test_state_dict_round_trip_and_hyperparameters():
    rng = np.random.default_rng(2)
    params = {**_params(rng), "h": rng.standard_normal((5, 6)).astype(BF16)}
    opt = AdamW(params, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, max_grad_norm=2.0)
    assert opt.lr == 3e-3 and opt.betas == (0.8, 0.95) and opt.eps == 1e-6 and opt.weight_decay == 0.1
    assert opt.max_grad_norm == 2.0
    grads = [{n: rng.standard_normal(a.shape).astype(np.float32) for n, a in params.items()} for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()
    assert sd["step"] == 3 and set(sd["state"]["h"]) == {"exp_avg", "exp_avg_sq", "master"}
    assert set(sd["state"]["w"]) == {"exp_avg", "exp_avg_sq"} and sd["hyper"]["beta1"] == 0.8
    copy = {n: a.copy() for n, a in params.items()}
    other = AdamW(copy, lr=1.0)
    other.load_state_dict(sd)
    assert other.lr == 3e-3 and other.step_count == 3 and other.max_grad_norm == 2.0
    for g in grads[3:]:
        assert opt.step(g).grad_norm == other.step(g).grad_norm
    for n in params:
        assert params[n].tobytes() == copy[n].tobytes()
    opt.lr = 0.0
    frozen = {n: a.copy() for n, a in params.items()}
    opt.step(grads[0])
    assert all(params[n].tobytes() == frozen[n].tobytes() for n in params)
    opt.max_grad_norm = None
    assert opt.max_grad_norm is None
    assert "AdamW(3 parameters" in repr(opt)
    opt.close()
    assert repr(opt) == "AdamW(closed)"
    with pytest.raises(moe_sft.InvalidArgumentError, match="closed"):
        opt.step(grads[0])


def test_errors_name_the_tensor():
    rng = np.random.default_rng(4)
    params = _params(rng)
    opt = AdamW(params)
    good = {n: np.zeros(a.shape, np.float32) for n, a in params.items()}
    with pytest.raises(moe_sft.InvalidArgumentError, match="grads has no 'b'"):
        opt.step({"w": good["w"]})
    with pytest.raises(moe_sft.InvalidArgumentError, match="grads has 'x', which is not a parameter"):
        opt.step({**good, "x": good["w"]})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"grad 'w' has shape \(40, 3\), its parameter \(3, 40\)"):
        opt.step({**good, "w": np.zeros((40, 3), np.float32)})
    with pytest.raises(moe_sft.InvalidArgumentError, match="grad 'b' must be a float32"):
        opt.step({**good, "b": np.zeros(7, np.float64)})
    with pytest.raises(moe_sft.InvalidArgumentError, match="parameter 'x' has dtype float64"):
        AdamW({"x": np.zeros(3)})
    with pytest.raises(moe_sft.InvalidArgumentError, match="must be C-contiguous"):
        AdamW({"x": np.zeros((4, 4), np.float32)[:, 1]})
    with pytest.raises(moe_sft.InvalidArgumentError, match="cfg->beta2 = 1 is out of range"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(moe_sft.InvalidArgumentError, match="lr = -1 is negative"):
        opt.lr = -1.0
    with pytest.raises(moe_sft.InvalidArgumentError, match="overlap"):
        buf = np.zeros(10, np.float32)
        AdamW({"a": buf[:6], "b": buf[4:]})
    sd = opt.state_dict()
    sd["state"]["w"]["exp_avg"] = np.zeros((2, 2), np.float32)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"\['w'\]\['exp_avg'\] has shape \(2, 2\)"):
        opt.load_state_dict(sd)
    del sd["state"]["b"]
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"missing \['b'\]"):
        opt.load_state_dict(sd)


def test_lora_init_peft_and_gaussian():
    E, H, I, r = 4, 64, 48, 8
    a = lora_init((E, H, I, r), seed=0)
    assert {n: x.shape for n, x in a.items()} == {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H),
                                                  "up_b": (E, I, r), "down_a": (E, r, I), "down_b": (E, H, r)}
    for n, x in a.items():
        assert x.dtype == np.float32 and x.flags.c_contiguous
        if n.endswith("_b"):
            assert not x.any()
        else:
            bound = 1 / math.sqrt(x.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound
            assert np.std(x) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    b = lora_init((E, H, I, r), seed=0)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["gate_a"], lora_init((E, H, I, r), seed=1)["gate_a"])
    g = lora_init({"q_a": (r, H), "q_b": (H, r)}, method="gaussian", seed=0, dtype=ml_dtypes.bfloat16)
    assert g["q_a"].dtype == BF16 and not g["q_b"].astype(np.float32).any()
    assert np.std(g["q_a"].astype(np.float32)) == pytest.approx(1 / r, rel=0.15)
    with pytest.raises(moe_sft.InvalidArgumentError, match="method"):
        lora_init((E, H, I, r), method="xavier")
    with pytest.raises(moe_sft.InvalidArgumentError, match="dtype"):
        lora_init((E, H, I, r), dtype=np.float64)


# ---- the package API on each backend ---------------------------------------------------------------------------

def test_exported_and_on_the_backend_in_use(backend):
    for name in ("AdamW", "StepReport", "lora_init"):
        assert name in moe_sft.__all__ and getattr(moe_sft, name) is not None
    params = _params(np.random.default_rng(5))
    opt = moe_sft.AdamW(params, lr=1e-3)
    module = {"nanobind": "_moe_sft_ext", "cffi": "_cffi_backend"}[backend]
    assert opt._backend is _backend.backend and type(opt._handle).__module__.endswith(module)
    opt.close()


def test_not_copyable_and_keeps_its_arrays():
    import copy
    import gc
    import pickle
    rng = np.random.default_rng(6)
    params = {"w": rng.standard_normal((64, 8)).astype(np.float32), "h": rng.standard_normal(33).astype(BF16)}
    opt = moe_sft.AdamW(params, lr=1e-2)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            attempt(opt)
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            attempt(opt._handle)
    before = {n: a.copy() for n, a in params.items()}
    grads = {n: np.ones(a.shape, np.float32) for n, a in params.items()}
    del params
    gc.collect()  # the optimizer (and the backend's object) keep the parameter arrays alive
    assert not opt.step(grads).skipped
    for n, a in opt.params.items():
        assert np.all(a.astype(np.float32) < before[n].astype(np.float32)), n
    sd = opt.state_dict()
    opt.close()
    opt.close()  # idempotent
    assert sd["state"]["h"]["master"].shape == (33,) and sd["state"]["w"]["exp_avg"].shape == (64, 8)


def _run_on(name, dtype, steps=6):
    """Steps an optimizer made while backend ``name`` is in use; returns (params, reports, state_dict)."""
    saved = _backend.NAME
    _backend.use(name)
    try:
        rng = np.random.default_rng(11)
        params = {"gate_a": rng.standard_normal((4, 3, 40)).astype(dtype),
                  "down_b": rng.standard_normal((2, 50, 3)).astype(dtype)}
        opt = moe_sft.AdamW(params, lr=1e-2, weight_decay=0.05, max_grad_norm=2.0)
        reports = []
        for step in range(steps):
            grads = {n: (3 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in params.items()}
            if step == 2:
                grads["down_b"][1, 7, 2] = np.nan
            reports.append(opt.step(grads))
        return params, reports, opt.state_dict()
    finally:
        _backend.use(saved)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_backends_give_the_same_bits(dtype):
    runs = {}
    for name in _backend.NAMES:
        try:
            _backend.load(name)
        except ImportError as err:
            pytest.skip(str(err))
        runs[name] = _run_on(name, dtype)
    (pa, ra, sa), (pb, rb, sb) = runs.values()
    assert list(map(repr, ra)) == list(map(repr, rb)) and ra[2].skipped and ra[2].bad_param == "down_b" and ra[2].bad_index == (1, 7, 2)
    assert sa["step"] == sb["step"] == 5 and sa["hyper"] == sb["hyper"]
    for n in pa:
        assert pa[n].tobytes() == pb[n].tobytes(), n
        for key in sa["state"][n]:
            assert sa["state"][n][key].tobytes() == sb["state"][n][key].tobytes(), (n, key)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_matches_torch_adamw_where_installed(dtype):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rng = np.random.default_rng(8)
    params = {"gate_a": (0.5 * rng.standard_normal((4, 3, 40))).astype(dtype),
              "gate_b": (0.5 * rng.standard_normal((4, 24, 3))).astype(dtype),
              "down_b": (0.5 * rng.standard_normal(1000)).astype(dtype)}
    max_norm = 1.5
    opt = moe_sft.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, max_grad_norm=max_norm)
    # torch's parameters are f32: the bf16 case's masters
    tparams = [torch.tensor(a.astype(np.float32), requires_grad=True) for a in params.values()]
    topt = torch.optim.AdamW(tparams, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, foreach=False)
    for step in range(20):
        grads = {n: (3 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in params.items()}
        if step == 7:
            grads["gate_b"][1, 2, 0] = np.nan  # skipped here; torch is simply not stepped
        report = opt.step(grads)
        if step == 7:
            assert report.skipped and report.bad_param == "gate_b" and report.bad_index == (1, 2, 0)
            continue
        for t, g in zip(tparams, grads.values()):
            t.grad = torch.from_numpy(g)
        norm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
        assert report.grad_norm == pytest.approx(float(norm), rel=1e-5)
        topt.step()
    sd = opt.state_dict()
    assert sd["step"] == 19
    for t, (name, a) in zip(tparams, params.items()):
        state = sd["state"][name]
        value = state["master"] if dtype == BF16 else a
        np.testing.assert_allclose(value, t.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
        if dtype == BF16:
            assert a.tobytes() == state["master"].astype(BF16).tobytes()  # the bf16 array: its master, rounded
        np.testing.assert_allclose(state["exp_avg"], topt.state[t]["exp_avg"].numpy(), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(state["exp_avg_sq"], topt.state[t]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-10)
