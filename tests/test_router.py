"""The NaN-safe top-k router (moe_sft_route / moe_sft_route_backward, moe_sft.route / route_backward).

Every row, however poisoned, must give top_k distinct ids in [0, E) and finite weights; rows without NaN or
Inf must equal a plain float64 numpy top-k exactly (ids) and to 1e-5 (weights); poisoned rows must follow
the rules stated in moe_sft.h, which a second, row-by-row float64 reference implements. The gradient is
checked by central differences of the float64 reference and of the library's own forward."""
import numpy as np
import pytest

import moe_sft
import reference as R
from abi import DTYPE_BF16, DTYPE_F32, INVALID, OK, SCORING
from conftest import CurrentBackend, assert_matches_reference, both_backends, make_layer, run_layer

B = CurrentBackend()
SCORINGS = ("softmax", "sigmoid")
NAN, INF = np.nan, np.inf


# ---- float64 references ----

def route_plain(logits, k, scoring, renormalize, bias):
    """The textbook router, for rows without NaN or Inf: stable argsort puts ties at the lower id."""
    if scoring == "softmax":
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = z / z.sum(axis=1, keepdims=True)
    else:
        with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x << 0: sigmoid 0, as it should be
            scores = 1.0 / (1.0 + np.exp(-logits))
    key = scores + (0.0 if bias is None else R.f64(bias))
    ids = np.argsort(-key, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, ids, axis=1)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return ids, weights


def rule_scores(row, scoring):
    """Scores of one row under the rules of moe_sft_route, and its NaN mask."""
    nan = np.isnan(row)
    with np.errstate(over="ignore", invalid="ignore"):
        if scoring == "sigmoid":
            return np.where(nan, 0.0, 1.0 / (1.0 + np.exp(-np.where(nan, 0.0, row)))), nan
        if nan.all():
            return np.full(row.size, 1.0 / row.size), nan
        top = row[~nan].max()
        if np.isinf(top):
            at_top = ~nan & (row == top)
            return at_top / at_top.sum(), nan
        z = np.where(nan, 0.0, np.exp(np.where(nan, -np.inf, row) - top))
        return z / z.sum(), nan


def rule_weights(row, ids, scoring, renormalize):
    scores, _ = rule_scores(row, scoring)
    w = scores[ids]
    if renormalize:
        total = w.sum()
        w = w / total if total > 0 else np.full(len(ids), 1.0 / len(ids))
    return w


def route_rules(logits, k, scoring, renormalize, bias):
    T, E = logits.shape
    ids = np.zeros((T, k), np.int64)
    weights = np.zeros((T, k))
    for t in range(T):
        scores, nan = rule_scores(logits[t], scoring)
        key = scores + (0.0 if bias is None else R.f64(bias))
        order = sorted(range(E), key=lambda e: (bool(nan[e]), 0.0 if nan[e] else -key[e], e))
        ids[t] = order[:k]
        weights[t] = rule_weights(logits[t], ids[t], scoring, renormalize)
    return ids, weights


def poisoned_logits(E, rng):
    """[T, E] f32 logits: clean rows first (returned count), then every kind of poisoned row."""
    def clean():
        return rng.standard_normal(E) * 2.0

    def with_bad(values, count):
        row = clean()
        row[rng.choice(E, count, replace=False)] = values
        return row

    rows = [clean() for _ in range(6)]
    rows += [np.zeros(E), clean() * 1e4]  # all equal; finite but saturating (ties at 0 and 1)
    n_clean = len(rows)
    for bad in (NAN, INF, -INF):
        rows += [with_bad(bad, 1), with_bad(bad, max(1, E // 2)), with_bad(bad, E - 1), np.full(E, bad)]
    rows += [with_bad([NAN, INF, -INF], 3), with_bad([INF, INF, NAN], 3),
             np.where(np.arange(E) % 2 == 0, NAN, -INF), np.where(np.arange(E) % 3 == 0, INF, NAN)]
    return np.array(rows, np.float32), n_clean


def assert_guarantees(ids, weights, k, E):
    assert ids.dtype == np.int64 and weights.dtype == np.float32 and ids.shape == weights.shape
    assert ((ids >= 0) & (ids < E)).all(), ids
    repeated = [t for t, row in enumerate(ids) if len(set(row.tolist())) != k]
    assert not repeated, f"rows with repeated ids: {repeated}"
    assert np.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all(), weights


# ---- the vLLM-style matrix ----

SHAPES = [(E, k) for E in (6, 8, 16, 64) for k in (1, 3, 4, 8) if k <= E]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("E,k", SHAPES, ids=[f"E{E}k{k}" for E, k in SHAPES])
def test_route_matrix(E, k, scoring, renormalize, bias, dtype):
    rng = np.random.default_rng(E * 100 + k)
    logits, n_clean = poisoned_logits(E, rng)
    if dtype == "bf16":
        logits = logits.astype(R.bf16)
    b = rng.normal(0.0, 0.1, E).astype(np.float32) if bias else None
    ids, weights = moe_sft.route(logits, k, scoring=scoring, renormalize=renormalize, correction_bias=b)
    assert_guarantees(ids, weights, k, E)
    l64 = R.f64(logits)
    assert np.isfinite(l64[:n_clean]).all() and not np.isfinite(l64[n_clean:]).all(axis=1).any()
    plain_ids, plain_weights = route_plain(l64[:n_clean], k, scoring, renormalize, b)
    np.testing.assert_array_equal(ids[:n_clean], plain_ids)
    np.testing.assert_allclose(weights[:n_clean], plain_weights, rtol=0, atol=1e-5)
    rule_ids, rule_w = route_rules(l64, k, scoring, renormalize, b)
    np.testing.assert_array_equal(ids, rule_ids)
    np.testing.assert_allclose(weights, rule_w, rtol=0, atol=1e-5)


def test_uint16_logits_are_bf16_bits():
    logits = np.random.default_rng(1).standard_normal((5, 8)).astype(R.bf16)
    logits[2, 3] = np.nan
    expected = moe_sft.route(logits, 3)
    got = moe_sft.route(logits.view(np.uint16), 3)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


# The rules of moe_sft.h, spelled out on rows small enough to check by hand (E = 6, k = 3).
RULE_CASES = {
    "all NaN softmax": ("softmax", False, [NAN] * 6, None, [0, 1, 2], [1 / 6] * 3),
    "all NaN softmax renorm": ("softmax", True, [NAN] * 6, None, [0, 1, 2], [1 / 3] * 3),
    "all NaN sigmoid": ("sigmoid", False, [NAN] * 6, None, [0, 1, 2], [0, 0, 0]),
    "all NaN sigmoid renorm": ("sigmoid", True, [NAN] * 6, None, [0, 1, 2], [1 / 3] * 3),
    "+Inf entries share softmax": ("softmax", False, [1, INF, 0, INF, NAN, -INF], None, [1, 3, 0], [0.5, 0.5, 0]),
    "all -Inf softmax": ("softmax", False, [-INF] * 6, None, [0, 1, 2], [1 / 6] * 3),
    "-Inf ties share softmax, NaN last": ("softmax", False, [NAN, -INF, NAN, -INF, NAN, NAN], None, [1, 3, 0],
                                          [0.5, 0.5, 0]),
    "sigmoid limits, NaN below -Inf": ("sigmoid", False, [NAN, -INF, 0, INF, NAN, NAN], None, [3, 2, 1],
                                       [1, 0.5, 0]),
    "sigmoid renorm": ("sigmoid", True, [NAN, -INF, 0, INF, NAN, NAN], None, [3, 2, 1], [2 / 3, 1 / 3, 0]),
    "all -Inf sigmoid renorm": ("sigmoid", True, [-INF] * 6, None, [0, 1, 2], [1 / 3] * 3),
    "bias never lifts a NaN": ("softmax", False, [NAN, 0, 0, 0, 0, 0], [10, 0, 0, 0, 0, 0], [1, 2, 3], [0.2] * 3),
    "bias selects, weights without it": ("softmax", False, [0] * 6, [0, 0, 0, 0, 0.5, 0.25], [4, 5, 0],
                                         [1 / 6] * 3),
    "bias away from the only +Inf": ("softmax", True, [INF, 0, 0, 0, 0, 0], [-5, 0, 0, 0, 0, 0], [1, 2, 3],
                                     [1 / 3] * 3),
}


@pytest.mark.parametrize("case", RULE_CASES, ids=list(RULE_CASES))
@pytest.mark.parametrize("dtype", [np.float32, R.bf16], ids=["f32", "bf16"])
def test_poisoned_row_rules(case, dtype):
    scoring, renormalize, row, bias, want_ids, want_weights = RULE_CASES[case]
    logits = np.array([row], np.float32).astype(dtype)
    b = None if bias is None else np.array(bias, np.float32)
    ids, weights = moe_sft.route(logits, 3, scoring=scoring, renormalize=renormalize, correction_bias=b)
    assert ids.tolist() == [want_ids]
    np.testing.assert_allclose(weights[0], want_weights, rtol=0, atol=1e-7)


def test_empty_batch():
    ids, weights = moe_sft.route(np.zeros((0, 8), np.float32), 2)
    assert ids.shape == (0, 2) and weights.shape == (0, 2)
    grad = moe_sft.route_backward(np.zeros((0, 8), np.float32), ids, weights)
    assert grad.shape == (0, 8) and grad.dtype == np.float32


# ---- backward ----

def reference_grad(l64, ids, grad_w, scoring, renormalize, eps=1e-6):
    """Central differences of sum_j grad_w[t, j] * weights[t, j] (ids fixed) in every finite logit."""
    fd = np.zeros_like(l64)
    for t in range(l64.shape[0]):
        for e in np.flatnonzero(np.isfinite(l64[t])):
            up, down = l64[t].copy(), l64[t].copy()
            up[e] += eps
            down[e] -= eps
            fd[t, e] = grad_w[t] @ (rule_weights(up, ids[t], scoring, renormalize)
                                    - rule_weights(down, ids[t], scoring, renormalize)) / (2 * eps)
    return fd


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_route_backward_matches_finite_differences(scoring, renormalize, dtype):
    E, k = 8, 3
    rng = np.random.default_rng(7)
    logits, _ = poisoned_logits(E, rng)
    logits = logits[np.abs(logits).max(axis=1, where=np.isfinite(logits), initial=0) < 1e3]  # differentiable rows
    if dtype == "bf16":
        logits = logits.astype(R.bf16)
    ids, _ = moe_sft.route(logits, k, scoring=scoring, renormalize=renormalize)
    ids[0] = [2, 2, 5]  # a repeated id counts twice (upstream routers do produce them)
    ids[1] = [7, 0, 4]  # any selection, not only the top-k
    grad_w = rng.standard_normal((len(logits), k)).astype(np.float32)
    grad = moe_sft.route_backward(logits, ids, grad_w, scoring=scoring, renormalize=renormalize)
    assert grad.dtype == np.float32 and grad.shape == logits.shape
    l64 = R.f64(logits)
    assert (grad[~np.isfinite(l64)] == 0).all()
    np.testing.assert_allclose(grad, reference_grad(l64, ids, R.f64(grad_w), scoring, renormalize),
                               rtol=1e-5, atol=1e-6)
    unselected = np.ones_like(grad, bool)
    np.put_along_axis(unselected, ids, False, axis=1)
    if scoring == "softmax" and not renormalize:  # the cross terms reach unselected experts
        assert (grad[:6][unselected[:6]] != 0).all()
    elif scoring == "softmax":  # renormalized: a softmax over the selected logits alone
        assert (grad[unselected] == 0).all()


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renorm"])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_route_backward_matches_the_library_forward(scoring, renormalize):
    """Forward and backward of the library agree: central differences through moe_sft.route itself."""
    T, E, k, eps = 16, 16, 4, 1e-3
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    ids, _ = moe_sft.route(logits, k, scoring=scoring, renormalize=renormalize)
    grad_w = rng.standard_normal((T, k)).astype(np.float32)
    grad = moe_sft.route_backward(logits, ids, grad_w, scoring=scoring, renormalize=renormalize)
    fd = np.zeros((T, E))
    stable = np.ones(T, bool)  # rows whose selection a step of eps does not change
    for e in range(E):
        sums, steps = [], []
        for step in (eps, -eps):
            moved = logits.copy()
            moved[:, e] += np.float32(step)
            i, w = moe_sft.route(moved, k, scoring=scoring, renormalize=renormalize)
            stable &= (i == ids).all(axis=1)
            sums.append((R.f64(grad_w) * w).sum(axis=1))
            steps.append(R.f64(moved[:, e]) - R.f64(logits[:, e]))  # the step f32 rounding actually took
        fd[:, e] = (sums[0] - sums[1]) / (steps[0] - steps[1])
    assert stable.sum() >= T - 2
    np.testing.assert_allclose(grad[stable], fd[stable], rtol=0, atol=2e-4)


# ---- the layer takes the router's output as is ----

def test_layer_accepts_router_output():
    p = R.make_problem(8, 32, 24, 3, 12, 4, seed=21)
    rng = np.random.default_rng(21)
    logits = rng.standard_normal((12, 8)).astype(np.float32)
    logits[3] = np.nan
    logits[5, [1, 6]] = np.inf
    p.ids, p.weights = moe_sft.route(logits, 3, scoring="sigmoid", renormalize=True,
                                     correction_bias=rng.normal(0, 0.1, 8).astype(np.float32))
    layer = make_layer(p)
    out, grads = run_layer(layer, p)
    assert_matches_reference(p, out, grads, conditioned_routing=True)
    grad_logits = moe_sft.route_backward(logits, p.ids, grads.routing_weights, scoring="sigmoid")
    assert np.isfinite(grad_logits).all() and (grad_logits[3] == 0).all()
    layer.close()


# ---- bad input: status, message naming the culprit, outputs untouched ----

T, E, K = 5, 6, 2


def addr(a):
    return a.__array_interface__["data"][0]


class Buffers:
    def __init__(self):
        rng = np.random.default_rng(3)
        self.logits = rng.standard_normal((T, E)).astype(np.float32)
        self.bias = np.zeros(E, np.float32)
        self.ids = np.full((T, K), 77, np.int64)
        self.weights = np.full((T, K), 3.25, np.float32)
        self.sel = np.tile(np.arange(K), (T, 1)).astype(np.int64)
        self.grad_w = np.ones((T, K), np.float32)
        self.grad_logits = np.full((T, E), -1.5, np.float32)
        self.snapshot = self.outputs()

    def outputs(self):
        return [a.copy() for a in (self.ids, self.weights, self.grad_logits)]

    def untouched(self):
        return all(np.array_equal(a, b) for a, b in zip(self.outputs(), self.snapshot))

    def route(self, qlen=T, experts=E, top_k=K, dtype=DTYPE_F32, logits=None, scoring=SCORING["softmax"], bias=None,
              ids=None, weights=None):
        return B.route(qlen, experts, top_k, dtype, addr(self.logits) if logits is None else logits, scoring, 1,
                       addr(self.bias) if bias is None else bias, addr(self.ids) if ids is None else ids,
                       addr(self.weights) if weights is None else weights)

    def backward(self, qlen=T, experts=E, top_k=K, dtype=DTYPE_F32, logits=None, scoring=SCORING["softmax"], ids=None,
                 grad_w=None, grad_logits=None):
        return B.route_backward(qlen, experts, top_k, dtype, addr(self.logits) if logits is None else logits,
                                scoring, 1, addr(self.sel) if ids is None else ids,
                                addr(self.grad_w) if grad_w is None else grad_w,
                                addr(self.grad_logits) if grad_logits is None else grad_logits)


def expect(status, got, *needles):
    msg = B.last_error()
    assert got == status, f"status {B.status_string(got)}, expected {B.status_string(status)}: {msg}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message {msg!r}"


def bias_with(index, value):
    b = np.zeros(E, np.float32)
    b[index] = value
    return b


ROUTE_CASES = {
    "top_k 0": (dict(top_k=0), ["top_k = 0 is out of range [1, 6]"]),
    "top_k above E": (dict(top_k=E + 1), ["top_k = 7 is out of range [1, 6]"]),
    "no experts": (dict(experts=0), ["expert_num = 0"]),
    "negative qlen": (dict(qlen=-1), ["qlen = -1"]),
    "bad dtype": (dict(dtype=7), ["logits_dtype = 7 is not a dtype"]),
    "bad scoring": (dict(scoring=7), ["scoring = 7 is not a scoring function", "MOE_SFT_SCORING_SIGMOID = 1"]),
    "null logits": (dict(logits=0), ["logits is NULL"]),
    "null ids": (dict(ids=0), ["expert_ids is NULL"]),
    "null weights": (dict(weights=0), ["routing_weights is NULL"]),
    "misaligned logits": (dict(logits="+2"), ["logits", "not aligned to its 4-byte elements"]),
    "misaligned ids": (dict(ids="+4"), ["expert_ids", "not aligned to its 8-byte elements"]),
    "misaligned bias": (dict(bias="+1"), ["correction_bias", "not aligned"]),
    "NaN bias": (dict(bias=bias_with(3, np.nan)), ["correction_bias[3] = nan is not finite"]),
    "-Inf bias": (dict(bias=bias_with(0, -np.inf)), ["correction_bias[0] = -inf is not finite"]),
}


def resolve(kwargs, default_of):
    """Case arguments: "+n" offsets the default buffer's address, an array passes its address."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, str):
            out[key] = addr(default_of[key]) + int(value)
        elif isinstance(value, np.ndarray):
            out[key] = addr(value)
        else:
            out[key] = value
    return out


@both_backends
@pytest.mark.parametrize("case", ROUTE_CASES, ids=list(ROUTE_CASES))
def test_route_rejects(case):
    kwargs, needles = ROUTE_CASES[case]
    buf = Buffers()
    args = resolve(kwargs, {"logits": buf.logits, "ids": buf.ids, "bias": buf.bias})
    expect(INVALID, buf.route(**args), "moe_sft_route:", *needles)
    assert buf.untouched()


BACKWARD_CASES = {
    "top_k 0": (dict(top_k=0), ["top_k = 0 is out of range [1, 6]"]),
    "bad dtype": (dict(dtype=5), ["logits_dtype = 5 is not a dtype"]),
    "bad scoring": (dict(scoring=2), ["scoring = 2 is not a scoring function"]),
    "null logits": (dict(logits=0), ["logits is NULL"]),
    "null ids": (dict(ids=0), ["expert_ids is NULL"]),
    "null grad": (dict(grad_w=0), ["grad_routing_weights is NULL"]),
    "null grad_logits": (dict(grad_logits=0), ["grad_logits is NULL"]),
    "misaligned grad_logits": (dict(grad_logits="+2"), ["grad_logits", "not aligned"]),
}


@both_backends
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=list(BACKWARD_CASES))
def test_route_backward_rejects(case):
    kwargs, needles = BACKWARD_CASES[case]
    buf = Buffers()
    args = resolve(kwargs, {"grad_logits": buf.grad_logits})
    expect(INVALID, buf.backward(**args), "moe_sft_route_backward:", *needles)
    assert buf.untouched()


@both_backends
@pytest.mark.parametrize("index,value", [((2, 1), E), ((0, 0), -1), ((4, 1), 1 << 40)])
def test_route_backward_rejects_ids(index, value):
    buf = Buffers()
    buf.sel[index] = value
    expect(INVALID, buf.backward(), f"expert_ids[{index[0]}, {index[1]}] = {value} is out of range [0, 6)")
    assert buf.untouched()


@both_backends
def test_raw_calls_succeed_and_accept_empty_batches():
    buf = Buffers()
    assert buf.route(bias=0) == OK and B.last_error() == ""
    assert buf.route(qlen=0, logits=0, ids=0, weights=0) == OK
    assert buf.backward(qlen=0, logits=0, ids=0, grad_w=0, grad_logits=0) == OK
    bf16_logits = buf.logits.astype(R.bf16)
    assert buf.backward(dtype=DTYPE_BF16, logits=addr(bf16_logits)) == OK


PYTHON_CASES = [
    (lambda L: moe_sft.route(L[0], 2), "logits has shape (6,); expected 2-D"),
    (lambda L: moe_sft.route(L.astype(np.int32), 2), "logits has dtype int32"),
    (lambda L: moe_sft.route(L, 0), "top_k = 0 is out of range [1, 6]"),
    (lambda L: moe_sft.route(L, 7), "top_k = 7 is out of range [1, 6]"),
    (lambda L: moe_sft.route(L, 2.0), "top_k = 2.0 is not an integer"),
    (lambda L: moe_sft.route(L, 2, scoring="tanh"), "scoring = 'tanh' is not one of 'softmax', 'sigmoid'"),
    (lambda L: moe_sft.route(L, 2, correction_bias=np.zeros(5)), "correction_bias has shape (5,); expected (6,)"),
    (lambda L: moe_sft.route(L, 2, correction_bias=bias_with(2, np.nan)),
     "moe_sft.route: correction_bias[2] = nan is not finite"),
    (lambda L: moe_sft.route_backward(L, np.zeros((4, 2), np.int64), np.zeros((5, 2))),
     "expert_ids has shape (4, 2); expected [5, top_k]"),
    (lambda L: moe_sft.route_backward(L, np.zeros((5, 2)), np.zeros((5, 2))), "expert_ids has dtype float64"),
    (lambda L: moe_sft.route_backward(L, np.zeros((5, 2), np.int32), np.zeros((5, 3))),
     "grad_routing_weights has shape (5, 3); expected (5, 2)"),
    (lambda L: moe_sft.route_backward(L, np.zeros((5, 7), np.int64), np.zeros((5, 7))),
     "top_k = 7 is out of range [1, 6]"),
    (lambda L: moe_sft.route_backward(L, np.full((5, 2), 6), np.zeros((5, 2))),
     "moe_sft.route_backward: expert_ids[0, 0] = 6 is out of range [0, 6)"),
]


@both_backends
@pytest.mark.parametrize("case", range(len(PYTHON_CASES)))
def test_python_api_rejects(case):
    call, needle = PYTHON_CASES[case]
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        call(Buffers().logits)
    assert needle in str(err.value)
    assert isinstance(err.value, ValueError)
