import os

import numpy as np
import pytest

import moe_sft
import reference as R
from moe_sft import _backend

KNOWN_ISAS = ("generic", "avx512_bf16", "avx512_fma", "amx-emulated", "amx")


def _runs_here(isa):
    old = os.environ.get("MOE_SFT_ISA")
    os.environ["MOE_SFT_ISA"] = isa
    try:
        p = R.make_problem(1, 8, 8, 1, 1, 0)
        moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=0).close()
        return True
    except moe_sft.MoESFTError:
        return False
    finally:
        if old is None:
            del os.environ["MOE_SFT_ISA"]
        else:
            os.environ["MOE_SFT_ISA"] = old


AVAILABLE_ISAS = [isa for isa in KNOWN_ISAS if _runs_here(isa)]


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request, monkeypatch):
    """Runs the test once per kernel family this machine can run (the family is fixed at layer create)."""
    monkeypatch.setenv("MOE_SFT_ISA", request.param)
    return request.param


def make_layer(p, **kwargs):
    return bind_lora(moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha, **kwargs), p)


def bind_lora(layer, p):
    """layer with p's LoRA arrays bound (when p has any)."""
    if p.rank:
        layer.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
    return layer


def run_layer(layer, p, **backward_kwargs):
    """forward(save) + backward on problem p; returns (out, Grads)."""
    out = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    return out, layer.backward(p.grad_out, **backward_kwargs)


def assert_matches_reference(p, out, grads, tol=1e-2, conditioned_routing=False):
    """mean|a-b|/mean|b| <= tol for the output and every grad. With conditioned_routing, each routing-weight
    grad (one dot product <grad_out[t], y>, whose relative error is y's times the dot's cancellation) is
    judged against its sum of |terms| instead: for problems with too few of them to average."""
    ref = R.backward(p)
    errors = {"output": R.rel_err(out, R.forward(p))}
    names = ["input"] + (list(R.LORA_NAMES) if p.rank else [])
    if conditioned_routing:
        terms = routing_terms(p)
        err = np.abs(R.f64(grads.routing_weights) - ref["routing_weights"])
        errors["routing_weights (vs sum of |terms|)"] = float(np.max(err / np.where(terms > 0, terms, 1.0)))
    else:
        names.insert(1, "routing_weights")
    for name in names:
        errors[name] = R.rel_err(getattr(grads, name), ref[name])
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative error above {tol}: {bad} (all: {errors})"
    return errors


def routing_terms(p):
    """sum_c |grad_out[t, c]| * (|h| |Wd|^T + s |h Ad^T| |Bd|^T)[c] for every (t, j): the magnitude the
    routing-weight grad <grad_out[t], y> is summed from, before any cancellation (inside y or in the dot)."""
    T, k = p.ids.shape
    terms = np.zeros((T, k))
    for t in range(T):
        for j in range(k):
            e = p.ids[t, j]
            if e >= 0:
                h = R.expert_forward(p, e, R.f64(p.x[t:t + 1]))[2][0]
                y_abs = np.abs(h) @ np.abs(R.f64(p.down[e])).T
                if p.rank:
                    y_abs += p.scale * np.abs(h @ R.f64(p.lora["down_a"][e]).T) @ np.abs(R.f64(p.lora["down_b"][e])).T
                terms[t, j] = np.abs(R.f64(p.grad_out[t])) @ y_abs
    return terms


# ---- every test runs once per backend (nanobind, cffi), unless marked backend_independent ----

def _backend_params():
    """The backends to run: the one MOE_SFT_BACKEND forces, else all; one that cannot load is skipped with
    its reason (the test extra installs cffi, so CI runs both)."""
    forced = os.environ.get("MOE_SFT_BACKEND")
    params = []
    for name in [forced] if forced else _backend.NAMES:
        try:
            _backend.load(name)
            params.append(name)
        except ImportError as err:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason=str(err))))
    return params


BACKENDS = _backend_params()


def pytest_configure(config):
    config.addinivalue_line("markers", "backend_independent: the test does not go through a Python backend, "
                                       "so it runs once instead of once per backend")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("backend_independent") is None:
        # session scope: pytest groups the tests by backend, switching backends once
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="session")


@pytest.fixture(scope="session", autouse=True)
def backend(request):
    """The backend moe_sft calls through for this test, also exported to the subprocesses tests start."""
    name = getattr(request, "param", None)
    if name is None:  # a backend_independent test
        yield _backend.NAME
        return
    saved = (_backend.NAME, os.environ.get("MOE_SFT_BACKEND"))
    _backend.use(name)
    os.environ["MOE_SFT_BACKEND"] = name
    yield name
    _backend.use(saved[0])
    if saved[1] is None:
        del os.environ["MOE_SFT_BACKEND"]
    else:
        os.environ["MOE_SFT_BACKEND"] = saved[1]


class CurrentBackend:
    """The C ABI at the pointer level (tests/c_abi.py: raw cffi, arrays as addresses), for the tests that send
    NULLs, misaligned addresses and bad enum values as a C caller could; the moe_sft backends take typed
    arrays and cannot. Imported at first use, so that a machine without cffi still runs the rest."""

    def __getattr__(self, name):
        pytest.importorskip("cffi", reason="the pointer-level tests reach the C ABI through cffi")
        import c_abi
        return getattr(c_abi, name)
