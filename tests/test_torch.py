"""moe_sft.torch: the layer as an autograd Function and nn.Module.

Checked against the float64 reference of the layer (reference.py, through conftest's bounds) and against a
plain-torch eager implementation of the same experts with LoRA (a loop over experts, as Transformers' eager
experts), run in float64 on the values the layer sees: outputs, the grads of hidden states, routing weights (and
of a router Linear upstream through softmax/topk) and LoRA Parameters; torch.optim.AdamW on both; saved-forward
pairing under gradient checkpointing, repeated calls, dropped graphs, failed backwards; rebinding of replaced
Parameters.
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

import moe_sft  # noqa: E402
import moe_sft.torch as mt  # noqa: E402
import reference as R  # noqa: E402
from conftest import assert_matches_reference  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

E, H, I, K, RANK, T = 8, 64, 48, 2, 4, 24
LORA_TOL = 1e-2  # aggregate mean|a-b|/mean|b| of bf16 compute against float64, as conftest's bf16 bound


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The eager reference runs many tiny products: torch's thread team only contends with the library's pool
    there (10x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(lora_dtype=np.float32, seed=0, T=T, **kwargs):
    return R.make_problem(E, H, I, K, T, RANK, lora_dtype=lora_dtype, seed=seed, **kwargs)


def module(p, projections=mt.PROJECTIONS, **kwargs):
    """A MoEExperts on p's base weights with p's LoRA arrays copied into its Parameters."""
    lora_dtype = torch.bfloat16 if p.lora["gate_a"].dtype == R.bf16 else torch.float32
    m = mt.MoEExperts.from_weights(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha, lora_dtype=lora_dtype,
                                   init=None, projections=projections, **kwargs)
    with torch.no_grad():
        for name, param in m.lora_state().items():
            param.copy_(mt.as_tensor(p.lora[name]))
    return m


def inputs(p, dtype=torch.float32, requires_grad=True):
    x = mt.as_tensor(p.x).to(dtype).requires_grad_(requires_grad)
    w = torch.from_numpy(p.weights.copy()).requires_grad_(requires_grad)
    return x, torch.from_numpy(p.ids), w


class Eager(torch.nn.Module):
    """The same experts in plain torch, as Transformers' eager experts loop: per hit expert, gather its tokens,
    gate/up/down with LoRA (s = alpha / r), index_add the weighted outputs. Base weights fixed, LoRA Parameters."""

    def __init__(self, p, dtype=torch.float64):
        super().__init__()
        f = lambda a: torch.from_numpy(R.f64(a)).to(dtype)  # noqa: E731
        self.gate, self.up, self.down = f(p.gate), f(p.up), f(p.down)
        self.lora = torch.nn.ParameterDict({n: torch.nn.Parameter(f(a)) for n, a in p.lora.items()})
        self.scale = p.scale

    def forward(self, x, ids, w):
        out = torch.zeros_like(x)
        L, s = self.lora, self.scale
        for e in torch.unique(ids).tolist():
            if e < 0:
                continue
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            g = xe @ self.gate[e].T + s * (xe @ L["gate_a"][e].T) @ L["gate_b"][e].T
            u = xe @ self.up[e].T + s * (xe @ L["up_a"][e].T) @ L["up_b"][e].T
            h = torch.nn.functional.silu(g) * u
            y = h @ self.down[e].T + s * (h @ L["down_a"][e].T) @ L["down_b"][e].T
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return out


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().mean() / b.abs().mean())


def grads_of(m, x, w):
    return {"input": x.grad, "routing_weights": w.grad, **{n: p.grad for n, p in m.lora_state().items()}}


def as_grads(g):
    return moe_sft.Grads(**{n: mt.as_numpy(t.float(), n) for n, t in g.items()})


# ---- correctness ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora_dtype", [np.float32, R.bf16], ids=["lora_f32", "lora_bf16"])
@pytest.mark.parametrize("tp_count", [1, 2])
def test_matches_reference(x_dtype, lora_dtype, tp_count):
    p = problem(lora_dtype)
    m = module(p, tp_count=tp_count)
    x, ids, w = inputs(p, x_dtype)
    out = m(x, ids, w)
    assert out.dtype == x_dtype and out.shape == (T, H)
    (out.float() * mt.as_tensor(p.grad_out).float()).sum().backward()
    assert m.layer.cache_depth == 0
    grads = grads_of(m, x, w)
    assert grads["gate_a"].dtype == m.gate_a.dtype and grads["input"].dtype == x_dtype
    assert_matches_reference(p, mt.as_numpy(out.float(), "out"), as_grads(grads))


def test_matches_eager_torch_with_router():
    """Grads of a router Linear upstream (softmax -> topk -> renormalize -> top_k_weights), of the hidden states
    (through the experts and the router) and of the LoRA Parameters, against the eager experts in float64."""
    p = problem()
    m = module(p)
    eager = Eager(p)
    torch.manual_seed(0)
    router = torch.nn.Linear(H, E, bias=False, dtype=torch.float64)
    x0 = torch.from_numpy(R.f64(p.x))
    target = torch.randn(T, H, dtype=torch.float64)

    def run(experts, dtype):
        r = torch.nn.Linear(H, E, bias=False, dtype=dtype)
        with torch.no_grad():
            r.weight.copy_(router.weight)
        x = x0.to(dtype).requires_grad_()
        probs = torch.softmax(r(x), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        loss = ((experts(x, ids, w).double() - target) ** 2).mean()
        loss.backward()
        return loss, ids, {"input": x.grad, "router": r.weight.grad}

    loss, ids, got = run(m, torch.float32)
    loss_ref, ids_ref, want = run(eager, torch.float64)
    assert torch.equal(ids, ids_ref)  # the routing itself is the same
    assert abs(loss.item() - loss_ref.item()) <= 1e-2 * loss_ref.item()
    for name in got:
        assert rel(got[name], want[name]) < LORA_TOL, name
    for name, param in m.lora_state().items():
        assert rel(param.grad, eager.lora[name].grad) < LORA_TOL, name


def test_adamw_training_matches_eager():
    """30 steps of torch.optim.AdamW on the moe_sft module and on the eager experts (float32), same init, fitting
    a teacher adapter on one batch: the loss curves agree within bf16 tolerance, and the loss falls."""
    p = problem(seed=1)
    p.lora = moe_sft.lora_init((E, H, I, RANK), seed=3)  # PEFT's: B zero, so both start at the base layer
    m, eager = module(p), Eager(p, torch.float32)
    teacher = Eager(problem(seed=1, lora_scale=0.5), torch.float32)  # same base weights, another adapter
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2), torch.optim.AdamW(eager.parameters(), lr=1e-2)]
    x, ids, w = inputs(problem(seed=100, T=64), requires_grad=False)
    with torch.no_grad():
        y = teacher(x, ids, w)
    curves = ([], [])
    for _ in range(30):
        for curve, model, opt in zip(curves, (m, eager), opts):
            opt.zero_grad()
            loss = ((model(x, ids, w) - y) ** 2).mean()
            loss.backward()
            opt.step()
            curve.append(loss.item())
    a, b = np.array(curves[0]), np.array(curves[1])
    assert b[-1] < 0.1 * b[0]
    assert np.max(np.abs(a - b) / b) < 2e-2, (a, b)  # measured 5.5e-3
    # AdamW's steps are ~lr * sign(grad) for small grads, so bf16's noise on them moves the weights further
    for name, param in m.lora_state().items():
        assert rel(param, eager.lora[name]) < 6e-2, name  # measured <= 3.2e-2


def test_shared_a_grads_add_up():
    """One A given as gate_a and up_a (PEFT's fused gate_up_proj): its grad is the sum of both uses."""
    p = problem()
    p.lora["up_a"] = p.lora["gate_a"]
    layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=RANK, lora_alpha=p.alpha)
    lora = {n: torch.from_numpy(a.copy()).requires_grad_() for n, a in p.lora.items() if n != "up_a"}
    lora["up_a"] = lora["gate_a"]
    x, ids, w = inputs(p)
    (mt.experts_forward(layer, x, ids, w, lora) * mt.as_tensor(p.grad_out).float()).sum().backward()
    ref = R.backward(p)
    want = torch.from_numpy(ref["gate_a"] + ref["up_a"])
    assert rel(lora["gate_a"].grad, want) < LORA_TOL


def test_projections_subset():
    """Only down has Parameters: gate and up run without adapters (as zero adapters would)."""
    p = problem()
    m = module(p, projections=("down",))
    assert sorted(n for n, _ in m.named_parameters()) == ["down_a", "down_b"]
    for n in ("gate_b", "up_b"):
        p.lora[n] = np.zeros_like(p.lora[n])
    x, ids, w = inputs(p)
    out = m(x, ids, w)
    (out * mt.as_tensor(p.grad_out).float()).sum().backward()
    ref = R.backward(p)
    assert rel(out, torch.from_numpy(R.forward(p))) < LORA_TOL
    for n in ("down_a", "down_b"):
        assert rel(getattr(m, n).grad, torch.from_numpy(ref[n])) < LORA_TOL
    assert rel(x.grad, torch.from_numpy(ref["input"])) < LORA_TOL



def test_untrained_projections_cost_no_memory_per_layer():
    """Projections without Parameters read zeros and have their grads written to scratch: both shared by the
    layers of a model (a model of N layers trained on "down" only must not keep N sets of scratch resident)."""
    import tracemalloc
    problems = [R.make_problem(E, H, I, K, T, 32, seed=s) for s in range(4)]  # rank 32: scratch >> bookkeeping
    layers = [module(p, projections=("down",)) for p in problems]
    x, ids, w = inputs(problems[0])
    scratch = 4 * sum(np.prod(s) for n, s in layers[0].layer.lora_shapes().items() if not n.startswith("down"))
    tracemalloc.start()
    try:
        layers[0](x, ids, w).sum().backward()
        first = tracemalloc.get_traced_memory()[0]
        for m in layers[1:]:
            m(x, ids, w).sum().backward()
        more = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert more < scratch / 2, (more, scratch)

def test_no_lora_runs_the_base_layer():
    p = problem()
    m = module(p, projections=())
    base = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=RANK, lora_alpha=p.alpha)
    x, ids, w = inputs(p)
    out = m(x, ids, w)
    assert torch.equal(out, torch.from_numpy(base.forward(p.x, p.ids, p.weights).astype(np.float32)))
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_output_is_an_ordinary_tensor():
    """bf16 on the CPU: the output is the layer's own array, no copy, and may be modified in place (a MoE block
    adds the shared experts into it)."""
    p = problem()
    m = module(p)
    x, ids, w = inputs(p, torch.bfloat16)
    out = m(x, ids, w)
    assert out.dtype == torch.bfloat16 and not out._is_view()
    out += 1.0
    out.float().sum().backward()
    assert m.layer.cache_depth == 0 and x.grad is not None



def test_torch_compile_runs_the_layer_outside_the_graph():
    """torch.compile on a model holding the module: dynamo leaves the layer's call out of its graph (it cannot
    trace numpy views), and outputs and grads are the eager ones."""
    p = problem()
    results = []
    for compiled in (False, True):
        m = module(p)
        x, ids, w = inputs(p)
        f = torch.compile(m, backend="eager", fullgraph=False) if compiled else m
        (f(x, ids, w) ** 2).sum().backward()
        results.append(grads_of(m, x, w))
        assert m.layer.cache_depth == 0
    for name, g in results[0].items():
        assert torch.equal(g, results[1][name]), name


def test_default_device_elsewhere():
    """A GPU user's torch.set_default_device("cuda") (here "meta", which no CPU code can read) changes nothing:
    the module makes its Parameters, saved-forward tokens and grads on the CPU, where the layer reads them."""
    p = problem()
    ref = module(p)
    x, ids, w = inputs(p)
    (ref(x, ids, w) ** 2).sum().backward()
    with torch.device("meta"):
        m = module(p)
        assert all(q.device.type == "cpu" for q in m.parameters())
        x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        (m(x2, ids, w2) ** 2).sum().backward()
    for name, g in grads_of(ref, x, w).items():
        assert torch.equal(g, grads_of(m, x2, w2)[name]), name

# ---- what gets saved, and when --------------------------------------------------------------------------------------

def test_no_grad_saves_nothing():
    p = problem()
    m = module(p)
    x, ids, w = inputs(p)
    with torch.no_grad():
        out = m(x, ids, w)
    assert out.grad_fn is None and m.layer.cache_depth == 0
    with torch.inference_mode():
        out = m(x.detach(), ids, w.detach())
    assert m.layer.cache_depth == 0
    for param in m.parameters():
        param.requires_grad_(False)
    out = m(x.detach(), ids, w.detach())  # nothing requires grad
    assert out.grad_fn is None and m.layer.cache_depth == 0


def test_frozen_parameters_get_no_grads(monkeypatch):
    p = problem()
    m = module(p)
    calls = []
    real = moe_sft.MoESFT.backward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("lora_grads"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(moe_sft.MoESFT, "backward", spy)
    x, ids, w = inputs(p)
    for param in m.parameters():
        param.requires_grad_(False)
    m(x, ids, w).sum().backward()
    assert calls == [False] and all(param.grad is None for param in m.parameters())
    assert x.grad is not None and w.grad is not None
    m.gate_b.requires_grad_(True)
    m(x, ids, w).sum().backward()
    assert calls == [False, True] and m.gate_b.grad is not None and m.gate_a.grad is None


def test_grads_accumulate_over_forwards():
    """Three forwards of one module, then one backward: .grad is the sum, as torch accumulates it. With a cache
    of 3 they are all saved; with the default of 1 the extra ones are recomputed (and a warning says so)."""
    p = problem()
    batches = [inputs(problem(seed=s)) for s in (1, 2, 3)]

    def run(**kwargs):
        m = module(p, **kwargs)
        loss = sum((m(x, ids, w) ** 2).sum() for x, ids, w in batches)
        depth = m.layer.cache_depth
        loss.backward()
        return m, depth

    single = []
    for x, ids, w in batches:  # one forward and backward each, grads accumulated by torch
        m1 = module(p) if not single else single[0]
        (m1(x, ids, w) ** 2).sum().backward()
        single = [m1]
    m3, depth3 = run(max_cache_depth=3)
    assert depth3 == 3 and m3.layer.cache_depth == 0
    with pytest.warns(RuntimeWarning, match="max_cache_depth"):
        m1, depth1 = run()
    assert depth1 == 1 and m1.layer.cache_depth == 0
    for name, param in single[0].lora_state().items():  # the same f32 terms, added in another order
        atol = 1e-6 * param.grad.abs().max().item()
        torch.testing.assert_close(m3.lora_state()[name].grad, param.grad, rtol=1e-5, atol=atol)
        torch.testing.assert_close(m1.lora_state()[name].grad, param.grad, rtol=1e-5, atol=atol)


def test_graph_dropped_without_backward_leaves_nothing():
    p = problem()
    m = module(p, max_cache_depth=2)
    x, ids, w = inputs(p)
    loss = m(x, ids, w).sum() + m(x * 2, ids, w).sum()
    assert m.layer.cache_depth == 2
    del loss
    assert m.layer.cache_depth == 0
    # one of two graphs dropped: the other's backward still finds its own saved forward
    a, b = m(x, ids, w).sum(), (m(x, ids, w) ** 2).sum()
    del b
    assert m.layer.cache_depth == 1
    a.backward()
    assert m.layer.cache_depth == 0
    # a graph dropped while a call (here: this block) holds the layer: dropped as soon as the call ends
    loss = m(x, ids, w).sum()
    with mt._state(m.layer).locked():
        del loss
        assert m.layer.cache_depth == 1
    assert m.layer.cache_depth == 0


def test_graph_dropped_during_a_direct_call_on_the_layer_does_not_hang():
    """A graph can die inside a call on the layer that holds its lock (a garbage collection running there, in the
    same thread): its saved forward is then dropped at the next call here, instead of waiting for that lock."""
    import threading
    p = problem()
    m = module(p)
    x, ids, w = inputs(p)
    loss = m(x, ids, w).sum()

    def drop_inside_a_layer_call():
        nonlocal loss
        with m.layer._lock:
            del loss
    thread = threading.Thread(target=drop_inside_a_layer_call, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "deadlock: the dying token waited for the layer's lock held by its own thread"
    m(x, ids, w).sum().backward()
    assert m.layer.cache_depth == 0


def test_backwards_in_another_order_and_retained_graph():
    """Two losses backpropagated oldest first, and one graph backpropagated twice: each backward gets its own
    forward (recomputed when its saved one is not on top or already taken)."""
    p = problem()
    (x1, ids1, w1), (x2, ids2, w2) = inputs(problem(seed=1)), inputs(problem(seed=2))

    def grads(m):
        return {n: q.grad.clone() for n, q in m.lora_state().items()}

    ref1, ref2 = module(p), module(p)
    (ref1(x1, ids1, w1) ** 2).sum().backward()
    (ref2(x2, ids2, w2) ** 2).sum().backward()
    m = module(p, max_cache_depth=2)
    l1, l2 = (m(x1, ids1, w1) ** 2).sum(), (m(x2, ids2, w2) ** 2).sum()
    with pytest.warns(RuntimeWarning, match="cache is full"):  # below l2's saved forward: recomputed, which
        l1.backward()                                               # needs a slot: l2's is dropped (recomputed too)
    g1 = grads(m)
    m.zero_grad()
    l2.backward(retain_graph=True)
    g2 = grads(m)
    l2.backward()  # taken already: recomputed
    for n in g1:
        assert torch.equal(g1[n], grads(ref1)[n]) and torch.equal(g2[n], grads(ref2)[n]), n
        assert torch.equal(m.lora_state()[n].grad, 2 * g2[n]), n
    assert m.layer.cache_depth == 0


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("calls", [1, 2])
def test_checkpoint_gives_the_same_grads(calls, use_reentrant):
    """torch.utils.checkpoint around one or two calls of the module: nothing stays saved after the forward, and
    the grads equal those without checkpointing."""
    p = problem()
    x0, ids, w0 = inputs(p)

    def block(m, x, w):
        for _ in range(calls):
            x = x + m(torch.nn.functional.layer_norm(x, (H,)), ids, w)
        return x

    results = []
    for use_checkpoint in (False, True):
        m = module(p, max_cache_depth=2)
        x, w = x0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()
        out = checkpoint(block, m, x, w, use_reentrant=use_reentrant) if use_checkpoint else block(m, x, w)
        assert m.layer.cache_depth == (0 if use_checkpoint else calls)
        (out ** 2).sum().backward()
        assert m.layer.cache_depth == 0
        results.append(grads_of(m, x, w))
    for name, g in results[0].items():
        assert torch.equal(g, results[1][name]), name


def test_checkpointed_layers_in_a_model():
    """Two MoE layers each under checkpoint, with a shared module called twice, in one graph; cache depth 1."""
    p = problem()
    m1, m2 = module(p), module(problem(seed=7))
    x0, ids, w = inputs(p)

    def run(use_checkpoint):
        x = x0.detach().clone().requires_grad_()
        h = x
        for m in (m1, m2, m1):
            f = (lambda h, m=m: h + m(h, ids, w))
            h = checkpoint(f, h, use_reentrant=False) if use_checkpoint else f(h)
        for m in (m1, m2):
            m.zero_grad()
        (h ** 2).sum().backward()
        return [x.grad] + [q.grad.clone() for m in (m1, m2) for q in m.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # m1 twice with a cache of 1: recomputed
        without = run(False)
    for a, b in zip(without, run(True)):
        assert torch.equal(a, b)
    assert m1.layer.cache_depth == m2.layer.cache_depth == 0


def test_threads_share_one_module():
    """Threads running forward + backward on one module at once: each backward still gets its own forward."""
    import threading
    p = problem()
    batches = [inputs(problem(seed=s)) for s in range(6)]
    ref, m = module(p), module(p, max_cache_depth=2)
    for x, ids, w in batches:
        (ref(x, ids, w) ** 2).sum().backward()
    errors = []

    def work(mine):
        try:
            for x, ids, w in mine:
                (m(x, ids, w) ** 2).sum().backward()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        threads = [threading.Thread(target=work, args=(batches[i::3],)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and m.layer.cache_depth == 0
    for name, param in ref.lora_state().items():
        torch.testing.assert_close(m.lora_state()[name].grad, param.grad, rtol=1e-5,
                                   atol=1e-6 * param.grad.abs().max().item())


# ---- failures ------------------------------------------------------------------------------------------------------

def test_failed_backward_raises_and_leaves_nothing():
    p = problem()
    m = module(p, check_finite=True)
    x, ids, w = inputs(p)
    out = m(x, ids, w)
    grad = torch.ones_like(out)
    grad[3, 5] = float("nan")
    with pytest.raises(moe_sft.NonFiniteError, match="grad_output"):
        out.backward(grad)
    assert m.layer.cache_depth == 0
    out = m(x, ids, w)  # the layer works on
    out.sum().backward()
    assert m.layer.cache_depth == 0
    with pytest.raises(moe_sft.NonFiniteError):
        m(torch.full_like(x, float("inf")), ids, w)
    assert m.layer.cache_depth == 0


def test_errors_name_the_argument():
    p = problem()
    m = module(p)
    x, ids, w = inputs(p)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"top_k_index has dtype torch.float32"):
        m(x, ids.float(), w)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"hidden_states has shape \(24, 63\)"):
        m(x[:, :63], ids, w)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"top_k_index has shape \(23, 2\)"):
        m(x, ids[:23], w)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"top_k_weights has shape \(24, 1\)"):
        m(x, ids, w[:, :1])
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"top_k_weights has dtype torch.int64"):
        m(x, ids, ids)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"torch forward: top_k_index\[0, 0\] = 8 is out of range"):
        m(x, torch.full_like(ids, E), w)
    layer = m.layer
    bad = {n: q.detach() for n, q in m.lora_state().items()}
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"gate_b has dtype torch.float16"):
        mt.experts_forward(layer, x, ids, w, {**bad, "gate_b": bad["gate_b"].half()})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"up_a has shape \(8, 4, 65\)"):
        mt.experts_forward(layer, x, ids, w, {**bad, "up_a": torch.zeros(E, RANK, H + 1)})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"down_a is on meta"):
        mt.experts_forward(layer, x, ids, w, {**bad, "down_a": bad["down_a"].to("meta")})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"down_b is not contiguous"):
        mt.experts_forward(layer, x, ids, w, {**bad, "down_b": torch.zeros(E, RANK, H).transpose(1, 2)})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"unknown key 'gate'"):
        mt.experts_forward(layer, x, ids, w, {"gate": bad["gate_a"]})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"max_cache_depth = 0"):
        module(p, max_cache_depth=0)(x, ids, w)
    assert layer.cache_depth == 0


# ---- binding -------------------------------------------------------------------------------------------------------

def reference_out(p, lora):
    q = R.Problem(p.gate, p.up, p.down, {n: mt.as_numpy(t.detach(), n) for n, t in lora.items()}, p.alpha, p.x,
                  p.ids, p.weights, p.grad_out)
    return torch.from_numpy(R.forward(q))


@pytest.mark.parametrize("tp_count", [1, 2])
def test_in_place_updates_need_no_rebind(tp_count):
    p = problem()
    m = module(p, tp_count=tp_count)
    x, ids, w = inputs(p)
    (m(x, ids, w) ** 2).sum().backward()
    bound = m.layer.lora
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, foreach=tp_count == 1)
    opt.step()
    with torch.no_grad():
        out = m(x, ids, w)
    assert all(m.layer.lora[n] is a for n, a in bound.items())  # read in place, not bound again
    assert rel(out, reference_out(p, m.lora_state())) < LORA_TOL
    assert rel(out, reference_out(p, {n: torch.from_numpy(a) for n, a in p.lora.items()})) > 0.05


@pytest.mark.parametrize("how", ["new Parameter", "param.data", "dtype"])
def test_replaced_parameters_are_bound_again(how):
    p = problem()
    m = module(p)
    x, ids, w = inputs(p)
    with torch.no_grad():
        m(x, ids, w)
    new = torch.randn(E, I, RANK) * 0.3
    if how == "new Parameter":
        m.gate_b = torch.nn.Parameter(new.clone())
    elif how == "param.data":
        m.gate_b.data = new.clone()
    else:
        m.to(torch.bfloat16)
    out = m(x, ids, w)
    (out ** 2).sum().backward()
    if how == "dtype":
        assert m.layer.lora["gate_b"].dtype == R.bf16
    else:
        assert torch.equal(m.gate_b.detach(), new)
    assert rel(out, reference_out(p, m.lora_state())) < LORA_TOL
    assert m.gate_b.grad is not None and m.gate_b.grad.dtype == m.gate_b.dtype


def test_replaced_between_forward_and_backward():
    """The backward uses the tensors its forward used; the next forward binds the new ones."""
    p = problem()
    m = module(p)
    x, ids, w = inputs(p)
    old = m.gate_b
    loss = (m(x, ids, w) ** 2).sum()
    m.gate_b = torch.nn.Parameter(torch.randn(E, I, RANK))
    loss.backward()
    ref = module(p)
    (ref(x, ids, w) ** 2).sum().backward()
    assert torch.equal(old.grad, ref.gate_b.grad) and m.gate_b.grad is None
    with torch.no_grad():
        assert rel(m(x, ids, w), reference_out(p, m.lora_state())) < LORA_TOL


def test_in_place_update_between_forward_and_backward_is_reported():
    p = problem()
    m = module(p)
    x, ids, w = inputs(p)
    loss = m(x, ids, w).sum()
    with torch.no_grad():
        m.gate_b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- module construction, conversions, isolation ----------------------------------------------------------------

def test_init_and_from_weights():
    p = problem()
    g, u, d = (mt.as_tensor(a) for a in (p.gate, p.up, p.down))
    m = mt.MoEExperts.from_weights(g, u, d, lora_rank=RANK, lora_alpha=8, seed=0, lora_dtype=torch.bfloat16)
    want = moe_sft.lora_init(m.layer, seed=0, dtype=R.bf16)
    for name, param in m.lora_state().items():
        assert param.dtype == torch.bfloat16 and param.is_contiguous() and tuple(param.shape) == want[name].shape
        assert np.array_equal(mt.as_numpy(param, name), want[name]), name
    assert mt.MoEExperts(m.layer, init="zeros").gate_a.abs().sum() == 0
    q = [moe_sft.quantize(a, "int8") for a in (p.gate, p.up, p.down)]
    assert mt.MoEExperts.from_weights(*q, lora_rank=RANK).layer.weight_format == "int8"
    with pytest.raises(AttributeError):
        m.layer = None
    with pytest.raises(moe_sft.InvalidArgumentError, match="projections"):
        mt.MoEExperts(m.layer, projections=("gate", "gate"))
    with pytest.raises(moe_sft.InvalidArgumentError, match="lora_dtype"):
        mt.MoEExperts(m.layer, lora_dtype=torch.float16)


def test_unseeded_init_follows_torch_manual_seed():
    """seed=None draws from torch's generator: torch.manual_seed reproduces the init (as it does PEFT's), and
    successive modules get different inits."""
    p = problem()
    layer = mt.MoEExperts.from_weights(p.gate, p.up, p.down, lora_rank=RANK, lora_alpha=8, init=None).layer

    def init():
        return {n: t.detach().clone() for n, t in mt.MoEExperts(layer).lora_state().items()}

    torch.manual_seed(7)
    first, second = init(), init()
    torch.manual_seed(7)
    again = init()
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["gate_a"], second["gate_a"])


def test_as_numpy_and_as_tensor_share_memory():
    t = torch.randn(4, 6).to(torch.bfloat16)
    a = mt.as_numpy(t, "t")
    assert a.dtype == R.bf16 and np.array_equal(a.astype(np.float32), t.float().numpy())
    t[1, 2] = 7.0
    assert a[1, 2] == 7.0
    back = mt.as_tensor(a)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == t.data_ptr()
    f = torch.randn(3, 5, requires_grad=True)
    assert mt.as_numpy(f, "f").ctypes.data == f.data_ptr()
    assert mt.as_numpy(f.T, "f", contiguous=False).strides == (4, 20)
    with pytest.raises(moe_sft.InvalidArgumentError, match="f is not contiguous"):
        mt.as_numpy(f.T, "f")
    with pytest.raises(moe_sft.InvalidArgumentError, match="c has dtype torch.float8_e4m3fnuz"):
        mt.as_numpy(torch.zeros(2, dtype=torch.float8_e4m3fnuz), "c")
    with pytest.raises(moe_sft.InvalidArgumentError, match="n must be a torch.Tensor, got list"):
        mt.as_numpy([1.0], "n")


def test_import_moe_sft_does_not_import_torch():
    code = "import sys, moe_sft; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_import_moe_sft_torch_does_not_import_dynamo():
    """torch.compile support must not cost every user dynamo's import (seconds)."""
    code = "import sys, moe_sft.torch; sys.exit('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
