"""moe_sft.check_adapter: non-finite values of an adapter, from arrays or from a .safetensors file that the
tests write byte by byte (8-byte little-endian header length, JSON header, raw little-endian data)."""
import json
import struct

import numpy as np
import pytest

import moe_sft
import reference as R
from moe_sft import _check_adapter

CODES = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", R.bf16: "BF16",
         np.dtype("<i8"): "I64"}


def write_safetensors(path, arrays, metadata=None, header_patch=None):
    """The format by hand: header entries in name order, data back to back in the same order."""
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        blob = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata is not None:
        header["__metadata__"] = metadata
    if header_patch:
        header_patch(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


PEFT = "base_model.model.model.layers.{}.{}.lora_{}.weight"


def poisoned_adapter():
    """PEFT names in every dtype, one moe_sft-style stacked array, clean tensors around them."""
    rng = np.random.default_rng(0)
    a = {}
    a[PEFT.format(3, "mlp.experts.17.gate_proj", "A")] = rng.standard_normal((4, 16)).astype(np.float32)
    a[PEFT.format(3, "mlp.experts.17.gate_proj", "A")][1, 9] = np.nan
    a[PEFT.format(3, "mlp.experts.17.gate_proj", "B")] = rng.standard_normal((8, 4)).astype(np.float32)
    a[PEFT.format(3, "mlp.experts.2.down_proj", "B")] = rng.standard_normal((16, 4)).astype(np.float16)
    a[PEFT.format(3, "mlp.experts.2.down_proj", "B")][[5, 7], 0] = [np.inf, -np.inf]
    a[PEFT.format(0, "self_attn.q_proj", "A")] = rng.standard_normal((4, 16)).astype(R.bf16)
    a[PEFT.format(0, "self_attn.q_proj", "A")][0, 3:5] = [-np.inf, np.nan]
    a[PEFT.format(1, "mlp.shared_experts.up_proj", "B")] = np.full((8, 4), np.nan)  # float64
    a[PEFT.format(0, "mlp.gate_proj", "A")] = rng.standard_normal((4, 16))
    stacked = rng.standard_normal((6, 4, 16)).astype(np.float32)  # [E, r, H]
    stacked[1, 2, 3] = np.nan
    stacked[4, 0, 0] = np.inf
    stacked[4, 3, 15] = np.nan
    a["layers.5.down_a"] = stacked
    a["step"] = np.array([1234], np.int64)
    return a


# (name, component, layer, expert, projection, which, size, n_nan, n_inf, first_bad_index) in report order
EXPECTED = [
    (PEFT.format(3, "mlp.experts.17.gate_proj", "A"), "routed_experts", 3, 17, "gate", "lora_A", 64, 1, 0, (1, 9)),
    (PEFT.format(3, "mlp.experts.2.down_proj", "B"), "routed_experts", 3, 2, "down", "lora_B", 64, 0, 2, (5, 0)),
    (PEFT.format(0, "self_attn.q_proj", "A"), "attention", 0, None, "q_proj", "lora_A", 64, 1, 1, (0, 3)),
    (PEFT.format(1, "mlp.shared_experts.up_proj", "B"), "shared_experts", 1, None, "up", "lora_B", 32, 32, 0, (0, 0)),
    ("layers.5.down_a", "routed_experts", 5, 1, "down", "lora_A", 64, 1, 0, (1, 2, 3)),
    ("layers.5.down_a", "routed_experts", 5, 4, "down", "lora_A", 64, 1, 1, (4, 0, 0)),
]


def check_expected(report):
    got = [(b.name, b.component, b.layer, b.expert, b.projection, b.which, b.size, b.n_nan, b.n_inf,
            b.first_bad_index) for b in report.bad_tensors]
    assert got == EXPECTED
    assert not report.ok
    assert report.tensors == 8 and report.elements == 64 * 4 + 32 * 2 + 6 * 64 + 1
    assert [np.isnan(b.first_bad_value) or b.first_bad_value for b in report.bad_tensors] == \
        [True, np.inf, -np.inf, True, True, np.inf]


def test_safetensors_file(tmp_path):
    path = write_safetensors(tmp_path / "adapter_model.safetensors", poisoned_adapter(), metadata={"format": "pt"})
    report = moe_sft.check_adapter(path)
    check_expected(report)
    assert report.source == str(path)
    assert repr(moe_sft.check_adapter(str(path)).bad_tensors) == repr(report.bad_tensors)  # repr: nan != nan


def test_arrays():
    check_expected(moe_sft.check_adapter(poisoned_adapter()))


def test_summary_and_text(tmp_path):
    report = moe_sft.check_adapter(poisoned_adapter())
    groups = {(g.component, g.projection): g for g in report.summary()}
    assert list(groups)[0] == ("routed_experts", "down")  # the largest group first
    down = groups["routed_experts", "down"]
    assert (down.tensors, down.n_nan, down.n_inf, down.layers, down.experts) == (3, 2, 3, (3, 5), (1, 2, 4))
    assert groups["attention", "q_proj"].layers == (0,)
    assert set(groups) == {("routed_experts", "down"), ("routed_experts", "gate"), ("attention", "q_proj"),
                           ("shared_experts", "up")}
    text = str(report)
    assert text.startswith("check_adapter(<arrays>): 5 of 8 tensors hold non-finite values (36 NaN, 4 Inf)")
    assert "  routed_experts down: 3 bad (2 NaN, 3 Inf), layers 3, 5, experts 1-2, 4" in text
    assert "  shared_experts up: 1 bad (32 NaN, 0 Inf), layers 1" in text
    assert "  layers.5.down_a [expert 4]: 1 NaN, 1 Inf of 64, first at (4, 0, 0) = inf" in text
    assert f"  {EXPECTED[0][0]}: 1 NaN, 0 Inf of 64, first at (1, 9) = nan" in text


def test_clean_adapter(tmp_path):
    arrays = {k: v for k, v in poisoned_adapter().items() if k.endswith("gate_proj.lora_B.weight")}
    report = moe_sft.check_adapter(write_safetensors(tmp_path / "a.safetensors", arrays))
    assert report.ok and report.bad_tensors == [] and report.summary() == []
    assert str(report).endswith("all 1 tensors finite (32 values)")


def test_moe_sft_lora_arrays_per_expert():
    """The arrays update_lora takes (and their grads) report per expert, in every naming moe_sft uses."""
    p = R.make_problem(4, 8, 6, 2, 3, 2, seed=1)
    lora = {n: a.copy() for n, a in p.lora.items()}
    lora["gate_b"][3, 5, 1] = np.nan
    lora["up_a"][0, 0, 7] = -np.inf
    lora["up_a"][2, 1, 0] = np.nan
    report = moe_sft.check_adapter(lora)
    assert [(b.name, b.expert, b.projection, b.which, b.first_bad_index) for b in report.bad_tensors] == [
        ("gate_b", 3, "gate", "lora_B", (3, 5, 1)), ("up_a", 0, "up", "lora_A", (0, 0, 7)),
        ("up_a", 2, "up", "lora_A", (2, 1, 0))]
    for name in ("gate_lora_b", "gate_proj_lora_b", "model.layers.7.mlp.experts.gate_proj.lora_B.weight"):
        [bad] = moe_sft.check_adapter({name: lora["gate_b"]}).bad_tensors
        assert (bad.expert, bad.projection, bad.which) == (3, "gate", "lora_B")


def test_scans_in_chunks(monkeypatch):
    """Counts and the first bad index are right across chunk boundaries (big tensors are scanned in parts)."""
    monkeypatch.setattr(_check_adapter, "_CHUNK", 7)
    a = np.zeros((5, 9), R.bf16)
    a[1, 8], a[2, 0], a[4, 4] = np.inf, np.nan, np.nan  # flat 17, 18, 40: in chunks 2, 2 and 5
    [bad] = moe_sft.check_adapter({"x": a}).bad_tensors
    assert (bad.n_nan, bad.n_inf, bad.first_bad_index, bad.component, bad.projection) == (2, 1, (1, 8), "other", "x")


def test_empty_tensors_and_file(tmp_path):
    report = moe_sft.check_adapter(write_safetensors(tmp_path / "e.safetensors", {"e": np.zeros((0, 3), np.float32)}))
    assert report.ok and report.tensors == 1 and report.elements == 0
    assert moe_sft.check_adapter(write_safetensors(tmp_path / "none.safetensors", {})).tensors == 0


def _patch(name, key, value):
    def patch(header):
        header[name][key] = value
    return patch


BAD_FILES = {
    "too short": (b"\x01\x00", "shorter than the 8-byte header length"),
    "header past the end": (struct.pack("<Q", 1000) + b"{}", "header length 1000 exceeds the file"),
    "header not JSON": (struct.pack("<Q", 4) + b"{no}", "its header is not JSON"),
    "header not an object": (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
    "unknown dtype": (_patch("w", "dtype", "C64"), "tensor 'w' has dtype C64"),
    "offsets outside": (_patch("w", "data_offsets", [0, 400]), "tensor 'w' has data_offsets [0, 400] outside"),
    "size mismatch": (_patch("w", "shape", [3, 3]), "(24 bytes) but dtype F32 and shape [3, 3] need 36 bytes"),
    "bad shape": (_patch("w", "shape", [2, -3]), "tensor 'w' has shape [2, -3]"),
    "missing key": (lambda h: h["w"].pop("shape"), "tensor 'w' lacks dtype, shape or data_offsets"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_rejects_malformed_files(tmp_path, case):
    content, needle = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write_safetensors(path, {"w": np.zeros((2, 3), np.float32)}, header_patch=content)
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        moe_sft.check_adapter(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_rejects_other_inputs():
    with pytest.raises(ValueError, match="takes a dict name -> array or a .safetensors path, got int"):
        moe_sft.check_adapter(3)
    with pytest.raises(ValueError, match="s has dtype <U1"):
        moe_sft.check_adapter({"s": np.array(["a"])})
