"""The block-scaled base-weight formats (moe_sft_weight_format in moe_sft.h): fp8_e4m3_block (DeepSeek-V3/R1,
Qwen3-FP8) and mxfp4 (gpt-oss). Decoding of every e4m3 code, every e2m1 nibble and the e8m0 extremes against
numpy decoders written from the definitions (and against Transformers' own FP8 and MXFP4 dequantization);
moe_sft.quantize byte for byte against numpy; forward and backward against the float64 reference on the
dequantized weights for every kernel family and tp_count, partial edge blocks included; check_finite naming
the expert, row and column of a NaN code or a bad scale; every invalid configuration refused naming the
field, with nothing written."""
import dataclasses

import ml_dtypes
import numpy as np
import pytest

import moe_sft
import reference as R
from abi import DTYPE_BF16, DTYPE_F32, FORMAT_CODE, INVALID, OK
from conftest import CurrentBackend, assert_matches_reference, bind_lora, both_backends, make_layer, run_layer

B = CurrentBackend()
PROJECTIONS = ("gate", "up", "down")
FP8, MXFP4 = "fp8_e4m3_block", "mxfp4"


def addr(a):
    return a.__array_interface__["data"][0]


def reference_weights(q):
    """The float64 weights a QuantizedWeight encodes, by reference.py's decoders."""
    if q.weight_format == FP8:
        return R.dequantize_fp8(q.weights, q.scale, q.group_size)
    return R.dequantize_mxfp4(q.weights, q.scale)


def dequantized(p, quantized):
    return dataclasses.replace(p, **{n: reference_weights(q) for n, q in quantized.items()})


def from_quantized(p, quantized, **kwargs):
    layer = moe_sft.MoESFT.from_quantized(*(quantized[n] for n in PROJECTIONS), lora_rank=p.rank, lora_alpha=p.alpha,
                                          **kwargs)
    return bind_lora(layer, p)


# ---- decoding: every code, against numpy from the definitions and against Transformers ----

def test_every_e4m3_code_decodes_as_defined():
    """All 256 bytes: the reference decoder is the format (ml_dtypes' e4m3fn agrees), and moe_sft.dequantize
    equals it, NaN codes included; a power-of-two scale multiplies exactly."""
    codes = np.arange(256, dtype=np.uint8)
    want = R.e4m3_values()
    assert np.array_equal(want, codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64), equal_nan=True)
    assert want[0x7E] == 448 and want[0x01] == 2.0 ** -9 and want[0x08] == 2.0 ** -6
    assert np.isnan(want[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(want, [0x7F, 0xFF])).all()
    q = moe_sft.QuantizedWeight(FP8, (1, 256), codes.reshape(1, 256), np.array([[2.0 ** -3]], np.float32), None)
    assert np.array_equal(moe_sft.dequantize(q), (want * 2.0 ** -3).reshape(1, 256), equal_nan=True)


def test_every_e2m1_nibble_and_e8m0_extreme_decode_as_defined():
    """All 16 nibbles (low nibble = even k) at scale bytes 0 (2^-127), 1, 126, 127, 128, 200, 254 and 255 (NaN)."""
    values = R.e2m1_values()
    assert list(values[:8]) == [0, 0.5, 1, 1.5, 2, 3, 4, 6] and list(values[8:]) == [-v for v in values[:8]]
    assert np.array_equal(values, np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64))
    scale_bytes = np.array([0, 1, 126, 127, 128, 200, 254, 255], np.uint8)
    nibbles = np.tile(np.arange(16, dtype=np.uint8), 2)  # 32 values: one group
    blocks = np.tile(nibbles[0::2] | (nibbles[1::2] << 4), (len(scale_bytes), 1))  # [8 rows, 16 bytes]
    want = values[nibbles][None, :] * np.ldexp(1.0, scale_bytes.astype(int) - 127)[:, None]
    want[-1] = np.nan
    assert np.array_equal(R.dequantize_mxfp4(blocks, scale_bytes[:, None]), want, equal_nan=True)
    got = moe_sft.dequantize(moe_sft.QuantizedWeight(MXFP4, 32, blocks, scale_bytes[:, None], None))
    with np.errstate(over="ignore"):  # 6 * 2^127 is inf in float32, as in the library
        assert np.array_equal(got, want.astype(np.float32), equal_nan=True)
    # gpt-oss's [.., N, K/32, 16] is the same bytes
    got4 = moe_sft.dequantize(moe_sft.QuantizedWeight(MXFP4, 32, blocks[:, None, :], scale_bytes[:, None], None))
    assert np.array_equal(got4, got, equal_nan=True)


def test_mxfp4_layout_is_transformers():
    """gpt-oss blocks [E, N, K/32, 16] and scales [E, N, K/32] decode as Transformers' own MXFP4 dequantization
    (which returns [E, K, N]): nibble order and scale bias verified against the real code."""
    torch = pytest.importorskip("torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (2, 6, 3, 16), np.uint8)
    scales = rng.integers(118, 136, (2, 6, 3), np.uint8)
    theirs = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                              dtype=torch.float32).numpy()
    assert np.array_equal(theirs.transpose(0, 2, 1), R.dequantize_mxfp4(blocks, scales))
    ours = moe_sft.dequantize(moe_sft.QuantizedWeight(MXFP4, 32, blocks, scales, None))
    assert np.array_equal(theirs.transpose(0, 2, 1), ours)


@pytest.mark.parametrize("scale_dtype", [np.float32, ml_dtypes.bfloat16])
def test_fp8_layout_is_transformers(scale_dtype):
    """e4m3 bytes [E, N, K] with scale_inv [E, ceil(N/bn), ceil(K/bk)] (partial edge blocks: N = 176, K = 72 with
    128 x 64 blocks) decode as Transformers' finegrained-FP8 dequantization."""
    torch = pytest.importorskip("torch")
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, (2, 176, 72), np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C
    scale = rng.uniform(0.5, 2, (2, 2, 2)).astype(scale_dtype)
    weight = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    theirs = fp8._dequantize_fp8_weight(weight, torch.from_numpy(scale.astype(np.float32)), [128, 64],
                                        torch.float64).numpy()
    assert np.array_equal(theirs, R.dequantize_fp8(codes, scale, (128, 64)))
    ours = moe_sft.dequantize(moe_sft.QuantizedWeight(FP8, (128, 64), codes, scale, None))
    assert np.array_equal(ours, theirs.astype(np.float32))


# ---- moe_sft.quantize: the header's arithmetic, byte for byte ----

@pytest.mark.parametrize("block, scale_dtype", [((128, 128), np.float32), ((128, 128), ml_dtypes.bfloat16),
                                                ((32, 64), np.float32), ((16, 2), np.float32), (8, np.float32)])
def test_quantize_fp8_matches_numpy_byte_for_byte(block, scale_dtype):
    w = (np.random.default_rng(5).standard_normal((3, 176, 72)) * 0.05).astype(R.bf16)
    w[0, :40, :30] = 0  # an all-zero block gets scale 1
    w[1, 3, 5] = 1e-30  # values far below the block's scale round to 0
    q = moe_sft.quantize(w, FP8, block, scale_dtype=scale_dtype)
    pair = (block, block) if isinstance(block, int) else block
    codes, scale = R.quantize_fp8(w, pair, scale_dtype)
    assert (q.weight_format, q.group_size, q.zero) == (FP8, pair, None)
    assert q.scale.dtype == scale.dtype and np.array_equal(q.scale, scale)
    assert np.array_equal(q.weights, codes)
    assert np.abs(R.dequantize_fp8(codes, scale, pair) - R.f64(w)).max() <= np.abs(R.f64(w)).max() / 16


def test_quantize_mxfp4_matches_numpy_byte_for_byte():
    w = (np.random.default_rng(6).standard_normal((2, 40, 96)) * 0.05).astype(R.bf16)
    w[0, 0, :32] = 0
    w[0, 1, :32] = np.float32(3e38)  # the largest exponents: e = 125
    w[0, 2, :32] = np.float32(1e-39)  # below e8m0's range: e clamps to -127
    q = moe_sft.quantize(w, MXFP4)
    blocks, scales = R.quantize_mxfp4(w)
    assert (q.weight_format, q.group_size, q.zero) == (MXFP4, 32, None)
    assert np.array_equal(q.scale, scales) and np.array_equal(q.weights, blocks)
    assert scales[0, 0, 0] == 127 and scales[0, 1, 0] == 125 + 127 and scales[0, 2, 0] == 0


# ---- the layer's own decoding: exact, for every code ----

def _all_codes(shape, fmt, rng):
    """Codes [E, N, K] (fp8: bytes; mxfp4: packed nibbles) cycling through every non-NaN code in a random order."""
    E, N, K = shape
    if fmt == FP8:
        pool = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
        return rng.permutation(np.resize(pool, E * N * K)).reshape(shape)
    nibbles = rng.permutation(np.resize(np.arange(16, dtype=np.uint8), E * N * K)).reshape(shape)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


@pytest.mark.parametrize("fmt", [FP8, MXFP4])
def test_layer_decodes_every_code_exactly(isa, fmt):
    """Every code with power-of-two scales is exactly a bf16: the layer on the codes computes what the bf16 layer
    on the decoded values does, bit for bit (the same bf16 kernels over the same bf16 panels). A code decoded
    wrong anywhere in the shared decoder changes the results."""
    rng = np.random.default_rng(7)
    E, H, I = 2, 64, 96
    p = R.make_problem(E, H, I, 2, 24, 4, seed=8)
    quantized = {}
    for n, (N, K) in zip(PROJECTIONS, ((I, H), (I, H), (H, I))):
        codes = _all_codes((E, N, K), fmt, rng)
        if fmt == FP8:  # scales 2^-12 .. 2^-9 per 32 x 32 block: values up to 448 * 2^-9
            scale = np.ldexp(np.float32(1), rng.integers(-12, -8, (E, N // 32, K // 32))).astype(np.float32)
            quantized[n] = moe_sft.QuantizedWeight(FP8, (32, 32), codes, scale, None)
        else:  # e8m0 2^-7 .. 2^-4 per row and group, and the smallest (2^-127: bf16 subnormals) on one row
            scale = rng.integers(120, 124, (E, N, K // 32)).astype(np.uint8)
            scale[0, 1] = 0
            quantized[n] = moe_sft.QuantizedWeight(MXFP4, 32, codes, scale, None)
    exact = dequantized(p, quantized)
    for n in PROJECTIONS:  # exactly bf16
        assert np.array_equal(R.f64(getattr(exact, n).astype(R.bf16)), getattr(exact, n)), n
    exact = dataclasses.replace(exact, **{n: getattr(exact, n).astype(R.bf16) for n in PROJECTIONS})
    out, grads = run_layer(from_quantized(exact, quantized), exact)
    bf16_out, bf16_grads = run_layer(make_layer(exact), exact)
    assert np.array_equal(np.asarray(out, np.float32), np.asarray(bf16_out, np.float32))
    for name in ("input", "routing_weights") + R.LORA_NAMES:
        assert np.array_equal(getattr(grads, name), getattr(bf16_grads, name)), name


# ---- forward and backward vs the float64 reference on the dequantized weights ----

# name: (E, H, I, k, T, r, format, group_size, scale dtype, prequantized, tp_counts)
CASES = {
    # 32 x 32 blocks, I = 96: three parts of whole blocks
    "fp8-b32-f32": (4, 64, 96, 2, 12, 4, FP8, (32, 32), np.float32, False, (1, 2, 3)),
    # the published 128 x 128 with I = 176 (a partial block in every direction) and H = 64 < 128
    "fp8-b128-I176": (3, 64, 176, 2, 9, 4, FP8, (128, 128), np.float32, True, (1, 2)),
    # bf16 scales, blocks 16 x 48: lcm 48, I = 160 = 3 * 48 + 16 (a partial block in down's K)
    "fp8-b16x48-bf16": (3, 96, 160, 2, 9, 4, FP8, (16, 48), ml_dtypes.bfloat16, True, (1, 2, 3)),
    # blocks of rows that are not whole 16-row panels (each row keeps its own scale), lcm 48 with I = 160
    "fp8-b24x16": (3, 96, 160, 2, 9, 4, FP8, (24, 16), np.float32, True, (1, 2, 3)),
    # few rows per expert (the T = 1 paths)
    "fp8-few-rows": (6, 64, 96, 1, 3, 4, FP8, (8, 32), np.float32, True, (1, 3)),
    "mxfp4": (3, 96, 160, 2, 9, 4, MXFP4, 32, None, False, (1, 2, 3)),
    "mxfp4-prequantized": (4, 64, 96, 2, 12, 4, MXFP4, 32, None, True, (1, 3)),
    "mxfp4-few-rows": (6, 64, 96, 1, 3, 4, MXFP4, 32, None, True, (1, 2)),
}
TP_CASES = [(name, tp) for name, case in CASES.items() for tp in case[-1]]


@pytest.mark.parametrize("name, tp", TP_CASES, ids=[f"{n}-tp{tp}" for n, tp in TP_CASES])
def test_matches_reference_on_dequantized_weights(isa, name, tp):
    E, H, I, k, T, r, fmt, group_size, scale_dtype, prequantized, _ = CASES[name]
    p = R.make_problem(E, H, I, k, T, r, seed=H + I + tp)
    quantized = {n: moe_sft.quantize(getattr(p, n), fmt, group_size, scale_dtype=scale_dtype if fmt == FP8 else None)
                 for n in PROJECTIONS}
    if prequantized:
        layer = from_quantized(p, quantized, tp_count=tp)
    else:
        layer = make_layer(p, weight_format=fmt, group_size=group_size, tp_count=tp,
                           scale_dtype=scale_dtype if fmt == FP8 else None)
    assert (layer.weight_format, layer.group_size, layer.tp_count) == (fmt, quantized["gate"].group_size, tp)
    assert_matches_reference(dequantized(p, quantized), *run_layer(layer, p), weight_format=fmt)


# ---- check_finite: NaN codes, non-finite or zero scales, values beyond bf16, named by expert, row and column ----

def _fp8_weights(E=2, H=64, I=96, block=(32, 32), scale_dtype=np.float32):
    p = R.make_problem(E, H, I, 2, 4, 2, seed=9)
    return p, {n: moe_sft.quantize(getattr(p, n), FP8, block, scale_dtype=scale_dtype) for n in PROJECTIONS}


def _mxfp4_weights(E=2, H=64, I=96):
    p = R.make_problem(E, H, I, 2, 4, 2, seed=10)
    return p, {n: moe_sft.quantize(getattr(p, n), MXFP4) for n in PROJECTIONS}


def _set(q, field, index, value):
    a = getattr(q, field).copy()
    a[index] = value
    return q._replace(**{field: a})


# name: (weights, projection, field, index, value, needles)
POISON_CASES = {
    "fp8 NaN code": (_fp8_weights, "up", "weights", (1, 5, 7), 0x7F,
                     ["NaN code 0x7f (e4m3) in up_proj at expert 1, row 5, column 7"]),
    "fp8 negative NaN code": (_fp8_weights, "down", "weights", (0, 63, 95), 0xFF,
                              ["NaN code 0xff (e4m3) in down_proj at expert 0, row 63, column 95"]),
    "fp8 zero scale": (_fp8_weights, "gate", "scale", (1, 2, 1), 0.0,
                       ["zero scale 0 (scale[2, 1]) in gate_proj scales at expert 1, rows 64..95, columns 32..63"]),
    "fp8 inf scale": (_fp8_weights, "down", "scale", (0, 1, 2), np.inf,
                      ["non-finite scale inf (scale[1, 2]) in down_proj scales at expert 0, rows 32..63, columns 64..95"]),
    "fp8 NaN scale": (_fp8_weights, "up", "scale", (1, 0, 0), np.nan, ["non-finite scale nan", "up_proj scales"]),
    "mxfp4 scale 255": (_mxfp4_weights, "down", "scale", (1, 7, 2), 255,
                        ["non-finite scale nan (e8m0 byte 255) (scale[7, 2]) in down_proj scales at expert 1, row 7, "
                         "columns 64..95"]),
    "mxfp4 beyond bf16": (_mxfp4_weights, "gate", "scale", (0, 3, 1), 254,
                          ["non-finite value", "e2m1 code", "times 2^(254 - 127) is beyond bf16", "gate_proj at expert "
                           "0, row 3, column"]),
}


@pytest.mark.parametrize("case", POISON_CASES)
def test_check_finite_names_the_bad_code_or_scale(case):
    weights, projection, field, index, value, needles = POISON_CASES[case]
    p, q = weights()
    q[projection] = _set(q[projection], field, index, value)
    with pytest.raises(moe_sft.NonFiniteError) as err:
        moe_sft.MoESFT.from_quantized(*(q[n] for n in PROJECTIONS), lora_rank=0, check_finite=True)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    # documented: without check_finite the arrays are taken as they are (a zero scale makes zero weights, the
    # others non-finite values that reach the outputs)
    layer = moe_sft.MoESFT.from_quantized(*(q[n] for n in PROJECTIONS), lora_rank=0, check_finite=False)
    out = np.asarray(layer.forward(p.x, p.ids, p.weights), np.float32)
    assert np.isfinite(out).all() == (value == 0)


# ---- bad input: an error naming the field, nothing written ----

def expect_invalid(call, needles):
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        call()
    for needle in needles:
        assert needle in str(err.value), str(err.value)


BF16_CASES = {  # MoESFT(gate [2, 96, 64], up, down [2, 64, 96], **kwargs)
    "fp8 block_cols odd": (dict(weight_format=FP8, group_size=(32, 33)), ["block_cols = 33 is odd"]),
    "fp8 block 0": (dict(weight_format=FP8, group_size=(0, 128)), ["group_size = (0, 128)", "positive"]),
    "fp8 block of three": (dict(weight_format=FP8, group_size=(1, 2, 3)), ["group_size = (1, 2, 3)"]),
    "fp8 scale dtype": (dict(weight_format=FP8, scale_dtype=np.float16), ["scale_dtype", "float32 or bfloat16"]),
    "fp8 tp across blocks": (dict(weight_format=FP8, group_size=64, tp_count=3),
                             ["cfg->tp_count = 3 cannot split cfg->intermediate_size = 96", "64 x 64 blocks",
                              "at most 2 parts"]),
    "mxfp4 group 16": (dict(weight_format=MXFP4, group_size=16), ["group_size = 16", "groups of 32"]),
    "mxfp4 scale dtype": (dict(weight_format=MXFP4, scale_dtype=np.float32), ["scale_dtype"]),
    "mxfp4 tp across groups": (dict(weight_format=MXFP4, tp_count=4), ["cfg->tp_count = 4", "at most 3 parts"]),
    "int8 scale dtype": (dict(weight_format="int8", scale_dtype=np.float32), ["scale_dtype", "fp8_e4m3_block"]),
}


@pytest.mark.parametrize("case", BF16_CASES)
def test_create_from_bf16_rejects(case):
    kwargs, needles = BF16_CASES[case]
    p = R.make_problem(2, 64, 96, 2, 4, 2, seed=11)
    expect_invalid(lambda: moe_sft.MoESFT(p.gate, p.up, p.down, **kwargs), needles)


def test_mxfp4_refuses_k_not_a_multiple_of_32():
    p = R.make_problem(2, 64, 80, 2, 4, 2, seed=12)
    expect_invalid(lambda: moe_sft.MoESFT(p.gate, p.up, p.down, weight_format=MXFP4),
                   ["intermediate_size = 80 is not a multiple of 32"])
    expect_invalid(lambda: moe_sft.quantize(p.gate[:, :, :48], MXFP4), ["K (w.shape[-1]) = 48 is not a multiple of 32"])


QUANTIZED_CASES = {  # one projection's QuantizedWeight fields replaced
    "fp8 scale shape": (FP8, "down", lambda q: dict(scale=q.scale[:, :, :-1]),
                        ["down_proj.scale has shape (2, 2, 2); expected (2, 2, 3)"]),
    "fp8 scale float64": (FP8, "gate", lambda q: dict(scale=q.scale.astype(np.float64)),
                          ["gate_proj.scale has dtype float64; expected float32 or bfloat16"]),
    "fp8 scale dtypes differ": (FP8, "up", lambda q: dict(scale=q.scale.astype(ml_dtypes.bfloat16)),
                                ["up_proj.scale has dtype bfloat16; expected float32"]),
    "fp8 weights int8": (FP8, "up", lambda q: dict(weights=q.weights.view(np.int8)),
                         ["up_proj.weights has dtype int8; expected uint8"]),
    "fp8 blocks differ": (FP8, "down", lambda q: dict(group_size=(32, 64)),
                          ["down_proj.group_size = (32, 64) but gate_proj.group_size = (32, 32)"]),
    "fp8 zero": (FP8, "gate", lambda q: dict(zero=np.zeros(q.scale.shape, np.uint8)), ["gate_proj.zero must be None"]),
    "mxfp4 scale shape": (MXFP4, "gate", lambda q: dict(scale=q.scale[:, :-1]),
                          ["gate_proj.scale has shape (2, 95, 2); expected (2, 96, 2)"]),
    "mxfp4 scale float32": (MXFP4, "up", lambda q: dict(scale=q.scale.astype(np.float32)),
                            ["up_proj.scale has dtype float32; expected uint8"]),
    "mxfp4 group 16": (MXFP4, "gate", lambda q: dict(group_size=16), ["group_size = 16"]),
}


@pytest.mark.parametrize("case", QUANTIZED_CASES)
def test_from_quantized_rejects(case):
    fmt, projection, fields, needles = QUANTIZED_CASES[case]
    _, q = _fp8_weights() if fmt == FP8 else _mxfp4_weights()
    q[projection] = q[projection]._replace(**fields(q[projection]))
    expect_invalid(lambda: moe_sft.MoESFT.from_quantized(*(q[n] for n in PROJECTIONS)), needles)


# The raw C ABI: every refusal names the config's field (no Python checks in the way)
def _raw_arrays(fmt, E=2, H=64, I=96, block=(32, 32), scale_dtype=np.float32):
    arrays = {}
    for n, (N, K) in zip(PROJECTIONS, ((I, H), (I, H), (H, I))):
        if fmt == FP8:
            arrays[n] = np.zeros((E, N, K), np.uint8)
            arrays[f"{n}_scale"] = np.ones((E, -(-N // block[0]), -(-K // block[1])), scale_dtype)
        else:
            arrays[n] = np.zeros((E, N, K // 2), np.uint8)
            arrays[f"{n}_scale"] = np.full((E, N, K // 32), 127, np.uint8)
    return arrays


def _raw_create(arrays, E=2, H=64, I=96, **fields):
    f = {**dict(tp=1, weight_format=FORMAT_CODE[FP8], group_size=0, block_rows=32, block_cols=32,
                scale_dtype=DTYPE_F32, prequantized=1), **fields}
    a = {k: addr(v) for k, v in arrays.items()}
    status, handle = B.create(E, H, I, 2, 4.0, 1, 0, f["tp"], a["gate"], a["up"], a["down"], -1, f["weight_format"],
                              f["group_size"], f["prequantized"], a["gate_scale"], a["up_scale"], a["down_scale"], 0, 0,
                              0, block_rows=f["block_rows"], block_cols=f["block_cols"], scale_dtype=f["scale_dtype"])
    if handle:
        B.destroy(handle)
    return status


@both_backends
def test_raw_valid_configs_create():
    assert _raw_create(_raw_arrays(FP8)) == OK, B.last_error()
    assert _raw_create(_raw_arrays(FP8, scale_dtype=np.uint16), scale_dtype=DTYPE_BF16) == OK, B.last_error()
    assert _raw_create(_raw_arrays(MXFP4), weight_format=FORMAT_CODE[MXFP4], group_size=32, block_rows=0,
                       block_cols=0) == OK, B.last_error()


MX = dict(weight_format=FORMAT_CODE[MXFP4], group_size=32, block_rows=0, block_cols=0)
RAW_CASES = {  # name: (format of the arrays, config fields, needles)
    "fp8 block_rows 0": (FP8, dict(block_rows=0), ["cfg->block_rows = 0 with weight_format fp8_e4m3_block",
                                                   "weight_block_size"]),
    "fp8 block_cols negative": (FP8, dict(block_cols=-32), ["cfg->block_cols = -32"]),
    "fp8 block_cols odd": (FP8, dict(block_cols=33), ["cfg->block_cols = 33 is odd"]),
    "fp8 group_size": (FP8, dict(group_size=32), ["cfg->group_size = 32 must be 0 with weight_format fp8_e4m3_block"]),
    "fp8 scale_dtype 7": (FP8, dict(scale_dtype=7), ["cfg->scale_dtype = 7 is not a moe_sft_dtype"]),
    "fp8 tp across blocks": (FP8, dict(block_rows=64, block_cols=32, tp=3),
                             ["cfg->tp_count = 3 cannot split", "64 x 32 blocks", "at most 2 parts"]),
    "fp8 from bf16 with a scale": (FP8, dict(prequantized=0), ["cfg->gate_scale is set, but cfg->prequantized = 0"]),
    "mxfp4 group_size 0": (MXFP4, dict(MX, group_size=0), ["cfg->group_size = 0 with weight_format mxfp4",
                                                           "groups of 32"]),
    "mxfp4 block_rows": (MXFP4, dict(MX, block_rows=32), ["cfg->block_rows = 32 must be 0 with weight_format mxfp4"]),
    "mxfp4 scale_dtype bf16": (MXFP4, dict(MX, scale_dtype=DTYPE_BF16), ["cfg->scale_dtype = 0 must stay"]),
    "int8 block_cols": (FP8, dict(weight_format=FORMAT_CODE["int8"], block_rows=0, block_cols=128),
                        ["cfg->block_cols = 128 must be 0 with weight_format int8"]),
    "mxfp4 H = 48": (MXFP4, dict(MX, H=48), ["cfg->group_size = 32 does not divide cfg->hidden_size = 48"]),
}


@both_backends
@pytest.mark.parametrize("case", RAW_CASES)
def test_raw_create_rejects(case):
    fmt, fields, needles = RAW_CASES[case]
    fields = dict(fields)
    H = fields.pop("H", 64)
    status = _raw_create(_raw_arrays(fmt, H=H), H=H, **fields)
    message = B.last_error()
    assert status == INVALID, (B.status_string(status), message)
    for needle in needles:
        assert needle in message, message


def test_quantize_blocks_writes_nothing_on_error():
    """The raw moe_sft_quantize_blocks: every refusal names the argument and leaves the outputs as they were."""
    N, K = 6, 64
    w = (np.random.default_rng(13).standard_normal((N, K)) * 0.1).astype(R.bf16).view(np.uint16)
    bad = w.copy()
    bad[2, 5] = 0x7FC0  # NaN
    weights, scale = np.full((N, K), 0x5A, np.uint8), np.full((N, K), 3.25, np.float32)
    snapshot = [a.copy() for a in (weights, scale)]
    F = FORMAT_CODE
    cases = [  # (format, block_rows, block_cols, scale_dtype, cols, w, needles)
        (F["int8"], 32, 32, DTYPE_F32, K, w, ["weight_format = 1 is not a block-scaled format"]),
        (F[FP8], 0, 32, DTYPE_F32, K, w, ["block_rows = 0"]),
        (F[FP8], 32, 31, DTYPE_F32, K, w, ["block_cols = 31 is odd"]),
        (F[FP8], 32, 32, 5, K, w, ["scale_dtype = 5"]),
        (F[MXFP4], 1, 16, DTYPE_F32, K, w, ["block_rows x block_cols = 1 x 16 with mxfp4"]),
        (F[MXFP4], 1, 32, DTYPE_F32, 48, w, ["cols = 48 is not a multiple of 32"]),
        (F[FP8], 32, 32, DTYPE_F32, K, None, ["w is NULL"]),
        (F[FP8], 32, 32, DTYPE_F32, K, bad, ["w", "nan"]),
        (F[MXFP4], 1, 32, DTYPE_F32, K, bad, ["w", "nan"]),
    ]
    for fmt, rows_, cols_, dtype, cols, source, needles in cases:
        got = B.quantize_blocks(fmt, rows_, cols_, dtype, N, cols, 0 if source is None else addr(source),
                                addr(weights), addr(scale))
        message = B.last_error()
        assert got != OK and "moe_sft_quantize_blocks" in message, message
        assert all(n in message for n in needles), (needles, message)
        assert all(np.array_equal(a, b) for a, b in zip((weights, scale), snapshot)), message
    assert B.quantize(F[FP8], 0, N, K, addr(w), addr(weights), addr(scale), 0) == INVALID
    assert "use moe_sft_quantize_blocks" in B.last_error()


# ---- FP8 checkpoints (DeepSeek-V3 / Qwen3-FP8 naming) through load_experts and MoESFT.from_checkpoint ----

FP8_CONFIG = {"model_type": "deepseek_v3", "quantization_config": {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}


def fp8_checkpoint(directory, E=3, H=64, I=176, block=(128, 128), scale_dtype=np.float32, shards=2, config=None):
    """Per expert and projection ``weight`` F8_E4M3 [N, K] and ``weight_scale_inv`` [ceil(N/bn), ceil(K/bk)], with
    a dense layer, shared experts and attention around them (also FP8, never read). Returns {proj: (codes, scale)}."""
    from test_checkpoints import write_checkpoint
    rng = np.random.default_rng(14)
    bn, bk = block
    pre = "model.layers.1."
    tensors = {"model.layers.0.mlp.gate_proj.weight": np.ones((8, H), ml_dtypes.float8_e4m3fn),
               pre + "self_attn.q_proj.weight": np.ones((H, H), ml_dtypes.float8_e4m3fn),
               pre + "self_attn.q_proj.weight_scale_inv": np.ones((1, 1), np.float32),
               pre + "mlp.shared_experts.gate_proj.weight": np.ones((I, H), ml_dtypes.float8_e4m3fn),
               pre + "mlp.shared_experts.gate_proj.weight_scale_inv": np.ones((2, 1), np.float32)}
    expected = {}
    for name, (N, K) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        codes = rng.integers(0, 256, (E, N, K), np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN codes; |values| <= 448, O(1 / sqrt(K)) weights after scaling
        scale = (rng.uniform(0.5, 1, (E, -(-N // bn), -(-K // bk))) / (448 * np.sqrt(K))).astype(scale_dtype)
        expected[name] = (codes, scale)
        for e in range(E):
            tensors[pre + f"mlp.experts.{e}.{name}.weight"] = codes[e].view(ml_dtypes.float8_e4m3fn)
            tensors[pre + f"mlp.experts.{e}.{name}.weight_scale_inv"] = scale[e]
    cfg = {"n_routed_experts": E, "hidden_size": H, "moe_intermediate_size": I,
           **(config if config is not None else FP8_CONFIG)}
    write_checkpoint(directory, tensors, cfg, shards)
    return expected


def _bf16_of(codes, scale, block):
    """The bf16 weights the layer's decoder makes: e4m3 value * scale_inv in float32, rounded to bf16."""
    bn, bk = block
    s = np.asarray(scale).astype(np.float32)
    N, K = codes.shape[-2:]
    full = np.repeat(np.repeat(s, bn, axis=-2), bk, axis=-1)[..., :N, :K]
    return (R.e4m3_values().astype(np.float32)[codes] * full).astype(R.bf16)


@pytest.mark.parametrize("scale_dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_fp8_checkpoint_loads_as_it_ships(tmp_path, scale_dtype):
    """The codes and scales as the checkpoint holds them (never dequantized), and the layer equal, bit for bit, to
    a bf16 layer on the decoded weights (I = 176: partial 128 x 128 blocks; tp_count 2)."""
    expected = fp8_checkpoint(tmp_path, scale_dtype=scale_dtype)
    w = moe_sft.load_experts(tmp_path, 1)
    assert (w.weight_format, w.source_dtype, w.layout, w.experts, w.hidden_size, w.intermediate_size) == (
        FP8, "F8_E4M3", "per_expert", 3, 64, 176)
    for name, q in zip(("gate_proj", "up_proj", "down_proj"), (w.gate_proj, w.up_proj, w.down_proj)):
        codes, scale = expected[name]
        assert (q.weight_format, q.group_size, q.zero) == (FP8, (128, 128), None)
        assert q.weights.dtype == np.uint8 and np.array_equal(q.weights, codes)
        assert q.scale.dtype == np.dtype(scale_dtype) and np.array_equal(q.scale, scale)
    p = R.make_problem(3, 64, 176, 2, 7, 4, seed=15)
    decoded = {n: _bf16_of(*expected[n + "_proj"], (128, 128)) for n in PROJECTIONS}
    p = dataclasses.replace(p, **decoded)
    for tp in (1, 2):
        layer = moe_sft.MoESFT.from_checkpoint(tmp_path, 1, lora_rank=p.rank, lora_alpha=p.alpha, tp_count=tp)
        assert layer.weight_format == FP8 and layer.group_size == (128, 128)
        out, grads = run_layer(bind_lora(layer, p), p)
        bf16_out, bf16_grads = run_layer(make_layer(p, tp_count=tp), p)
        assert np.array_equal(np.asarray(out, np.float32), np.asarray(bf16_out, np.float32))
        for name in ("input", "routing_weights") + R.LORA_NAMES:
            assert np.array_equal(getattr(grads, name), getattr(bf16_grads, name)), name


def test_fp8_checkpoint_block_from_config(tmp_path):
    """A 64 x 32 weight_block_size is read from config.json (and 128 x 128 when it has none)."""
    fp8_checkpoint(tmp_path / "b", block=(64, 32), config={"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [64, 32]}})
    assert moe_sft.load_experts(tmp_path / "b", 1).up_proj.group_size == (64, 32)
    fp8_checkpoint(tmp_path / "none", config={})
    assert moe_sft.load_experts(tmp_path / "none", 1).down_proj.group_size == (128, 128)


def _fp8_edit(edit, config=None):
    """An FP8 checkpoint with edit(tensors) applied to its single file."""
    def make(d):
        fp8_checkpoint(d, shards=1, config=config)
        f = moe_sft.SafetensorsFile(d / "model.safetensors")
        t = {k: np.array(f[k]) for k in f}
        del f
        edit(t)
        moe_sft.save_safetensors(d / "model.safetensors", t)
    return make


X = "model.layers.1.mlp.experts."
FP8_BAD = {
    "scale shape": (_fp8_edit(lambda t: t.update({X + "2.down_proj.weight_scale_inv": np.ones((1, 1), np.float32)})),
                    X + "2.down_proj.weight_scale_inv has shape [1, 1]; expected [1, 2] = [ceil(64 / 128), "
                    "ceil(176 / 128)]"),
    "scale f16": (_fp8_edit(lambda t: t.update({X + "0.up_proj.weight_scale_inv": np.ones((2, 1), np.float16)})),
                  X + "0.up_proj.weight_scale_inv has dtype F16; expected F32 or BF16"),
    "missing scale": (_fp8_edit(lambda t: t.pop(X + "1.gate_proj.weight_scale_inv")),
                      "lacks " + X + "1.gate_proj.weight_scale_inv"),
    "bf16 weight with a scale": (_fp8_edit(lambda t: t.update({X + "1.up_proj.weight": np.ones((176, 64), R.bf16)})),
                                 X + "1.up_proj.weight has dtype BF16; expected F8_E4M3"),
    "odd block": (_fp8_edit(lambda t: None, {"quantization_config": {"quant_method": "fp8",
                                                                     "weight_block_size": [128, 127]}}),
                  "config.json's quantization_config.weight_block_size = [128, 127]: block_cols = 127 is odd"),
    "block of one number": (_fp8_edit(lambda t: None, {"quantization_config": {"weight_block_size": [128]}}),
                            "config.json's quantization_config.weight_block_size = [128]"),
    "per-tensor scales": (_fp8_edit(lambda t: None, {"quantization_config": {"quant_method": "fp8",
                                                                             "weight_block_size": None}}),
                          "weight_block_size is null: per-tensor FP8 scales are not supported"),
    "other quant_method": (_fp8_edit(lambda t: None, {"quantization_config": {"quant_method": "awq"}}),
                           "quantization_config.quant_method is 'awq'"),
}


@pytest.mark.parametrize("case", FP8_BAD)
def test_bad_fp8_checkpoints(tmp_path, case):
    make, needle = FP8_BAD[case]
    make(tmp_path)
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        moe_sft.load_experts(tmp_path, 1)
    assert needle in str(err.value), str(err.value)
