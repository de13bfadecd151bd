"""Version 0.3's ABI for saved forwards and adapters, called through the raw C ABI (the header's CDEF block
given to cffi, as another runtime would): moe_sft_discard_saved, moe_sft_update_lora(layer, NULL) and the
base-only forward of a rank > 0 layer without adapters, and the dtype/scoring names. Every failing call must
leave the outputs byte for byte and the forward cache as they were. Runs on every kernel family here."""
import dataclasses
import os

import numpy as np
import pytest

cffi = pytest.importorskip("cffi")

import moe_sft
import reference as R


OK, INVALID, CACHE_EMPTY = 0, 1, 4
E, H, I, K, T, RANK = 4, 64, 48, 2, 9, 4


def _load():
    header = open(os.path.join(moe_sft.get_include(), "moe_sft.h")).read()
    ffi = cffi.FFI()
    ffi.cdef(header.split("/* MOE_SFT_CDEF_BEGIN */")[1].split("/* MOE_SFT_CDEF_END */")[0])
    return ffi, ffi.dlopen(moe_sft.get_library())


ffi, lib = _load()


def ptr(ctype, a):
    return ffi.cast(ctype, a.__array_interface__["data"][0])


def message():
    return ffi.string(lib.moe_sft_last_error()).decode()


def expect(status, got, *needles):
    msg = message()
    assert got == status, f"status {got}, expected {status}: {msg}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


class Layer:
    """A raw handle over problem p's base weights (LoRA rank `rank`, none bound), with sentinel outputs."""

    def __init__(self, p, rank=RANK, depth=1, check_finite=0):
        self.p = p
        cfg = ffi.new("moe_sft_config *")
        lib.moe_sft_config_init(cfg)
        cfg.expert_num, cfg.hidden_size, cfg.intermediate_size = E, H, I
        cfg.lora_rank, cfg.lora_alpha, cfg.max_cache_depth = rank, p.alpha, depth
        cfg.num_threads, cfg.check_finite = 0, check_finite
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = (ptr("const void *", a) for a in (p.gate, p.up, p.down))
        out = ffi.new("moe_sft_layer **")
        assert lib.moe_sft_create(cfg, out) == OK, message()
        self.h = out[0]
        self.out = np.full((T, H), 0x7bcd, np.uint16)
        self.gi = np.full((T, H), 0x1234, np.uint16)
        self.gw = np.full((T, K), 3.25, np.float32)
        self.grads = {n: np.full((E,) + shape, -1.5, np.float32) for n, shape in lora_shapes(rank).items()}
        self.snapshot = self.buffers()

    def bind(self, lora=None):
        lora = self.p.lora if lora is None else lora
        s = ffi.new("moe_sft_lora *", {"dtype": 1})
        s.gate_a, s.gate_b, s.up_a, s.up_b, s.down_a, s.down_b = (ptr("const void *", lora[n]) for n in R.LORA_NAMES)
        return lib.moe_sft_update_lora(self.h, s)

    def unbind(self):
        return lib.moe_sft_update_lora(self.h, ffi.NULL)

    def forward(self, x=None, save=1):
        p = self.p
        x = p.x if x is None else x
        return lib.moe_sft_forward(self.h, T, K, ptr("const int64_t *", p.ids), ptr("const float *", p.weights),
                                   ptr("const uint16_t *", x.view(np.uint16)), ptr("uint16_t *", self.out), save)

    def backward(self, grads=True, accumulate=0):
        g = ffi.NULL
        if grads:
            g = ffi.new("moe_sft_lora_grads *")
            g.gate_a, g.gate_b, g.up_a, g.up_b, g.down_a, g.down_b = (ptr("float *", self.grads[n]) for n in R.LORA_NAMES)
        return lib.moe_sft_backward(self.h, ptr("const uint16_t *", self.p.grad_out.view(np.uint16)),
                                    ptr("uint16_t *", self.gi), ptr("float *", self.gw), g, accumulate)

    def discard(self, n):
        return lib.moe_sft_discard_saved(self.h, n)

    def depth(self):
        d = ffi.new("int32_t *")
        assert lib.moe_sft_cache_depth(self.h, d) == OK
        return d[0]

    def buffers(self):
        return [a.copy() for a in [self.out, self.gi, self.gw, *self.grads.values()]]

    def untouched(self):
        return all(np.array_equal(a, b) for a, b in zip(self.buffers(), self.snapshot))

    def results(self):
        """(output, grad_input, grad_routing_weights, LoRA grads) as the float arrays they hold."""
        return (self.out.view(R.bf16).copy(), self.gi.view(R.bf16).copy(), self.gw.copy(),
                {n: g.copy() for n, g in self.grads.items()})

    def close(self):
        lib.moe_sft_destroy(self.h)


def lora_shapes(rank):
    return dict(gate_a=(rank, H), gate_b=(I, rank), up_a=(rank, H), up_b=(I, rank), down_a=(rank, I),
                down_b=(H, rank)) if rank else {}


@pytest.fixture
def prob():
    p = R.make_problem(E, H, I, K, T, RANK, seed=120)
    p.ids[1, 1] = -1  # a slot without an expert
    return p


def inputs(p, n):
    """n distinct inputs for the layer, to tell saved forwards apart."""
    rng = np.random.default_rng(7)
    return [rng.standard_normal((T, H)).astype(R.bf16) for _ in range(n)]


def expected_backward(p, x):
    """grad_input, routing-weight grads and LoRA grads of a lone forward(save) + backward on x."""
    layer = Layer(p)
    assert layer.bind() == OK and layer.forward(x) == OK and layer.backward() == OK, message()
    res = layer.results()[1:]
    layer.close()
    return res


def same(a, b):
    ga, wa, la = a
    gb, wb, lb = b
    return (ga.tobytes() == gb.tobytes() and wa.tobytes() == wb.tobytes()
            and all(la[n].tobytes() == lb[n].tobytes() for n in la))


MAX_DEPTH = 3


@pytest.mark.parametrize("depth", range(MAX_DEPTH + 1))
def test_discard_at_every_depth(isa, prob, depth):
    """With `depth` forwards saved, discarding n (0..depth) drops the top n: the next backward consumes
    forward depth - n - 1, bit for bit as that forward alone gives."""
    xs = inputs(prob, depth)
    expected = [expected_backward(prob, x) for x in xs]
    for n in range(depth + 1):
        layer = Layer(prob, depth=MAX_DEPTH)
        assert layer.bind() == OK
        for x in xs:
            assert layer.forward(x) == OK, message()
        assert layer.discard(n) == OK, message()
        assert message() == ""
        assert layer.depth() == depth - n
        if depth - n > 0:
            assert layer.backward() == OK, message()
            assert same(layer.results()[1:], expected[depth - n - 1])
            assert layer.depth() == depth - n - 1
        else:
            expect(CACHE_EMPTY, layer.backward())
        layer.close()


def test_discard_rejects_out_of_range(isa, prob):
    xs = inputs(prob, 2)
    layer = Layer(prob, depth=MAX_DEPTH)
    assert layer.bind() == OK
    expect(INVALID, layer.discard(1), "moe_sft_discard_saved", "n = 1", "depth = 0")
    for x in xs:
        assert layer.forward(x) == OK
    layer.snapshot = layer.buffers()
    expect(INVALID, layer.discard(3), "n = 3", "depth = 2")
    expect(INVALID, layer.discard(-1), "n = -1", "depth = 2")
    expect(INVALID, lib.moe_sft_discard_saved(ffi.NULL, 0), "layer is NULL")
    assert layer.depth() == 2 and layer.untouched()
    assert layer.backward() == OK and same(layer.results()[1:], expected_backward(prob, xs[1]))
    layer.close()


def base_layer(p):
    return dataclasses.replace(p, lora={})


@pytest.mark.parametrize("check_finite", [0, 1])
def test_base_only_forward_and_backward(isa, prob, check_finite):
    """A rank > 0 layer without adapters runs the base layer: its forward and backward match the float64
    reference of the layer without adapters (and a rank-0 layer bit for bit); its LoRA grads are zeros, or
    left as they are when accumulating."""
    base = base_layer(prob)
    rank0 = Layer(prob, rank=0, check_finite=check_finite)
    assert rank0.forward() == OK and rank0.backward(grads=False) == OK, message()
    want = rank0.results()
    rank0.close()

    layer = Layer(prob, check_finite=check_finite)
    assert layer.forward() == OK, message()
    out, gi, gw, grads = layer.results()
    assert out.tobytes() == want[0].tobytes()
    assert R.rel_err(out, R.forward(base)) <= 1e-2
    assert layer.backward() == OK, message()
    out, gi, gw, grads = layer.results()
    ref = R.backward(base)
    assert R.rel_err(gi, ref["input"]) <= 1e-2 and R.rel_err(gw, ref["routing_weights"]) <= 1e-2
    assert gi.tobytes() == want[1].tobytes() and gw.tobytes() == want[2].tobytes()
    assert all(not g.any() for g in grads.values())
    assert layer.depth() == 0

    for g in layer.grads.values():
        g.fill(0.75)
    assert layer.forward() == OK and layer.backward(accumulate=1) == OK, message()
    assert all((g == 0.75).all() for g in layer.grads.values())
    assert layer.backward() == CACHE_EMPTY
    layer.close()


def test_base_only_forward_ignores_adapters_bound_later(isa, prob):
    """The saved record says the forward ran base-only: adapters bound before its backward are not used."""
    base_only = Layer(prob)
    assert base_only.forward() == OK and base_only.backward() == OK
    want = base_only.results()
    base_only.close()
    layer = Layer(prob)
    assert layer.forward() == OK and layer.bind() == OK and layer.backward() == OK, message()
    got = layer.results()
    assert same(got[1:], want[1:])
    layer.close()


def test_unbind_runs_base_only(isa, prob):
    """update_lora(NULL) unbinds: the next forward is the base layer's; binding again restores the adapters."""
    ref = Layer(prob)
    assert ref.forward(save=0) == OK
    base_out = ref.out.copy()
    assert ref.bind() == OK and ref.forward(save=0) == OK
    lora_out = ref.out.copy()
    ref.close()
    assert base_out.tobytes() != lora_out.tobytes()

    layer = Layer(prob)
    assert layer.bind() == OK and layer.unbind() == OK and message() == ""
    assert layer.forward(save=0) == OK and layer.out.tobytes() == base_out.tobytes()
    assert layer.bind() == OK and layer.forward(save=0) == OK and layer.out.tobytes() == lora_out.tobytes()
    assert layer.unbind() == OK and layer.unbind() == OK  # unbinding twice is fine
    layer.close()
    rank0 = Layer(prob, rank=0)
    assert rank0.unbind() == OK  # nothing to unbind
    expect(INVALID, rank0.bind(), "lora_rank = 0")
    rank0.close()


def test_unbind_between_forward_and_backward(isa, prob):
    """A forward that ran with adapters cannot be backpropagated once they are unbound: INVALID_ARGUMENT,
    nothing written, the saved forward kept; binding again (or discarding) gets out of it."""
    want = expected_backward(prob, prob.x)
    layer = Layer(prob)
    assert layer.bind() == OK and layer.forward() == OK
    layer.snapshot = layer.buffers()
    assert layer.unbind() == OK
    expect(INVALID, layer.backward(), "moe_sft_backward", "the adapters this forward ran with were unbound",
           "discard_saved")
    expect(INVALID, layer.backward(accumulate=1), "unbound")
    expect(INVALID, layer.backward(grads=False), "unbound")
    assert layer.untouched() and layer.depth() == 1
    assert layer.bind() == OK and layer.backward() == OK, message()
    assert same(layer.results()[1:], want)

    assert layer.forward() == OK and layer.unbind() == OK
    assert layer.discard(1) == OK and layer.depth() == 0
    layer.close()


def test_enum_names():
    assert ffi.string(lib.moe_sft_dtype_name(lib.MOE_SFT_DTYPE_BF16)) == b"bf16"
    assert ffi.string(lib.moe_sft_dtype_name(lib.MOE_SFT_DTYPE_F32)) == b"f32"
    assert lib.moe_sft_dtype_name(ffi.cast("moe_sft_dtype", 2)) == ffi.NULL
    assert ffi.string(lib.moe_sft_scoring_name(lib.MOE_SFT_SCORING_SOFTMAX)) == b"softmax"
    assert ffi.string(lib.moe_sft_scoring_name(lib.MOE_SFT_SCORING_SIGMOID)) == b"sigmoid"
    assert lib.moe_sft_scoring_name(ffi.cast("moe_sft_scoring", 7)) == ffi.NULL
    assert lib.moe_sft_version() >= 300  # the version these entry points arrived in (the exact one: test_python_api)
