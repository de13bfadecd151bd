"""moe_sft.load_experts / MoESFT.from_checkpoint: a layer's routed experts from synthetic Hugging Face checkpoints
in every key layout (per expert, Mixtral, transformers 5 fused) and dtype (bf16, f16, f32, compressed-tensors
int4), written here with the package's safetensors writer."""
import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import moe_sft
import reference as R
from moe_sft import _safetensors

bf16 = np.dtype(ml_dtypes.bfloat16)


def expert_weights(E=4, H=32, I=24, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for s in ((E, I, H), (E, I, H), (E, H, I))]


def layer_tensors(L, weights, layout, dtype):
    """The layer's keys as a checkpoint stores them, plus a router, shared experts and attention around them."""
    gate, up, down = (w.astype(dtype) for w in weights)
    E, I, H = gate.shape
    pre = f"model.layers.{L}."
    t = {pre + "self_attn.q_proj.weight": np.ones((H, H), dtype), pre + "input_layernorm.weight": np.ones(H, dtype)}
    if layout == "mixtral":
        t[pre + "block_sparse_moe.gate.weight"] = np.ones((E, H), dtype)
        for e in range(E):
            for name, w in (("w1", gate), ("w3", up), ("w2", down)):
                t[pre + f"block_sparse_moe.experts.{e}.{name}.weight"] = w[e]
        return t
    t[pre + "mlp.gate.weight"] = np.ones((E, H), dtype)
    for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        t[pre + f"mlp.shared_experts.{name}.weight"] = np.full(shape, 7, dtype)  # never loaded
    if layout == "fused":
        t[pre + "mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)  # [E, 2I, H], gate first
        t[pre + "mlp.experts.down_proj"] = down
    else:
        for e in range(E):
            for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                t[pre + f"mlp.experts.{e}.{name}.weight"] = w[e]
    return t


def write_checkpoint(directory, tensors, config=None, shards=1):
    """model.safetensors, or an index and ``shards`` shards (keys dealt out in order)."""
    os.makedirs(directory, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "test"}))
    if shards == 1:
        moe_sft.save_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
        return directory
    keys = list(tensors)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s * len(keys) // shards:(s + 1) * len(keys) // shards]
        moe_sft.save_safetensors(directory / name, {k: tensors[k] for k in part})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


DTYPES = {"bf16": bf16, "f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["per_expert", "mixtral", "fused"])
def test_layouts_and_dtypes(tmp_path, layout, dtype, shards):
    weights = expert_weights()
    tensors = {**layer_tensors(0, expert_weights(seed=9), layout, DTYPES[dtype]),
               **layer_tensors(1, weights, layout, DTYPES[dtype])}
    config = {"num_local_experts" if layout == "mixtral" else "num_experts": 4, "hidden_size": 32}
    write_checkpoint(tmp_path, tensors, config, shards)
    w = moe_sft.load_experts(tmp_path, 1)
    assert (w.weight_format, w.layout, w.source_dtype) == ("bf16", layout, dtype.upper())
    assert (w.experts, w.hidden_size, w.intermediate_size, w.layer_idx) == (4, 32, 24, 1)
    for got, src in zip((w.gate_proj, w.up_proj, w.down_proj), weights):
        # exactly the written arrays, rounded to bf16 (ml_dtypes: round to nearest even) when they were wider
        assert same_bits(got, src.astype(DTYPES[dtype]).astype(bf16))
        assert got.flags.writeable and got.flags.c_contiguous


def rne_bf16_bits(x):
    """float32 -> bf16 bits by round to nearest even, in integers (finite x)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_f32_rounds_to_nearest_even(tmp_path):
    E, I, H = 1, 8, 8
    gate = np.zeros((E, I, H), np.float32)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 3.0, 1e-30], np.float32)
    gate.reshape(-1)[:ties.size] = ties
    weights = [gate, np.ones((E, I, H), np.float32), np.ones((E, H, I), np.float32)]
    write_checkpoint(tmp_path, layer_tensors(0, weights, "per_expert", np.float32))
    got = moe_sft.load_experts(tmp_path, 0).gate_proj.view(np.uint16).reshape(-1)
    assert np.array_equal(got, rne_bf16_bits(gate).reshape(-1))
    assert list(got[:3]) == [0x3F80, 0x3F82, 0xBF80]  # ties go to the even neighbour


def pack_k2(q):
    """compressed-tensors pack-quantized: q in [-8, 7] [.., N, K] -> int32 [.., N, K/8], q + 8 in bits 4 (k % 8).."""
    u = (q.astype(np.int64) + 8).reshape(q.shape[:-1] + (q.shape[-1] // 8, 8))
    words = (u << (4 * np.arange(8))).sum(axis=-1)
    return words.astype(np.uint32).view(np.int32)


def k2_checkpoint(directory, E=4, H=64, I=32, g=32, shards=2, weight_shape_dtype=np.int64, config=None):
    rng = np.random.default_rng(5)
    expected, tensors = {}, {"model.layers.2.self_attn.o_proj.weight": np.ones((H, H), bf16)}
    for name, (N, K) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        q = rng.integers(-8, 8, (E, N, K))
        scale = (rng.uniform(0.5, 2, (E, N, K // g)) * 1e-2).astype(bf16)
        expected[name] = (q, pack_k2(q), scale)
        for e in range(E):
            pre = f"model.layers.2.mlp.experts.{e}.{name}."
            tensors[pre + "weight_packed"] = expected[name][1][e]
            tensors[pre + "weight_scale"] = scale[e]
            tensors[pre + "weight_shape"] = np.array([N, K], weight_shape_dtype)
    config = config or {"n_routed_experts": E, "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": g,
                                                  "strategy": "group"}, "targets": ["Linear"]}}}}
    write_checkpoint(directory, tensors, config, shards)
    return expected


@pytest.mark.parametrize("shape_dtype", [np.int64, np.int32])
def test_k2_pack_quantized(tmp_path, shape_dtype):
    expected = k2_checkpoint(tmp_path, weight_shape_dtype=shape_dtype)
    w = moe_sft.load_experts(tmp_path, 2)
    assert (w.weight_format, w.source_dtype, w.experts, w.hidden_size, w.intermediate_size) == (
        "int4_k2", "int4-pack-quantized", 4, 64, 32)
    for name, q in zip(("gate_proj", "up_proj", "down_proj"), (w.gate_proj, w.up_proj, w.down_proj)):
        codes, packed, scale = expected[name]
        assert (q.weight_format, q.group_size, q.zero) == ("int4_k2", 32, None)
        assert same_bits(q.weights, packed) and same_bits(q.scale, scale)
        # the integers the library decodes are the ones packed: W = q * scale
        assert np.array_equal(moe_sft.dequantize(q), codes * np.repeat(scale.astype(np.float32), 32, axis=-1))


def test_from_checkpoint_builds_the_layer(tmp_path):
    weights = expert_weights(E=4, H=32, I=32)
    write_checkpoint(tmp_path / "bf", layer_tensors(0, weights, "fused", bf16))
    p = R.make_problem(4, 32, 32, 2, 6, 4)
    layer = moe_sft.MoESFT.from_checkpoint(tmp_path / "bf", 0, lora_rank=4, lora_alpha=8, num_threads=1)
    direct = moe_sft.MoESFT(*(w.astype(bf16) for w in weights), lora_rank=4, lora_alpha=8, num_threads=1)
    for m in (layer, direct):
        m.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
    assert same_bits(layer.forward(p.x, p.ids, p.weights), direct.forward(p.x, p.ids, p.weights))
    expected = k2_checkpoint(tmp_path / "k2", E=4, H=64, I=32)
    layer = moe_sft.MoESFT.from_checkpoint(tmp_path / "k2", 2, lora_rank=0, num_threads=1)
    direct = moe_sft.MoESFT.from_quantized(*(moe_sft.QuantizedWeight("int4_k2", 32, expected[n][1], expected[n][2], None)
                                             for n in ("gate_proj", "up_proj", "down_proj")), lora_rank=0, num_threads=1)
    assert layer.weight_format == "int4_k2"
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(bf16)
    ids, rw = np.array([[0, 1], [2, 3], [3, -1]]), np.full((3, 2), 0.5, np.float32)
    assert same_bits(layer.forward(x, ids, rw), direct.forward(x, ids, rw))


def test_reads_only_the_layers_expert_tensors(tmp_path, monkeypatch):
    tensors = {}
    for L in range(4):
        tensors.update(layer_tensors(L, expert_weights(seed=L), "per_expert", bf16))
    write_checkpoint(tmp_path, tensors, shards=4)  # layer L's keys in shard L + 1
    opened, copied = [], []
    real_init, real_copy = _safetensors.SafetensorsFile.__init__, _safetensors.SafetensorsFile.copy_into
    monkeypatch.setattr(_safetensors.SafetensorsFile, "__init__",
                        lambda self, path: (opened.append(os.path.basename(path)), real_init(self, path))[1])
    monkeypatch.setattr(_safetensors.SafetensorsFile, "copy_into",
                        lambda self, name, out, index=None: (copied.append(name), real_copy(self, name, out, index))[1])
    w = moe_sft.load_experts(tmp_path, 2)
    assert opened == ["model-00003-of-00004.safetensors"]
    assert sorted(copied) == sorted(f"model.layers.2.mlp.experts.{e}.{p}_proj.weight" for e in range(4)
                                    for p in ("gate", "up", "down"))
    assert same_bits(w.down_proj, expert_weights(seed=2)[2].astype(bf16))


# ---- bad input ----

def _dense_layer(d):
    t = {"model.layers.0.mlp.gate_proj.weight": np.ones((8, 4), bf16), "model.layers.0.mlp.up_proj.weight":
         np.ones((8, 4), bf16), "model.layers.0.mlp.down_proj.weight": np.ones((4, 8), bf16)}
    t.update(layer_tensors(1, expert_weights(), "per_expert", bf16))
    write_checkpoint(d, t)


def _without(key, layout="per_expert"):
    def make(d):
        t = layer_tensors(0, expert_weights(), layout, bf16)
        del t[key]
        write_checkpoint(d, t)
    return make


def _replace(key, value, layout="per_expert"):
    def make(d):
        t = layer_tensors(0, expert_weights(), layout, bf16)
        t[key] = value
        write_checkpoint(d, t)
    return make


def _config(config):
    return lambda d: write_checkpoint(d, layer_tensors(0, expert_weights(), "per_expert", bf16), config)


def _k2_without_scale(d):
    k2_checkpoint(d, shards=1)
    f = moe_sft.SafetensorsFile(d / "model.safetensors")
    t = {k: np.array(f[k]) for k in f if k != "model.layers.2.mlp.experts.1.down_proj.weight_scale"}
    del f
    moe_sft.save_safetensors(d / "model.safetensors", t)


BAD = {
    "no routed experts": (_dense_layer, 0, "layer 0 of {ckpt}/model.safetensors has no routed experts (expected e.g. "
                          "model.layers.0.mlp.experts.0.gate_proj.weight or model.layers.0.mlp.experts.gate_up_proj); its "
                          "keys: model.layers.0.mlp.down_proj.weight, model.layers.0.mlp.gate_proj.weight, "
                          "model.layers.0.mlp.up_proj.weight"),
    "no such layer": (_dense_layer, 5, "has no layer 5 (its layers: 0..1)"),
    "missing expert": (_without("model.layers.0.mlp.experts.2.up_proj.weight"), 0,
                       "layer 0 of {ckpt}/model.safetensors lacks model.layers.0.mlp.experts.2.up_proj.weight"),
    "wrong shape": (_replace("model.layers.0.mlp.experts.3.down_proj.weight", np.ones((32, 20), bf16)), 0,
                    "model.layers.0.mlp.experts.3.down_proj.weight has shape [32, 20]; expected [32, 24]"),
    "fused missing down": (_without("model.layers.0.mlp.experts.down_proj", "fused"), 0,
                           "model.layers.0.mlp.experts.gate_up_proj [4, 48, 32] but lacks "
                           "model.layers.0.mlp.experts.down_proj"),
    "fused transposed": (_replace("model.layers.0.mlp.experts.gate_up_proj", np.ones((4, 32, 48), bf16), "fused"), 0,
                         "model.layers.0.mlp.experts.gate_up_proj has shape [4, 32, 48] and "
                         "model.layers.0.mlp.experts.down_proj [4, 32, 24]; expected [E, 2I, H] and [E, H, I]"),
    "fp8": (_replace("model.layers.0.mlp.experts.1.gate_proj.weight", np.ones((24, 32), ml_dtypes.float8_e4m3fn)), 0,
            "model.layers.0.mlp.experts.1.gate_proj.weight has dtype F8_E4M3"),
    "int weights": (_replace("model.layers.0.mlp.experts.1.gate_proj.weight", np.ones((24, 32), np.int8)), 0,
                    "model.layers.0.mlp.experts.1.gate_proj.weight has dtype I8"),
    "expert count vs config": (_config({"n_routed_experts": 8}), 0,
                               "config.json has n_routed_experts = 8 but layer 0 of {ckpt}/model.safetensors has 4 "
                               "routed experts"),
    "K2 scale missing": (_k2_without_scale, 2, "lacks model.layers.2.mlp.experts.1.down_proj.weight_scale"),
    "K2 group vs config": (lambda d: k2_checkpoint(d, config={"quantization_config": {"config_groups": {
        "g": {"weights": {"num_bits": 4, "group_size": 128}}}}}), 2,
                           "quantization_config has group_size 128 but the scales of layer 2 give 32"),
    "no weights file": (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), 0,
                        "has neither model.safetensors.index.json nor model.safetensors (found: config.json)"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_checkpoints(tmp_path, case):
    make, L, needle = BAD[case]
    ckpt = tmp_path / "ckpt"
    make(ckpt)
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        moe_sft.load_experts(ckpt, L)
    assert needle.format(ckpt=ckpt) in str(err.value), str(err.value)


def test_missing_shard(tmp_path):
    write_checkpoint(tmp_path, layer_tensors(0, expert_weights(), "per_expert", bf16), shards=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(moe_sft.InvalidArgumentError, match="to shard 'model-00002-of-00002.safetensors', which is not "
                                                           "a file in"):
        moe_sft.load_experts(tmp_path, 0)


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys, moe_sft
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w = moe_sft.load_experts(sys.argv[1], 0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, w.gate_proj.nbytes + w.up_proj.nbytes + w.down_proj.nbytes)
""")


def test_peak_rss_is_about_the_experts_bytes(tmp_path):
    """Filled expert by expert from the map, the pages read dropped as it goes: the process grows by about the
    experts' bytes, not twice that (DeepSeek-V2-Lite's shape, measured the same way: see the README)."""
    write_checkpoint(tmp_path, layer_tensors(0, expert_weights(E=16, H=1024, I=512), "per_expert", bf16))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    growth, expert_bytes = map(int, out.stdout.split())
    assert growth <= 1.2 * expert_bytes + (2 << 20), (growth, expert_bytes)


# ---- expert selection (expert parallelism: a rank reads its own experts only) ----

@pytest.mark.parametrize("layout", ["per_expert", "mixtral", "fused"])
def test_selected_experts_only_are_read(tmp_path, layout, monkeypatch):
    weights = expert_weights(E=6)
    write_checkpoint(tmp_path, layer_tensors(1, weights, layout, bf16), {"num_experts": 6}, shards=2)
    copied = []
    real_copy = _safetensors.SafetensorsFile.copy_into
    monkeypatch.setattr(_safetensors.SafetensorsFile, "copy_into",
                        lambda self, name, out, index=None: (copied.append((name, index)), real_copy(self, name, out,
                                                                                                        index))[1])
    w = moe_sft.load_experts(tmp_path, 1, experts=[4, 1])
    assert (w.experts, w.total_experts, w.expert_ids) == (2, 6, (4, 1)) and "2 of 6" in repr(w)
    for got, src in zip((w.gate_proj, w.up_proj, w.down_proj), weights):
        assert same_bits(got, src[[4, 1]].astype(bf16))
    touched = {int(name.split(".experts.")[1].split(".")[0]) if index is None else
               (index if isinstance(index, int) else index[0]) for name, index in copied}
    assert touched == {1, 4}, copied
    everything = moe_sft.load_experts(tmp_path, 1)
    assert (everything.expert_ids, everything.total_experts) == (None, 6)


def test_selected_k2_experts(tmp_path):
    expected = k2_checkpoint(tmp_path, E=4)
    w = moe_sft.load_experts(tmp_path, 2, experts=np.array([3, 0]))
    assert w.experts == 2 and w.weight_format == "int4_k2"
    assert same_bits(w.gate_proj.weights, expected["gate_proj"][1][[3, 0]])
    assert same_bits(w.down_proj.scale, expected["down_proj"][2][[3, 0]])


@pytest.mark.parametrize("experts, message", [
    ([0, 6], r"experts\[1\] = 6 is out of range \[0, 6\): layer 1 has 6 routed experts"),
    ([2, -1], r"experts\[1\] = -1 is out of range"),
    ([3, 1, 3], r"experts\[2\] = 3 is listed twice"),
    ([[0, 1]], "experts must be a 1-D list of expert ids"),
    ([0.5], "experts must be a 1-D list of expert ids"),
])
def test_bad_selection(tmp_path, experts, message):
    write_checkpoint(tmp_path, layer_tensors(1, expert_weights(E=6), "per_expert", bf16))
    with pytest.raises(moe_sft.InvalidArgumentError, match=message):
        moe_sft.load_experts(tmp_path, 1, experts=experts)
