"""What the suite covers, and where each axis of the compute matrix runs.

Compute matrix (kernel family x shape x LoRA dtype x tp_count x weight format): runs ONCE, on the backend
moe_sft picked at import (nanobind unless MOE_SFT_BACKEND says otherwise); the backends only marshal pointers.
- kernel family (the ``isa`` fixture): every family this machine runs (generic, amx-emulated everywhere;
  avx512_bf16, avx512_fma, amx where the CPU has them), for every test that takes ``isa``: test_correctness,
  test_kernel_tails, test_tensor_parallel, test_quantized (compute parts), test_cache_and_state,
  test_finite_checks, test_threads, test_gpt_oss.
- activation: SiLU-gated everywhere; gpt-oss's clamped SwiGLU with biases in test_gpt_oss (every family, tp_count
  1-3, LoRA f32/bf16, int8/int4_awq at create, MXFP4 checkpoints; reference.Activation, make_gpt_oss_problem).
- shapes: odd and block-straddling sizes in test_correctness (E, H, I, k, T, rank), every GEMM tail in
  test_kernel_tails (rows 1-33, H and I around 16/32/64-wide blocks), few-rows paths in test_quantized.
- LoRA dtype f32/bf16: test_correctness, test_tensor_parallel.
- tp_count 1-3: test_tensor_parallel (bf16), test_quantized (every format), test_threads.
- weight format bf16/int8/int4_awq (made at create and pre-quantized)/int4_k2: test_quantized.
- the NaN-filled scratch (MOE_SFT_DEBUG_SCRATCH=1): one subprocess over every family x format x tp_count 1, 2
  (test_cache_and_state.test_scratch_debug_fill_changes_nothing), compared bit for bit with this process.
Backends: test_parity compares nanobind and cffi bit for bit (results and errors) on a few cases reaching
every ABI entry point; the raw-ABI error tests (test_errors, the raw parts of test_router and test_quantized)
and test_backends' per-backend checks (GIL release) run once per backend (the ``backend`` fixture).
The UNSUPPORTED path: test_kernel_tails forces each family above MOE_SFT_MAX_ISA=generic, on every machine.
Accuracy: assert_matches_reference bounds every element (against the root-sum-square of its terms,
R.magnitudes) and each tensor's mean|a-b|/mean|b|; test_error_bounds proves a zeroed column, LoRA-grad row or
single element fails. Library constants (status, dtype, format, scoring codes) come from the header via cffi
(abi.py). README's examples run in test_readme; C consumers in test_c_consumers; the library built with
ASan+UBSan runs a slice of this suite in .ci/run.
"""
import os

# The float64 reference runs thousands of small matrix products: OpenBLAS's threads only contend there with
# the library's own pool (small products ran ~15x slower on 2 busy cores). Set before numpy loads its BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    return bind_lora(moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha,
                                    **p.layer_kwargs(), **kwargs), p)


def bind_lora(layer, p):
    """layer with p's LoRA arrays bound (when p has any)."""
    if p.rank:
        layer.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
    return layer


def run_layer(layer, p, **backward_kwargs):
    """forward(save) + backward on problem p; returns (out, Grads)."""
    out = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    return out, layer.backward(p.grad_out, **backward_kwargs)


# The bounds of assert_matches_reference, per base-weight format, set at about twice the worst error measured over
# the whole compute matrix of this suite (MOE_SFT_TEST_ERROR_LOG=path records every comparison; measured on
# generic and amx-emulated, the families the measuring machine runs; re-measure when a family or kernel path is
# added):
# - per element, in units of 2^-8 M with M = R.magnitudes (root-sum-square of the terms each element is made
#   of): worst measured 1.55 (bf16, routing-weight grads), 1.11 (int8), 1.26 (int4_awq), 1.03 (int4_k2) -> 3.0
#   for all (the spread is sample size, not format). A zeroed output column is ~110-130 units (test_error_bounds).
# - aggregate mean|a-b|/mean|b| per tensor: worst measured 7.3e-3 (bf16; its bound stays 1e-2, the README's
#   stated target), 1.23e-2 (int8, gate_a with few rows), 1.07e-2 (int4_awq, down_b), 1.20e-2 (int4_k2,
#   down_b) -> 2.5e-2, 2.2e-2, 2.4e-2 (before: 3e-2 for all). Quantized layers dequantize to bf16 before the
#   bf16 kernels, one rounding more per weight; the reference uses the dequantized weights exactly.
#   fp8_e4m3_block and mxfp4 (test_block_formats): worst 5.4e-3 and 4.5e-3 aggregate, 1.04 and 0.92 per element
#   -> the issue's target 1e-2 (mxfp4 decodes exactly; fp8 rounds code * scale_inv to bf16 once).
UNIT = 2.0 ** -8
ELEMENT_BOUND = {"bf16": 3.0, "int8": 3.0, "int4_awq": 3.0, "int4_k2": 3.0, "fp8_e4m3_block": 3.0, "mxfp4": 3.0}
AGGREGATE_BOUND = {"bf16": 1e-2, "int8": 2.5e-2, "int4_awq": 2.2e-2, "int4_k2": 2.4e-2, "fp8_e4m3_block": 1e-2,
                   "mxfp4": 1e-2}


def reference_errors(p, out, grads, reference=None):
    """{tensor: (aggregate mean|a-b|/mean|b|, worst elementwise |a-b| / (2^-8 M))} for the output and every grad.
    ``reference`` = (forward, backward dict, magnitudes) of p when the caller has them already."""
    fwd, ref, mags = reference or (R.forward(p), R.backward(p), R.magnitudes(p))
    got = {"output": out, "input": grads.input, "routing_weights": grads.routing_weights}
    want = {"output": fwd, **ref}
    for name in R.LORA_NAMES if p.rank else ():
        got[name] = getattr(grads, name)
    errors = {}
    for name, a in got.items():
        diff = np.abs(R.f64(a) - want[name])
        m = UNIT * mags[name]
        # an element made of no terms (a token without experts) must be exactly 0: its ratio is inf otherwise
        ratio = np.where(m > 0, diff / np.where(m > 0, m, 1.0), np.where(diff > 0, np.inf, 0.0))
        errors[name] = (R.rel_err(a, want[name]), float(ratio.max()) if ratio.size else 0.0)
    return errors


def assert_matches_reference(p, out, grads, tol=None, conditioned_routing=False, element_bound=None,
                             weight_format="bf16"):
    """Against the float64 reference, for the output and every grad: (1) the aggregate mean|a-b|/mean|b| <= tol
    and (2) every element within ELEMENT_BOUND[weight_format] * 2^-8 * M of the reference (M = root-sum-square of
    the terms the element is made of, R.magnitudes), which a wrong column, row or element fails however large
    the tensor (test_error_bounds).
    With conditioned_routing, the routing-weight grads (one dot product <grad_out[t], y> each, whose relative
    error is y's times the dot's cancellation) skip the aggregate and are judged per element against their sum
    of |terms| to tol instead: for problems with too few of them to average."""
    tol = AGGREGATE_BOUND[weight_format] if tol is None else tol
    element_bound = ELEMENT_BOUND[weight_format] if element_bound is None else element_bound
    reference = (R.forward(p), R.backward(p), R.magnitudes(p))
    errors = reference_errors(p, out, grads, reference=reference)
    _record(weight_format, errors)
    bad = {}
    for name, (aggregate, element) in errors.items():
        if not (name == "routing_weights" and conditioned_routing) and not aggregate <= tol:
            bad[f"{name} (mean|a-b|/mean|b|)"] = aggregate
        if not element <= element_bound:
            bad[f"{name} (worst |a-b| / 2^-8 M)"] = element
    if conditioned_routing:
        terms = routing_terms(p)
        err = np.abs(R.f64(grads.routing_weights) - reference[1]["routing_weights"])
        worst = float(np.max(err / np.where(terms > 0, terms, 1.0))) if err.size else 0.0
        if not worst <= tol:
            bad["routing_weights (vs sum of |terms|)"] = worst
    assert not bad, (f"above the bounds (aggregate {tol}, element {element_bound} x 2^-8 M): {bad} "
                     f"(all: {errors})")
    return errors


def _record(weight_format, errors):
    """MOE_SFT_TEST_ERROR_LOG=path appends each comparison's errors as a JSON line (how the bounds were measured)."""
    path = os.environ.get("MOE_SFT_TEST_ERROR_LOG")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "format": weight_format,
                                "isa": os.environ.get("MOE_SFT_ISA", ""), "errors": errors}) + "\n")


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
                y_abs = np.abs(h) @ np.abs(R.f64(p.down[e])).T + np.abs(p.bias("down_bias", e))
                if p.rank:
                    y_abs += p.scale * np.abs(h @ R.f64(p.lora["down_a"][e]).T) @ np.abs(R.f64(p.lora["down_b"][e])).T
                terms[t, j] = np.abs(R.f64(p.grad_out[t])) @ y_abs
    return terms


# ---- backends: compute tests run once, on the backend moe_sft chose; ABI-level tests on both ----

def _backend_params():
    """Both backends (one that cannot load is skipped with its reason; the test extra installs cffi, so CI runs
    both), or the one MOE_SFT_BACKEND forces."""
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

# A test that uses the fixture ``backend`` (by argument or with this mark) runs once per backend.
both_backends = pytest.mark.usefixtures("backend")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request):
    """Switches moe_sft to the backend of this run of the test (also exported to subprocesses it starts)."""
    name = request.param
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
