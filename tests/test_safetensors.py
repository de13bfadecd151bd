"""moe_sft's own safetensors reader/writer (moe_sft._safetensors): exact round trips in every dtype, files the
``safetensors`` package reads (and files it wrote read here), and malformed files refused with the file and
tensor named, before any tensor is handed out."""
import json
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import moe_sft
from moe_sft import _check_adapter, _safetensors



def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-2**62, 2**62, (5,)),
        "i32": rng.integers(-2**31, 2**31, (2, 2), dtype=np.int32),
        "i8": rng.integers(-128, 128, (9,), dtype=np.int8),
        "u8": rng.integers(0, 256, (3, 3), dtype=np.uint8),
        "f8": rng.standard_normal((6,)).astype(ml_dtypes.float8_e4m3fn),
        "bool": rng.random((5,)) > 0.5,
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2],
        "nan": np.array([np.nan, np.inf, -np.inf, -0.0], ml_dtypes.bfloat16),
    }


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_round_trip_exact(tmp_path):
    tensors = sample_tensors()
    path = moe_sft.save_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt", "step": "7"})
    f = moe_sft.SafetensorsFile(path)
    assert set(f) == set(tensors) and len(f) == len(tensors)
    assert f.metadata == {"format": "pt", "step": "7"}
    for name, a in tensors.items():
        got = f[name]
        assert same_bits(got, a), name
        assert not got.flags.writeable  # a view of the read-only map
        assert f.shape(name) == a.shape and f.dtype(name) == a.dtype
    assert f.code("bf16") == "BF16" and f.code("f8") == "F8_E4M3" and f.code("bool") == "BOOL"


def test_written_tensors_are_aligned(tmp_path):
    """Largest item size first, so every tensor starts at a multiple of its item size (the header is padded to 8)."""
    path = moe_sft.save_safetensors(tmp_path / "t.safetensors", sample_tensors())
    header_len = struct.unpack("<Q", path and open(path, "rb").read(8))[0]
    assert header_len % 8 == 0
    f = moe_sft.SafetensorsFile(path)
    for name in f:
        if f[name].size:
            assert f[name].__array_interface__["data"][0] % f.dtype(name).itemsize == 0, name


def test_loads_in_the_safetensors_package(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    tensors = sample_tensors()
    path = moe_sft.save_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    raw = dict(safetensors.deserialize(open(path, "rb").read()))  # every dtype, bf16 included, as bytes
    assert set(raw) == set(tensors)
    for name, a in tensors.items():
        assert raw[name]["dtype"] == _safetensors.dtype_code(a.dtype)
        assert list(raw[name]["shape"]) == list(a.shape)
        assert bytes(raw[name]["data"]) == np.ascontiguousarray(a).tobytes(), name
    with safetensors.safe_open(str(path), framework="np") as g:
        assert g.metadata() == {"format": "pt"}
        for name in ("f64", "f32", "f16", "i64", "i32", "i8", "u8", "bool", "empty", "scalar"):
            assert same_bits(g.get_tensor(name), tensors[name]), name


def test_reads_files_the_safetensors_package_wrote(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    tensors = {k: v for k, v in sample_tensors().items() if k in ("f64", "f32", "f16", "i64", "i8", "u8", "bool")}
    save_file(tensors, str(tmp_path / "np.safetensors"), metadata={"a": "b"})
    f = moe_sft.SafetensorsFile(tmp_path / "np.safetensors")
    assert f.metadata == {"a": "b"}
    for name, a in tensors.items():
        assert same_bits(f[name], a), name
    bf = sample_tensors()["bf16"]  # bf16 through the package's raw serializer
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8
        spec = safetensors.TensorSpec(dtype="bfloat16", shape=list(bf.shape), data_ptr=bf.ctypes.data,
                                      data_len=bf.nbytes)
    else:
        spec = {"dtype": "bfloat16", "shape": list(bf.shape), "data": bf.tobytes()}
    (tmp_path / "bf.safetensors").write_bytes(safetensors.serialize({"w": spec}))
    assert same_bits(moe_sft.SafetensorsFile(tmp_path / "bf.safetensors")["w"], bf)


def test_copy_into_converts_and_releases(tmp_path):
    w = np.random.default_rng(1).standard_normal((3, 64, 1024)).astype(np.float32)
    f = moe_sft.SafetensorsFile(moe_sft.save_safetensors(tmp_path / "w.safetensors", {"w": w}))
    out = np.empty((64, 1024), ml_dtypes.bfloat16)
    f.copy_into("w", out, 1)
    assert same_bits(out, w[1].astype(ml_dtypes.bfloat16))  # ml_dtypes' cast: round to nearest even
    half = np.empty((32, 1024), np.float32)
    f.copy_into("w", half, (2, slice(32, 64)))
    assert np.array_equal(half, w[2, 32:])
    assert np.array_equal(f["w"], w)  # released pages read back from the file


def test_writer_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"tensor 'c' has dtype complex64"):
        moe_sft.save_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(moe_sft.InvalidArgumentError, match="metadata must be a dict of strings"):
        moe_sft.save_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(2)}, metadata={"step": 3})
    assert not list(tmp_path.iterdir())  # nothing left behind


def write_raw(path, header, data=b"", pad=True):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}


def _with(name, key, value):
    h = json.loads(json.dumps(GOOD))
    h[name][key] = value
    return h


MALFORMED = {
    "empty file": (b"", "0 bytes, shorter than the 8-byte header length"),
    "header length past the end": (struct.pack("<Q", 10**6) + b"{}", "header length 1000000 exceeds the file"),
    "truncated data": (lambda p: write_raw(p, GOOD, bytes(20)),
                       "tensor 'b' has data_offsets [16, 24] outside the data section (0 .. 20 bytes)"),
    "offsets outside": (lambda p: write_raw(p, _with("a", "data_offsets", [0, 400]), bytes(24)),
                        "tensor 'a' has data_offsets [0, 400] outside"),
    "offsets reversed": (lambda p: write_raw(p, _with("a", "data_offsets", [16, 0]), bytes(24)),
                         "tensor 'a' has data_offsets [16, 0] outside"),
    "overlap": (lambda p: write_raw(p, _with("b", "data_offsets", [8, 16]), bytes(24)),
                "tensor 'b' (data_offsets [8, 16]) overlaps tensor 'a' (data_offsets [0, 16])"),
    "size mismatch": (lambda p: write_raw(p, _with("a", "shape", [3, 2]), bytes(24)),
                      "tensor 'a' has data_offsets [0, 16] (16 bytes) but dtype F32 and shape [3, 2] need 24 bytes"),
    "huge shape": (lambda p: write_raw(p, _with("a", "shape", [2**40, 2**40]), bytes(24)),
                   "dtype F32 and shape [1099511627776, 1099511627776] need 4835703278458516698824704 bytes"),
    "unknown dtype": (lambda p: write_raw(p, _with("a", "dtype", "C64"), bytes(24)), "tensor 'a' has dtype C64"),
    "negative dim": (lambda p: write_raw(p, _with("a", "shape", [2, -2]), bytes(24)), "tensor 'a' has shape [2, -2]"),
    "float dim": (lambda p: write_raw(p, _with("a", "shape", [2.0, 2]), bytes(24)), "tensor 'a' has shape [2.0, 2]"),
    "missing field": (lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
                      "tensor 'a' lacks dtype, shape or data_offsets"),
    "not UTF-8": (lambda p: write_raw(p, b'{"\xff\xfe": 1}'), "its header is not UTF-8"),
    "not JSON": (lambda p: write_raw(p, b"{not json}"), "its header is not JSON"),
    "not an object": (lambda p: write_raw(p, b"[1, 2]"), "its header is not a JSON object"),
    "bad metadata": (lambda p: write_raw(p, {"__metadata__": {"x": 1}}), "__metadata__ must be a JSON object of strings"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_files(tmp_path, case):
    content, needle = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)
    tracemalloc.start()
    try:
        with pytest.raises(moe_sft.InvalidArgumentError) as err:
            moe_sft.SafetensorsFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)
    assert peak < 1 << 20  # nothing sized by what the header claims
    with pytest.raises(moe_sft.InvalidArgumentError):  # check_adapter reads through the same reader
        moe_sft.check_adapter(path)


def test_huge_header_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_safetensors, "MAX_HEADER", 64)
    path = write_raw(tmp_path / "h.safetensors", {"a" * 100: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})
    with pytest.raises(moe_sft.InvalidArgumentError, match="above the 64-byte limit"):
        moe_sft.SafetensorsFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(moe_sft.InvalidArgumentError, match="nope.safetensors: cannot open"):
        moe_sft.SafetensorsFile(tmp_path / "nope.safetensors")


def test_check_adapter_uses_this_reader(tmp_path, monkeypatch):
    opened = []

    class Spy(_safetensors.SafetensorsFile):
        def __init__(self, path):
            opened.append(path)
            super().__init__(path)

    monkeypatch.setattr(_check_adapter, "SafetensorsFile", Spy)
    a = np.array([[1.0, np.nan]], ml_dtypes.float8_e4m3fn)  # F8_E4M3, which check_adapter could not read before
    path = moe_sft.save_safetensors(tmp_path / "a.safetensors", {"layers.0.mlp.experts.1.up_proj.lora_B.weight": a})
    report = moe_sft.check_adapter(path)
    assert opened == [str(path)] and not report.ok and report.bad_tensors[0].first_bad_index == (0, 1)


def test_corrupted_headers_fail_cleanly(tmp_path):
    """Random byte flips in the length and header: either a valid file or InvalidArgumentError, never another
    exception."""
    good = open(moe_sft.save_safetensors(tmp_path / "g.safetensors", {k: v for k, v in sample_tensors().items()
                                                                      if k in ("f32", "bf16", "i64")}), "rb").read()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    rng = np.random.default_rng(0)
    path = tmp_path / "c.safetensors"
    outcomes = set()
    for _ in range(300):
        data = bytearray(good)
        for i in rng.integers(0, header_end, rng.integers(1, 4)):
            data[i] = rng.integers(0, 256)
        path.write_bytes(bytes(data[:rng.integers(header_end - 4, len(data) + 1)]))
        try:
            f = moe_sft.SafetensorsFile(path)
            for name in f:
                f[name].sum() if f[name].dtype.kind in "fiu" else None
            outcomes.add("ok")
        except moe_sft.InvalidArgumentError as err:
            assert str(path) in str(err)
            outcomes.add("error")
    assert "error" in outcomes
