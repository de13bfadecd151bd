"""Quantized base weights (DESIGN §5, moe_sft_weight_format in moe_sft.h): moe_sft.quantize byte for byte against
the numpy formats in reference.py; Kimi-K2 checkpoints in their packed layout; forward and backward against the
float64 reference on the dequantized weights for every format, kernel family and tp_count; every invalid
combination refused with a message naming the field, through Python and through the raw C ABI; the resident
size of quantized layers."""
import dataclasses
import subprocess
import sys
import types

import numpy as np
import pytest

import moe_sft
import reference as R
import abi
from abi import FORMAT_CODE, FORMATS, INVALID, NON_FINITE, OK, UNSUPPORTED
from conftest import CurrentBackend, assert_matches_reference, both_backends, bind_lora, make_layer, run_layer

B = CurrentBackend()
PROJECTIONS = ("gate", "up", "down")


def addr(a):
    return a.__array_interface__["data"][0]


def quantized_weights(p, weight_format, group_size):
    """QuantizedWeight of p's gate, up and down by reference.py's numpy formats."""
    return {n: moe_sft.QuantizedWeight(weight_format, group_size, *R.quantize(weight_format, getattr(p, n),
                                                                              group_size)) for n in PROJECTIONS}


def dequantized(p, quantized):
    """p with the base weights the quantized arrays encode: the problem the reference solves."""
    return dataclasses.replace(p, **{n: R.dequantize(q.weight_format, *q[2:]) for n, q in quantized.items()})


def from_quantized(p, quantized, **kwargs):
    layer = moe_sft.MoESFT.from_quantized(*(quantized[n] for n in PROJECTIONS), lora_rank=p.rank, lora_alpha=p.alpha,
                                          **kwargs)
    return bind_lora(layer, p)


# ---- the formats' names and layouts ----

@both_backends
def test_format_names():
    """The library's name of each weight format is its header enumerator's suffix in lower case, the word
    Python callers pass as weight_format=."""
    for enumerator, code in abi.enum("moe_sft_weight_format").items():
        assert B.weight_format_name(code) == enumerator[len("MOE_SFT_WEIGHT_"):].lower()
    assert set(FORMATS) == {"bf16", "int8", "int4_awq", "int4_k2", "fp8_e4m3_block", "mxfp4"}  # the words README and the API use
    assert B.weight_format_name(len(FORMATS)) is None and B.weight_format_name(-1) is None


def test_reference_layouts_by_hand():
    """reference.py's packing against the header's words, written out: AWQ's q[k] in the low nibble of byte k/2
    for even k; K2's q + 8 in bits 4 (k % 8) of int32 word k / 8 (compressed-tensors pack-quantized)."""
    awq = R.dequantize("int4_awq", np.array([[0x21, 0xF0]], np.uint8), np.array([[0.5]], np.float32),
                       np.array([[1]], np.uint8))
    assert np.array_equal(awq, [[0.0, 0.5, -0.5, 7.0]])
    k2_words = np.array([[0x87654321, 0x8FEDCBA9]], np.uint32).view(np.int32)
    bf16_one = np.array([[0x3F80]], np.uint16)
    w = np.array([list(range(-7, 8)) + [0]], np.float32)  # max |w| = 7: scale 1, q = w
    assert np.array_equal(R.dequantize("int4_k2", k2_words, bf16_one), w)
    packed, scale = R.quantize_k2(w.astype(R.bf16), 16)
    assert np.array_equal(packed, k2_words) and np.array_equal(scale, bf16_one)


# ---- moe_sft.quantize: the header's arithmetic, byte for byte ----

def awkward_weights(shape, group_size, seed):
    """bf16 [.., N, K] ~ N(0, 1/K) with an all-zero row, a row with a single nonzero, an all-zero group, ties of
    round half to even (an int8 row whose scale is 1, max 127, and an AWQ group whose scale is 1, range
    [-7.5, 7.5] with zero point rint(7.5) = 8, both holding +-0.5, 1.5, 2.5) and a row of subnormals (its
    scales subnormal too)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    rows = w.reshape(-1, shape[-1])
    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    rows[0] = 0
    rows[1] = 0
    rows[1, 3] = -0.75
    rows[2, :group_size] = 0
    rows[3, :8] = [127, -127] + ties
    rows[4, :group_size] = 0
    rows[4, :8] = [7.5, -7.5] + ties
    w = w.astype(R.bf16)
    magnitude = np.arange(shape[-1]) % 7 - 3  # subnormal bits -3 .. 3, the sign apart
    bits = np.abs(magnitude) | np.where(magnitude < 0, 0x8000, 0)
    w.reshape(-1, shape[-1])[5] = bits.astype(np.uint16).view(R.bf16)
    return w


# (format, group_size passed, shape): None = the format's default (int4_awq 128)
QUANTIZE_CASES = [("int8", None, (7, 64)), ("int8", 0, (3, 5, 40)), ("int4_awq", 16, (6, 64)),
                  ("int4_awq", 32, (2, 5, 96)), ("int4_awq", None, (6, 256))]


@pytest.mark.parametrize("weight_format, group_size, shape", QUANTIZE_CASES,
                         ids=[f"{f}-g{g}-{'x'.join(map(str, s))}" for f, g, s in QUANTIZE_CASES])
def test_quantize_matches_numpy_byte_for_byte(weight_format, group_size, shape):
    group = 0 if weight_format == "int8" else group_size or 128
    w = awkward_weights(shape, group or 8, seed=sum(shape))  # int8: a zero run of 8, as AWQ's zero group
    expected = R.quantize(weight_format, w, group)
    for given in (w, w.view(np.uint16), w.astype(np.float32)):  # bf16, its bits, floats rounded to bf16
        q = moe_sft.quantize(given, weight_format, group_size)
        assert (q.weight_format, q.group_size) == (weight_format, group)
        for field, got, want in zip(("weights", "scale", "zero"), q[2:], expected):
            if want is None:
                assert got is None, field
            else:
                assert got.dtype == want.dtype and got.shape == want.shape, (field, got.dtype, got.shape)
                assert np.array_equal(got, want), field
    # and what they encode is w to within half a step (the numpy format is the header's); subnormal scales are
    # coarser than that, but their whole rows are below the smallest normal float
    scale = R.f64(expected[1])
    step = scale[..., None] if weight_format == "int8" else np.repeat(scale, group, axis=-1)
    error = np.abs(R.dequantize(weight_format, *expected) - R.f64(w))
    assert np.all(error <= 0.5 * step * (1 + 1e-6) + np.finfo(np.float32).tiny)


@pytest.mark.parametrize("weight_format, group_size", [("int8", 0), ("int4_awq", 16), ("int4_k2", 16)])
def test_dequantize_is_what_the_arrays_encode(weight_format, group_size):
    w = (np.random.default_rng(3).standard_normal((2, 6, 64)) / 8).astype(R.bf16)
    weights, scale, zero = R.quantize(weight_format, w, group_size)
    q = moe_sft.QuantizedWeight(weight_format, group_size, weights, scale, zero)
    got = moe_sft.dequantize(q)
    assert got.dtype == np.float32 and got.shape == w.shape
    assert np.array_equal(got, R.dequantize(weight_format, weights, scale, zero).astype(np.float32))


@both_backends
def test_quantize_writes_nothing_on_error():
    """The raw moe_sft_quantize: every refusal names the argument, leaves the outputs as they were."""
    N, K = 6, 64
    w = awkward_weights((N, K), 16, seed=1)
    bad = w.copy()
    bad[2, 5] = np.nan
    weights, scale, zero = (np.full((N, K), 0x5A, np.uint8), np.full((N, K // 16), 3.25, np.float32),
                            np.full((N, K // 16), 7, np.uint8))
    snapshot = [a.copy() for a in (weights, scale, zero)]
    F = FORMAT_CODE
    cases = [  # (format, group_size, rows, w, zero, status, needles)
        (9, 0, N, w, 0, INVALID, ["weight_format = 9"]),
        (F["bf16"], 0, N, w, 0, INVALID, ["weight_format = bf16 is not a quantized format"]),
        (F["int4_k2"], 32, N, w, 0, UNSUPPORTED, ["int4_k2 cannot be made from bf16"]),
        (F["int4_awq"], 0, N, w, addr(zero), INVALID, ["group_size = 0"]),
        (F["int4_awq"], 48, N, w, addr(zero), INVALID, ["group_size = 48", "cols = 64"]),
        (F["int8"], 16, N, w, 0, INVALID, ["group_size = 16 must be 0 with int8"]),
        (F["int8"], 0, N, w, addr(zero), INVALID, ["zero is set, but int8 is symmetric"]),
        (F["int4_awq"], 16, N, w, 0, INVALID, ["zero is NULL"]),
        (F["int8"], 0, -1, w, 0, INVALID, ["rows = -1"]),
        (F["int4_awq"], 16, N, None, addr(zero), INVALID, ["w is NULL"]),
        (F["int4_awq"], 16, N, bad, addr(zero), NON_FINITE, ["w", "nan"]),
    ]
    for fmt, group, rows, source, zero_address, status, needles in cases:
        got = B.quantize(fmt, group, rows, K, 0 if source is None else addr(source), addr(weights), addr(scale),
                         zero_address)
        message = B.last_error()
        assert got == status, (fmt, group, B.status_string(got), message)
        assert all(n in message for n in needles), (needles, message)
        assert all(np.array_equal(a, b) for a, b in zip((weights, scale, zero), snapshot)), message


# ---- forward and backward on quantized weights vs the float64 reference on the dequantized weights ----

# (E, H, I, k, T, r, group_size). The second: with group 32, tp_count = 3 splits I = 160 into whole groups only
# (5 of them), so the parts are uneven and down_proj's groups must not straddle them. The third: every expert
# gets at most a few rows (the kernels' small-M path, codes decoded in registers).
SHAPES = [(4, 64, 96, 2, 12, 4, 16), (3, 96, 160, 2, 9, 4, 32), (6, 64, 96, 2, 3, 4, 32)]
VARIANTS = {  # name: (weight_format, prequantized)
    "int8": ("int8", False),
    "int4_awq": ("int4_awq", False),
    "int4_awq-prequantized": ("int4_awq", True),
    "int4_k2": ("int4_k2", True),
}


def quantized_layer(p, variant, group_size, **kwargs):
    """(the layer on p's weights stored as `variant`, the problem whose weights are what the layer stores)."""
    weight_format, prequantized = VARIANTS[variant]
    group_size = 0 if weight_format == "int8" else group_size
    quantized = quantized_weights(p, weight_format, group_size)
    if prequantized:
        layer = from_quantized(p, quantized, **kwargs)
    else:  # the layer quantizes p's bf16 weights itself, as the numpy formats do
        layer = make_layer(p, weight_format=weight_format, group_size=group_size, **kwargs)
    E, I, H = p.gate.shape
    assert (layer.weight_format, layer.group_size) == (weight_format, group_size)
    assert (layer.expert_num, layer.hidden_size, layer.intermediate_size) == (E, H, I)
    return layer, dequantized(p, quantized)


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-H{}-I{}-k{}-T{}-r{}-g{}".format(*s))
def test_matches_reference_on_dequantized_weights(isa, shape, variant, tp):
    E, H, I, k, T, r, group_size = shape
    p = R.make_problem(E, H, I, k, T, r, seed=H + I + tp)
    layer, ref = quantized_layer(p, variant, group_size, tp_count=tp)
    assert_matches_reference(ref, *run_layer(layer, ref), weight_format=layer.weight_format)


@pytest.mark.parametrize("tp", [1, 3])
@pytest.mark.parametrize("shape", [(3, 37, 29, 2, 9, 3), (2, 17, 131, 2, 2, 1)],
                         ids=lambda s: "E{}-H{}-I{}-k{}-T{}-r{}".format(*s))
def test_int8_odd_shapes(isa, shape, tp):
    """int8 has no groups: any H and I (odd, not multiples of the kernel blocks), few rows and many."""
    p = R.make_problem(*shape, seed=sum(shape) + tp)
    layer, ref = quantized_layer(p, "int8", 0, tp_count=tp)
    assert_matches_reference(ref, *run_layer(layer, ref), weight_format="int8")


# (H, I, group_size) for the few-rows d·W on quantized weights: contraction lengths that leave a partial panel
# (120, 72, 40, 56: not multiples of 16) with groups that straddle the 64-column tasks (24); the smallest
# group (8: eight groups in one task); a group wider than a task (128).
FEW_ROWS_SHAPES = [(120, 72, 24), (40, 56, 8), (256, 384, 128)]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("variant", ["int8", "int4_awq", "int4_k2"])
@pytest.mark.parametrize("shape", FEW_ROWS_SHAPES, ids=lambda s: "H{}-I{}-g{}".format(*s))
def test_one_expert_with_few_rows(isa, shape, variant, rows):
    """One expert with exactly `rows` rows: every row count of the few-rows kernels (and one past them)."""
    H, I, group_size = shape
    p = R.make_problem(1, H, I, 1, rows, 3, seed=rows + H)
    layer, ref = quantized_layer(p, variant, group_size)
    assert_matches_reference(ref, *run_layer(layer, ref), conditioned_routing=True,
                             weight_format=layer.weight_format)


@pytest.mark.parametrize("weight_format, group_size", [("int8", None), ("int4_awq", 16), ("fp8_e4m3_block", (32, 32)),
                                                        ("fp8_e4m3_block", None), ("mxfp4", None)])
def test_create_quantizes_as_quantize_does(weight_format, group_size):
    """From bf16 at create and from moe_sft.quantize's arrays: the same stored weights, the same results."""
    p = R.make_problem(3, 64, 96, 2, 10, 4, seed=31)
    at_create = run_layer(make_layer(p, weight_format=weight_format, group_size=group_size), p)
    given = {n: moe_sft.quantize(getattr(p, n), weight_format, group_size) for n in PROJECTIONS}
    prequantized = run_layer(from_quantized(p, given), p)
    assert np.array_equal(np.asarray(at_create[0], np.float32), np.asarray(prequantized[0], np.float32))
    for name in ("input", "routing_weights") + R.LORA_NAMES:
        assert np.array_equal(np.asarray(getattr(at_create[1], name), np.float32),
                              np.asarray(getattr(prequantized[1], name), np.float32)), name


def test_int8_of_bf16_values_matches_bf16(isa):
    """int8 weights q * 2^-7 (|q| <= 127) are bf16 values exactly: the int8 layer computes what the bf16 layer on
    those values does, up to f32 summation order."""
    p = R.make_problem(4, 64, 96, 2, 16, 4, seed=21)
    q = {n: np.clip(np.rint(R.f64(getattr(p, n)) * 128), -127, 127).astype(np.int8) for n in PROJECTIONS}
    exact = dataclasses.replace(p, **{n: (q[n] * 2.0 ** -7).astype(R.bf16) for n in PROJECTIONS})
    quantized = {n: moe_sft.QuantizedWeight("int8", 0, q[n], np.full(q[n].shape[:2], 2.0 ** -7, np.float32), None)
                 for n in PROJECTIONS}
    assert np.array_equal(dequantized(p, quantized).gate, R.f64(exact.gate))
    out, grads = run_layer(from_quantized(exact, quantized), exact)
    bf16_out, bf16_grads = run_layer(make_layer(exact), exact)
    assert R.rel_err(out, bf16_out) < 2e-3
    for name in ("input", "routing_weights") + R.LORA_NAMES:
        assert R.rel_err(getattr(grads, name), getattr(bf16_grads, name)) < 2e-3, name


def test_from_quantized_takes_any_object_with_the_fields_and_strided_arrays(isa):
    """A checkpoint loader's own record type works, and arrays that are views into bigger ones are copied."""
    p = R.make_problem(2, 64, 32, 2, 6, 2, seed=41)
    quantized = quantized_weights(p, "int4_k2", 32)
    records = {}
    for n, q in quantized.items():
        wide = np.zeros(q.scale.shape[:2] + (2 * q.scale.shape[2],), np.uint16)
        wide[..., ::2] = q.scale  # a strided view holding the same scales
        records[n] = types.SimpleNamespace(weight_format="int4_k2", group_size=32, weights=q.weights,
                                           scale=wide[..., ::2], zero=None)
    layer = from_quantized(p, records)
    assert_matches_reference(dequantized(p, quantized), *run_layer(layer, p), weight_format="int4_k2")


# ---- every invalid combination: an error naming the field, through the Python API ----

E_, H_, I_ = 2, 64, 96


@pytest.fixture(scope="module")
def small():
    """A small problem and its weights in each quantized format (AWQ and K2 with group 16)."""
    p = R.make_problem(E_, H_, I_, 2, 4, 2, seed=61)
    return p, {"int8": quantized_weights(p, "int8", 0), "int4_awq": quantized_weights(p, "int4_awq", 16),
               "int4_k2": quantized_weights(p, "int4_k2", 16)}


def expect_error(call, status, needles):
    with pytest.raises(moe_sft.MoESFTError) as err:
        call()
    assert err.value.status == abi.status_name(status), str(err.value)
    assert isinstance(err.value, moe_sft.InvalidArgumentError) == (status == INVALID)
    for needle in needles:
        assert needle in str(err.value)


# MoESFT(gate_proj, up_proj, down_proj, **kwargs) on bf16 weights [E, I, H] = [2, 96, 64]
FROM_BF16_CASES = {
    "unknown format name": (dict(weight_format="int5"), INVALID, ["weight_format = 'int5'", "'int4_awq'"]),
    "default group does not divide H": (dict(weight_format="int4_awq"), INVALID,
                                        ["group_size = 128 (int4_awq's default) does not divide hidden_size = 64"]),
    "group_size for int8": (dict(weight_format="int8", group_size=32), INVALID,
                            ["group_size = 32, but int8 has no groups"]),
    "group_size for bf16": (dict(group_size=16), INVALID, ["group_size = 16, but bf16 has no groups"]),
    "group_size 0 for int4_awq": (dict(weight_format="int4_awq", group_size=0), INVALID,
                                  ["group_size = 0; int4_awq needs a positive group size"]),
    "group_size not an integer": (dict(weight_format="int4_awq", group_size=16.0), INVALID,
                                  ["group_size = 16.0 is not an integer"]),
    "group_size does not divide I": (dict(weight_format="int4_awq", group_size=64), INVALID,
                                     ["group_size = 64 does not divide intermediate_size = 96"]),
    "int4_k2 from bf16": (dict(weight_format="int4_k2", group_size=16), INVALID,
                          ["cfg->prequantized = 0 with weight_format int4_k2"]),
    "tp_count across groups": (dict(weight_format="int4_awq", group_size=32, tp_count=4), INVALID,
                               ["cfg->tp_count = 4 cannot split cfg->intermediate_size = 96", "at most 3 parts"]),
}


@pytest.mark.parametrize("case", FROM_BF16_CASES)
def test_create_from_bf16_rejects(small, case):
    kwargs, status, needles = FROM_BF16_CASES[case]
    p, _ = small
    expect_error(lambda: moe_sft.MoESFT(p.gate, p.up, p.down, **kwargs), status, needles)


def _with_value(a, index, value):
    a = a.copy()
    a[index] = value
    return a


# MoESFT.from_quantized of one format's three QuantizedWeight, one projection's fields replaced by fields(it)
FROM_QUANTIZED_CASES = {
    "unknown format": ("int8", "gate", lambda w: dict(weight_format="int3"), ["gate_proj.weight_format", "'int3'"]),
    "bf16 is not quantized": ("int8", "gate", lambda w: dict(weight_format="bf16"),
                              ["gate_proj.weight_format = 'bf16' is not a quantized format"]),
    "formats differ": ("int4_awq", "up", lambda w: dict(weight_format="int8"),
                       ["up_proj.weight_format = 'int8' but gate_proj.weight_format = 'int4_awq'"]),
    "group sizes differ": ("int4_awq", "down", lambda w: dict(group_size=32),
                           ["down_proj.group_size = 32 but gate_proj.group_size = 16"]),
    "missing scale": ("int8", "gate", lambda w: dict(scale=None),
                      ["gate_proj.scale is None; expected float32 of shape (2, 96)"]),
    "missing AWQ zero": ("int4_awq", "up", lambda w: dict(zero=None),
                         ["up_proj.zero is None; expected uint8 of shape (2, 96, 4)"]),
    "zero for int8": ("int8", "down", lambda w: dict(zero=np.zeros((E_, H_, 6), np.uint8)),
                      ["down_proj.zero must be None: int8 is symmetric"]),
    "zero for int4_k2": ("int4_k2", "gate", lambda w: dict(zero=np.zeros(w.scale.shape, np.uint8)),
                         ["gate_proj.zero must be None: int4_k2 is symmetric"]),
    "int8 scale float64": ("int8", "gate", lambda w: dict(scale=w.scale.astype(np.float64)),
                           ["gate_proj.scale has dtype float64; expected float32"]),
    "K2 scale float32": ("int4_k2", "up", lambda w: dict(scale=w.scale.astype(np.float32)),
                         ["up_proj.scale has dtype float32; expected bfloat16 or uint16 (bf16 bits)"]),
    "AWQ weights int8": ("int4_awq", "gate", lambda w: dict(weights=w.weights.view(np.int8)),
                         ["gate_proj.weights has dtype int8; expected uint8"]),
    "weights shape": ("int4_awq", "down", lambda w: dict(weights=w.weights[:, :, :-1]),
                      ["down_proj.weights has shape (2, 64, 47); expected (2, 64, 48)"]),
    "scale shape": ("int8", "up", lambda w: dict(scale=w.scale[:, :-1]),
                    ["up_proj.scale has shape (2, 95); expected (2, 96)"]),
    "gate weights 2-D": ("int4_awq", "gate", lambda w: dict(weights=w.weights[0]),
                         ["gate_proj.weights has shape (96, 32); expected 3-D [experts, intermediate, hidden / 2]"]),
    "K odd for int4_awq": ("int4_awq", "gate", lambda w: dict(weights=w.weights[:, :95]),
                           ["intermediate_size = 95: int4_awq packs 2 values per word"]),
    "AWQ zero point 16": ("int4_awq", "up", lambda w: dict(zero=_with_value(w.zero, (1, 2, 3), 16)),
                          ["cfg->up_zero[1, 2, 3] = 16 is not a 4-bit zero point"]),  # the library's check
}


@pytest.mark.parametrize("case", FROM_QUANTIZED_CASES)
def test_from_quantized_rejects(small, case):
    weight_format, projection, fields, needles = FROM_QUANTIZED_CASES[case]
    _, q = small
    given = [w._replace(**fields(w)) if n == projection else w for n, w in q[weight_format].items()]
    expect_error(lambda: moe_sft.MoESFT.from_quantized(*given), INVALID, needles)


def test_from_quantized_rejects_shapes_and_splits(small):
    p, q = small
    expect_error(lambda: moe_sft.MoESFT.from_quantized(p.gate, p.up, p.down), INVALID,
                 ["gate_proj must be a moe_sft.QuantizedWeight", "got ndarray"])
    expect_error(lambda: moe_sft.MoESFT.from_quantized(*q["int4_k2"].values(), tp_count=7), INVALID,
                 ["cfg->tp_count = 7 cannot split"])
    # I = 12 with group 4: whole groups, but not whole int32 words of 8 values
    k2 = moe_sft.QuantizedWeight("int4_k2", 4, np.zeros((E_, 12, H_ // 8), np.int32),
                                 np.zeros((E_, 12, H_ // 4), np.uint16), None)
    expect_error(lambda: moe_sft.MoESFT.from_quantized(k2, k2, k2), INVALID,
                 ["intermediate_size = 12: int4_k2 packs 8 values per word"])


# moe_sft.quantize(w(p), weight_format, group_size)
QUANTIZE_ERROR_CASES = {
    "int4_k2": (lambda p: p.gate, "int4_k2", None, UNSUPPORTED, ["int4_k2 cannot be made from bf16"]),
    "bf16": (lambda p: p.gate, "bf16", None, INVALID, ["weight_format = bf16 is not a quantized format"]),
    "unknown format": (lambda p: p.gate, "fp8", None, INVALID, ["weight_format = 'fp8'"]),
    "1-D": (lambda p: p.gate[0, 0], "int8", None, INVALID, ["w has shape (64,); expected [N, K] or [experts, N, K]"]),
    "group does not divide K": (lambda p: p.down, "int4_awq", 64, INVALID,
                                ["group_size = 64 does not divide K (w.shape[-1]) = 96"]),
    "NaN": (lambda p: _with_value(p.gate, (1, 2, 3), np.nan), "int8", None, NON_FINITE, ["w", "nan"]),
}


@pytest.mark.parametrize("case", QUANTIZE_ERROR_CASES)
def test_quantize_rejects(small, case):
    w, weight_format, group_size, status, needles = QUANTIZE_ERROR_CASES[case]
    p, _ = small
    expect_error(lambda: moe_sft.quantize(w(p), weight_format, group_size), status, needles)


# ---- the same refusals from the C library itself, through the raw backend (no Python checks in the way) ----

class RawConfig:
    """The pointer-level create of a valid config in one format, with zero-filled arrays of exactly the sizes
    the format needs (scales 1, AWQ zero points 8); create(**changes) overrides fields to break one at a time."""

    def __init__(self, weight_format, prequantized, E=E_, H=H_, I=I_, group_size=16):
        grouped = weight_format in ("int4_awq", "int4_k2")
        self.fields = dict(E=E, H=H, I=I, tp=1, weight_format=FORMAT_CODE[weight_format],
                           group_size=group_size if grouped else 0, prequantized=int(prequantized))
        self.arrays = {}
        for n, (N, K) in zip(PROJECTIONS, ((I, H), (I, H), (H, I))):
            if not prequantized:
                self.arrays[n] = np.zeros((E, N, K), np.uint16)
                continue
            per_word, dtype = {"int8": (1, np.int8), "int4_awq": (2, np.uint8), "int4_k2": (8, np.int32)}[weight_format]
            scales = (E, N, K // group_size) if grouped else (E, N)
            self.arrays[n] = np.zeros((E, N, K // per_word), dtype)
            self.arrays[f"{n}_scale"] = (np.full(scales, 0x3F80, np.uint16) if weight_format == "int4_k2"
                                         else np.ones(scales, np.float32))
            if weight_format == "int4_awq":
                self.arrays[f"{n}_zero"] = np.full(scales, 8, np.uint8)

    def address(self, name):
        return addr(self.arrays[name]) if name in self.arrays else 0

    def create(self, **changes):
        """(status, handle) of moe_sft_create; a created layer is destroyed at once."""
        f = {**self.fields, **{n: self.address(n) for n in ("gate", "up", "down")},
             **{f"{n}_{part}": self.address(f"{n}_{part}") for n in PROJECTIONS for part in ("scale", "zero")},
             **changes}
        status, handle = B.create(f["E"], f["H"], f["I"], 2, 4.0, 1, 0, f["tp"], f["gate"], f["up"], f["down"], -1,
                                  f["weight_format"], f["group_size"], f["prequantized"], f["gate_scale"],
                                  f["up_scale"], f["down_scale"], f["gate_zero"], f["up_zero"], f["down_zero"])
        if handle:
            B.destroy(handle)
        return status, handle


RAW_VALID = [("bf16", False), ("int8", False), ("int8", True), ("int4_awq", False), ("int4_awq", True),
             ("int4_k2", True)]


@both_backends
@pytest.mark.parametrize("weight_format, prequantized", RAW_VALID)
def test_raw_valid_configs_create(weight_format, prequantized):
    status, handle = RawConfig(weight_format, prequantized).create()
    assert status == OK and handle, B.last_error()


SOME_ADDRESS = addr(np.zeros(16, np.float32))  # a valid, aligned pointer where the field must stay NULL
# name: (format, prequantized, RawConfig arguments, changes, needles); every one is MOE_SFT_ERR_INVALID_ARGUMENT
RAW_CASES = {
    "unknown weight_format": ("int8", True, {}, dict(weight_format=7), ["cfg->weight_format = 7"]),
    "negative weight_format": ("int8", True, {}, dict(weight_format=-1), ["cfg->weight_format = -1"]),
    "prequantized = 2": ("int8", True, {}, dict(prequantized=2), ["cfg->prequantized = 2"]),
    "bf16 prequantized": ("bf16", False, {}, dict(prequantized=1), ["cfg->prequantized = 1 with weight_format bf16"]),
    "int4_k2 from bf16": ("int4_k2", True, {}, dict(prequantized=0, gate_scale=0, up_scale=0, down_scale=0),
                          ["cfg->prequantized = 0 with weight_format int4_k2"]),
    "int8 missing scale": ("int8", True, {}, dict(gate_scale=0), ["cfg->gate_scale is NULL"]),
    "int4_awq missing scale": ("int4_awq", True, {}, dict(up_scale=0), ["cfg->up_scale is NULL"]),
    "int4_k2 missing scale": ("int4_k2", True, {}, dict(down_scale=0), ["cfg->down_scale is NULL"]),
    "int4_awq missing zero": ("int4_awq", True, {}, dict(up_zero=0), ["cfg->up_zero is NULL"]),
    "missing weights": ("int4_awq", True, {}, dict(down=0), ["cfg->down_proj is NULL"]),
    "scale from bf16": ("int8", False, {}, dict(gate_scale=SOME_ADDRESS),
                        ["cfg->gate_scale is set, but cfg->prequantized = 0"]),
    "zero from bf16": ("int4_awq", False, {}, dict(down_zero=SOME_ADDRESS),
                       ["cfg->down_zero is set, but cfg->prequantized = 0"]),
    "scale for bf16": ("bf16", False, {}, dict(up_scale=SOME_ADDRESS), ["cfg->up_scale is set"]),
    "zero for int8": ("int8", True, {}, dict(up_zero=SOME_ADDRESS), ["cfg->up_zero is set", "int8 is symmetric"]),
    "zero for int4_k2": ("int4_k2", True, {}, dict(gate_zero=SOME_ADDRESS),
                         ["cfg->gate_zero is set", "int4_k2 is symmetric"]),
    "int4_awq group 0": ("int4_awq", True, {}, dict(group_size=0), ["cfg->group_size = 0"]),
    "int4_awq negative group": ("int4_awq", False, {}, dict(group_size=-16), ["cfg->group_size = -16"]),
    "int4_k2 group 0": ("int4_k2", True, {}, dict(group_size=0), ["cfg->group_size = 0"]),
    "int8 group": ("int8", True, {}, dict(group_size=16), ["cfg->group_size = 16 must be 0 with weight_format int8"]),
    "bf16 group": ("bf16", False, {}, dict(group_size=16), ["cfg->group_size = 16 must be 0 with weight_format bf16"]),
    "group does not divide H": ("int4_awq", False, {}, dict(group_size=48),
                                ["cfg->group_size = 48 does not divide cfg->hidden_size = 64"]),
    "group does not divide I": ("int4_k2", True, {}, dict(group_size=64),
                                ["cfg->group_size = 64 does not divide cfg->intermediate_size = 96"]),
    "int4_awq K odd": ("int4_awq", False, dict(I=95), {}, ["cfg->group_size = 16", "cfg->intermediate_size = 95"]),
    "int4_k2 K not a multiple of 8": ("int4_k2", True, dict(I=12, group_size=4), {},
                                      ["cfg->intermediate_size = 12 is not a multiple of 8"]),
    "tp_count across AWQ groups": ("int4_awq", True, dict(group_size=32), dict(tp=4),
                                   ["cfg->tp_count = 4 cannot split cfg->intermediate_size = 96", "at most 3 parts"]),
    "tp_count across K2 groups": ("int4_k2", True, dict(group_size=32), dict(tp=4), ["cfg->tp_count = 4"]),
    "misaligned K2 words": ("int4_k2", True, {}, dict(gate=None), ["cfg->gate_proj", "not aligned"]),
    "misaligned int8 scale": ("int8", True, {}, dict(up_scale=None), ["cfg->up_scale", "not aligned"]),
}


@both_backends
@pytest.mark.parametrize("case", RAW_CASES)
def test_raw_create_rejects(case):
    weight_format, prequantized, arguments, changes, needles = RAW_CASES[case]
    cfg = RawConfig(weight_format, prequantized, **arguments)
    # None: the field's own array, one byte off its alignment
    changes = {k: cfg.address(k) + 1 if v is None else v for k, v in changes.items()}
    status, handle = cfg.create(**changes)
    message = B.last_error()
    assert status == INVALID and handle == 0, (B.status_string(status), message)
    assert "moe_sft_create" in message
    for needle in needles:
        assert needle in message


@both_backends
def test_raw_awq_zero_point_above_15():
    cfg = RawConfig("int4_awq", True)
    cfg.arrays["down_zero"][1, 40, 2] = 200
    status, handle = cfg.create()
    assert status == INVALID and handle == 0
    assert "cfg->down_zero[1, 40, 2] = 200 is not a 4-bit zero point" in B.last_error()


# ---- memory: no bf16 copy of a quantized weight is kept ----

_RESIDENT_PROGRAM = """
import ctypes
import sys
import numpy as np
import moe_sft
from moe_sft.bench import rss_bytes

# No transparent huge pages in this process: one would round each packed slice up by as much as 2 MiB, noise
# beside these weights, nothing beside a model's. PR_SET_THP_DISABLE = 41.
if ctypes.CDLL(None).prctl(41, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_THP_DISABLE) failed")
weight_format, E, H, I, group_size = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
shapes = [(E, I, H), (E, I, H), (E, H, I)]
# inputs made in place (no large temporaries whose freed pages the layer could reuse unseen), resident before
# the measurement: bf16 bits of values in [2^-7, 0.5), or K2's words and bf16 scales of 1.0
if weight_format == "int4_k2":
    weights = [moe_sft.QuantizedWeight("int4_k2", group_size, rng.integers(-2**31, 2**31, (e, n, k // 8), np.int32),
                                       np.full((e, n, k // group_size), 0x3F80, np.uint16), None) for e, n, k in shapes]
else:
    weights = [rng.integers(0x3C00, 0x3F00, s, np.uint16) for s in shapes]
small = np.zeros((1, 64, 64), np.uint16)
moe_sft.MoESFT(small, small, small, lora_rank=0).close()  # the runtime (thread pool) exists before measuring
before = rss_bytes()
if weight_format == "int4_k2":
    layer = moe_sft.MoESFT.from_quantized(*weights, lora_rank=0)
else:
    layer = moe_sft.MoESFT(*weights, lora_rank=0, weight_format=weight_format, group_size=group_size or None)
print(rss_bytes() - before)
"""


RESIDENT_CASES = {  # weight_format: (group_size, low, high) of the growth / bf16 bytes
    "bf16": (0, 0.95, 1.05),  # the measurement sees the packed copy of the weights, and little else
    "int8": (0, 0.0, 0.55),
    "int4_awq": (128, 0.0, 0.30),
    "int4_k2": (32, 0.0, 0.30),
    "fp8_e4m3_block": (0, 0.0, 0.52),  # the targets: 1 byte + an f32 scale per row and 128 columns
    "mxfp4": (32, 0.0, 0.28),  # half a byte + an e8m0 byte per 32
}
RESIDENT_SHAPE = (32, 512, 512)  # E, H, I


@pytest.fixture(scope="module")
def resident_runs():
    """One fresh process per format (freed memory of earlier layers would hide growth), all started at once."""
    E, H, I = RESIDENT_SHAPE
    runs = {f: subprocess.Popen([sys.executable, "-c", _RESIDENT_PROGRAM, f, str(E), str(H), str(I), str(group)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for f, (group, _, _) in RESIDENT_CASES.items()}
    return {f: (run.communicate(), run.returncode) for f, run in runs.items()}


@pytest.mark.parametrize("weight_format", RESIDENT_CASES)
def test_resident_size_after_create(resident_runs, weight_format):
    """Resident-size growth of create against the bf16 bytes of the weights."""
    E, H, I = RESIDENT_SHAPE
    _, low, high = RESIDENT_CASES[weight_format]
    (stdout, stderr), returncode = resident_runs[weight_format]
    assert returncode == 0, stderr
    ratio = int(stdout) / (3 * E * H * I * 2)
    assert low <= ratio <= high, f"{weight_format}: resident growth {ratio:.3f} x the bf16 weight bytes"
