"""Bad input: the right status, a message naming the culprit (argument, index, value), and every output
buffer byte-for-byte untouched, the forward cache as before. Driven through the pointer-level backend so
that NULLs, misaligned addresses and bad enum values reach the C ABI as a C caller could send them."""
import numpy as np
import pytest

import moe_sft
import reference as R
import abi
from abi import CACHE_EMPTY, CACHE_FULL, FORMAT_CODE, INVALID, OK
from conftest import CurrentBackend, both_backends

pytestmark = both_backends  # the raw ABI through each backend: the same statuses and messages

B = CurrentBackend()

E, H, I, K, T, RANK = 4, 32, 24, 2, 6, 4
# create's quantization fields: weight_format bf16, group_size 0, not prequantized, no scale/zero
BF16 = (FORMAT_CODE["bf16"],) + (0,) * 8


def addr(a):
    return a.__array_interface__["data"][0]


@pytest.fixture
def prob():
    return R.make_problem(E, H, I, K, T, RANK, seed=90)


class Layer:
    """A raw handle with LoRA bound, and sentinel-filled output buffers."""

    def __init__(self, p, rank=RANK, depth=1, bind=True):
        self.p = p
        status, self.h = B.create(E, H, I, rank, p.alpha, depth, 0, 1, addr(p.gate), addr(p.up), addr(p.down), -1,
                                  *BF16)
        assert status == OK, B.last_error()
        if bind and rank:
            assert B.update_lora(self.h, 1, *(addr(p.lora[n]) for n in R.LORA_NAMES)) == OK
        self.out = np.full((T, H), 0x7bcd, np.uint16)
        self.gi = np.full((T, H), 0x1234, np.uint16)
        self.gw = np.full((T, K), 3.25, np.float32)
        self.grads = {n: np.full(p.lora[n].shape, -1.5, np.float32) for n in R.LORA_NAMES}
        self.snapshot = self.buffers()

    def buffers(self):
        return [a.copy() for a in [self.out, self.gi, self.gw, *self.grads.values()]]

    def untouched(self):
        return all(np.array_equal(a, b) for a, b in zip(self.buffers(), self.snapshot))

    def depth(self):
        return B.cache_depth(self.h)[1]

    def forward(self, ids=None, weights=None, x=None, out=None, qlen=T, top_k=K, save=1):
        p = self.p
        ids = p.ids if ids is None else ids
        return B.forward(self.h, qlen, top_k, addr(ids) if isinstance(ids, np.ndarray) else ids,
                         addr(p.weights) if weights is None else weights, addr(p.x) if x is None else x,
                         addr(self.out) if out is None else out, save)

    def backward(self, go=None, gi=None, gw=None, grads=None, accumulate=0):
        grads = [addr(self.grads[n]) for n in R.LORA_NAMES] if grads is None else grads
        return B.backward(self.h, addr(self.p.grad_out) if go is None else go, addr(self.gi) if gi is None else gi,
                          addr(self.gw) if gw is None else gw, *grads, accumulate)

    def close(self):
        B.destroy(self.h)


def expect(status, got, *needles):
    msg = B.last_error()
    assert got == status, f"status {B.status_string(got)}, expected {B.status_string(status)}: {msg}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message {msg!r}"


CREATE_CASES = {
    "zero experts": (dict(E=0), ["cfg->expert_num = 0"]),
    "negative hidden": (dict(H=-3), ["cfg->hidden_size = -3"]),
    "zero intermediate": (dict(I=0), ["cfg->intermediate_size = 0"]),
    "negative rank": (dict(r=-1), ["cfg->lora_rank = -1"]),
    "tp_count zero": (dict(tp=0), ["cfg->tp_count = 0"]),
    "tp_count above I": (dict(tp=I + 1), ["cfg->tp_count = 25", "[1, 24]"]),
    "negative threads": (dict(threads=-2), ["cfg->num_threads = -2"]),
    "negative cache depth": (dict(depth=-1), ["cfg->max_cache_depth = -1"]),
    "nan alpha": (dict(alpha=float("nan")), ["cfg->lora_alpha", "not finite"]),
    "null gate_proj": (dict(gate=0), ["cfg->gate_proj is NULL"]),
    "misaligned down_proj": (dict(down_offset=1), ["cfg->down_proj", "not aligned"]),
}


@pytest.mark.parametrize("case", CREATE_CASES, ids=list(CREATE_CASES))
def test_create_rejects(prob, case):
    kw, needles = CREATE_CASES[case]
    args = dict(E=E, H=H, I=I, r=RANK, alpha=prob.alpha, depth=1, threads=0, tp=1, gate=addr(prob.gate),
                up=addr(prob.up), down=addr(prob.down))
    args.update(kw)
    down_offset = args.pop("down_offset", 0)  # not kw.pop: CREATE_CASES is shared by every run of the case
    status, handle = B.create(args["E"], args["H"], args["I"], args["r"], args["alpha"], args["depth"],
                              args["threads"], args["tp"], args["gate"], args["up"], args["down"] + down_offset, -1,
                              *BF16)
    expect(INVALID, status, "moe_sft_create", *needles)
    assert handle == 0


def test_update_lora_rejects(prob):
    layer = Layer(prob, bind=False)
    ptrs = [addr(prob.lora[n]) for n in R.LORA_NAMES]
    expect(INVALID, B.update_lora(layer.h, 7, *ptrs), "lora->dtype = 7")
    expect(INVALID, B.update_lora(layer.h, 1, *ptrs[:3], 0, *ptrs[4:]), "lora->up_b is NULL")
    expect(INVALID, B.update_lora(layer.h, 1, ptrs[0] + 2, *ptrs[1:]), "lora->gate_a", "not aligned")
    assert layer.untouched() and layer.depth() == 0
    # none of the above bound anything: the layer runs base-only, so its LoRA grads are zeros
    assert layer.forward() == OK and layer.backward() == OK
    assert all(not g.any() for g in layer.grads.values()) and layer.depth() == 0
    layer.close()
    rank0 = Layer(prob, rank=0)
    expect(INVALID, B.update_lora(rank0.h, 1, *ptrs), "lora_rank = 0")
    rank0.close()


FORWARD_CASES = {
    "id equal to E": (lambda ids: ids.__setitem__((3, 1), E), ["expert_ids[3, 1] = 4", "[-1, 4)"]),
    "id below -1": (lambda ids: ids.__setitem__((0, 0), -2), ["expert_ids[0, 0] = -2"]),
    "huge id": (lambda ids: ids.__setitem__((5, 0), 1 << 40), ["expert_ids[5, 0] = 1099511627776"]),
}


@pytest.mark.parametrize("case", FORWARD_CASES, ids=list(FORWARD_CASES))
def test_forward_rejects_bad_ids(prob, case):
    mutate, needles = FORWARD_CASES[case]
    layer = Layer(prob)
    ids = prob.ids.copy()
    mutate(ids)
    expect(INVALID, layer.forward(ids=ids), "moe_sft_forward", *needles)
    assert layer.untouched() and layer.depth() == 0
    layer.close()


def test_forward_rejects_bad_arguments(prob):
    layer = Layer(prob)
    expect(INVALID, layer.forward(top_k=0), "top_k = 0")
    expect(INVALID, layer.forward(qlen=-1), "qlen = -1")
    expect(INVALID, layer.forward(x=0), "input is NULL")
    expect(INVALID, layer.forward(out=0), "output is NULL")
    expect(INVALID, layer.forward(ids=0), "expert_ids is NULL")
    expect(INVALID, layer.forward(weights=addr(prob.weights) + 1), "routing_weights", "not aligned")
    expect(INVALID, layer.forward(ids=addr(prob.ids) + 4), "expert_ids", "not aligned")
    expect(INVALID, B.forward(0, T, K, addr(prob.ids), addr(prob.weights), addr(prob.x), addr(layer.out), 1),
           "layer is NULL")
    assert layer.untouched() and layer.depth() == 0
    layer.close()


def test_forward_cache_full_writes_nothing(prob):
    layer = Layer(prob)
    assert layer.forward(out=addr(np.empty((T, H), np.uint16))) == OK
    expect(CACHE_FULL, layer.forward(), "max_cache_depth = 1")
    assert layer.untouched() and layer.depth() == 1
    layer.close()


def test_backward_rejects_bad_arguments(prob):
    layer = Layer(prob)
    expect(CACHE_EMPTY, layer.backward(), "no saved forward")
    assert layer.forward(out=addr(np.empty((T, H), np.uint16))) == OK
    ptrs = [addr(layer.grads[n]) for n in R.LORA_NAMES]
    expect(INVALID, layer.backward(gi=0), "grad_input is NULL")
    expect(INVALID, layer.backward(go=0), "grad_output is NULL")
    expect(INVALID, layer.backward(grads=ptrs[:5] + [0]), "grads->down_b is NULL")
    expect(INVALID, layer.backward(grads=[ptrs[0] + 2] + ptrs[1:]), "grads->gate_a", "not aligned")
    expect(INVALID, layer.backward(gw=addr(layer.gw) + 1), "grad_routing_weights", "not aligned")
    expect(INVALID, B.backward(0, *([0] * 9), 0), "layer is NULL")
    assert layer.untouched() and layer.depth() == 1  # the saved forward is still there
    assert layer.backward() == OK and layer.depth() == 0
    layer.close()


def test_forced_isa(monkeypatch, prob):
    monkeypatch.setenv("MOE_SFT_ISA", "vax")
    status, handle = B.create(E, H, I, RANK, 8.0, 1, 0, 1, addr(prob.gate), addr(prob.up), addr(prob.down), -1,
                              *BF16)
    expect(INVALID, status, "MOE_SFT_ISA=vax is not a kernel family", "generic")
    assert handle == 0


def test_status_strings_and_version():
    for name, code in abi.STATUS.items():  # the header's enumerator names
        assert B.status_string(code) == name
    assert B.status_string(max(abi.STATUS.values()) + 1) == "unknown status"
    assert moe_sft.library_version() == tuple(map(int, moe_sft.__version__.split(".")))
    B.destroy(0)  # NULL is fine


# ---- the numpy API: its own checks raise InvalidArgumentError (a ValueError) before any call ----

def test_python_api_rejects(prob):
    layer = moe_sft.MoESFT(prob.gate, prob.up, prob.down, lora_rank=RANK, lora_alpha=prob.alpha)
    lora = [prob.lora[n] for n in R.LORA_NAMES]
    cases = [
        (lambda: moe_sft.MoESFT(prob.gate, prob.up, prob.gate), "down_proj has shape (4, 24, 32); expected (4, 32, 24)"),
        (lambda: moe_sft.MoESFT(prob.gate[0], prob.up, prob.down), "gate_proj has shape (24, 32)"),
        (lambda: layer.update_lora(*lora[:5], lora[5].astype(np.float64)), "down_b has dtype float64"),
        (lambda: layer.update_lora(lora[0].astype(R.bf16), *lora[1:]), "all six must share one dtype"),
        (lambda: layer.update_lora(*lora[:2], np.asfortranarray(lora[2]), *lora[3:]), "up_a must be C-contiguous"),
        (lambda: layer.update_lora(*lora[:3], lora[3][:, :-1], *lora[4:]), "up_b has shape"),
        (lambda: layer.update_lora(*lora[:4], lora[4].tolist(), lora[5]), "down_a must be a numpy array"),
        (lambda: layer.forward(prob.x[:, :-1], prob.ids, prob.weights), "x has shape (6, 31)"),
        (lambda: layer.forward(prob.x, prob.ids.astype(np.float32), prob.weights), "expert_ids has dtype float32"),
        (lambda: layer.forward(prob.x, prob.ids, prob.weights[:, :1]), "routing_weights has shape (6, 1)"),
        (lambda: layer.forward(prob.x, prob.ids[:3], prob.weights), "expert_ids has shape (3, 2)"),
    ]
    for call, needle in cases:
        with pytest.raises(moe_sft.InvalidArgumentError) as err:
            call()
        assert needle in str(err.value)
        assert isinstance(err.value, ValueError)
    layer.update_lora(*lora)
    bad_ids = prob.ids.copy()
    bad_ids[2, 0] = 9
    with pytest.raises(ValueError, match=r"expert_ids\[2, 0\] = 9"):
        layer.forward(prob.x, bad_ids, prob.weights, save_for_backward=True)
    assert layer.cache_depth == 0
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    out = layer.backward(prob.grad_out)
    snapshot = {n: getattr(out, n).copy() for n in R.LORA_NAMES}
    layer.forward(prob.x, prob.ids, prob.weights, save_for_backward=True)
    with pytest.raises(ValueError, match="grad_output has shape"):
        layer.backward(prob.grad_out[:2], out=out, accumulate=True)
    out.gate_b = out.gate_b[:, :, :1]
    with pytest.raises(ValueError, match="out.gate_b has shape"):
        layer.backward(prob.grad_out, out=out, accumulate=True)
    assert all(np.array_equal(getattr(out, n), snapshot[n]) for n in R.LORA_NAMES if n != "gate_b")
    assert layer.cache_depth == 1
    layer.close()
    with pytest.raises(ValueError, match="closed"):
        layer.forward(prob.x, prob.ids, prob.weights)
