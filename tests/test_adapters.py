"""moe_sft.save_adapter / load_adapter: PEFT adapters of the routed experts without torch, per-expert
(target_modules) and fused (target_parameters on transformers 5's gate_up_proj / down_proj) layouts."""
import json
import math

import ml_dtypes
import numpy as np
import pytest

import moe_sft
import reference as R

NAMES = R.LORA_NAMES
PER_EXPERT = "base_model.model.model.layers.{}.mlp.experts.{}.{}_proj.lora_{}.weight"
FUSED_GATE_UP = "base_model.model.model.layers.{}.mlp.experts.base_layer.lora_{}.weight"
FUSED_DOWN = "base_model.model.model.layers.{}.mlp.experts.lora_{}.weight"


def lora_arrays(E=4, H=32, I=24, r=4, dtype=np.float32, seed=0, shared_a=False):
    rng = np.random.default_rng(seed)
    shapes = {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H), "up_b": (E, I, r), "down_a": (E, r, I),
              "down_b": (E, H, r)}
    a = {n: (rng.standard_normal(s) / math.sqrt(s[-1])).astype(dtype) for n, s in shapes.items()}
    if shared_a:
        a["up_a"] = a["gate_a"]
    return a


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_per_expert_round_trip(tmp_path, dtype):
    layers = {0: lora_arrays(dtype=dtype), 5: lora_arrays(dtype=dtype, seed=1)}
    moe_sft.save_adapter(tmp_path, layers, lora_rank=4, lora_alpha=16, base_model_name_or_path="org/model")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["gate_proj", "up_proj", "down_proj"] and config["target_parameters"] is None
    assert config["base_model_name_or_path"] == "org/model" and config["use_rslora"] is False
    adapter = moe_sft.load_adapter(tmp_path)
    assert (adapter.rank, adapter.alpha, adapter.scaling, adapter.layout) == (4, 16.0, 4.0, "per_expert")
    assert sorted(adapter.layers) == [0, 5]
    for L, arrays in layers.items():
        for n in NAMES:
            got = adapter.layers[L][n]
            assert same_bits(got, arrays[n]), (L, n)
            assert got.flags.writeable and got.flags.c_contiguous
    assert adapter.layers[0]["gate_a"] is not adapter.layers[0]["up_a"]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_fused_round_trip(tmp_path, dtype):
    layers = {3: lora_arrays(dtype=dtype, shared_a=True)}
    moe_sft.save_adapter(tmp_path, layers, lora_rank=4, lora_alpha=8.5, layout="fused")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["target_modules"] == [] and config["lora_alpha"] == 8.5
    adapter = moe_sft.load_adapter(tmp_path)
    assert adapter.layout == "fused" and adapter.alpha == 8.5
    got = adapter.layers[3]
    assert got["gate_a"] is got["up_a"]  # one A, bound as both
    for n in NAMES:
        assert same_bits(got[n], layers[3][n]), n


def test_documented_names_and_shapes_in_the_safetensors_package(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    E, H, I, r = 4, 32, 24, 4
    a = lora_arrays(E, H, I, r, shared_a=True)
    moe_sft.save_adapter(tmp_path / "pe", {2: a}, lora_rank=r, lora_alpha=8)
    moe_sft.save_adapter(tmp_path / "fu", {2: a}, lora_rank=r, lora_alpha=8, layout="fused")
    with safetensors.safe_open(str(tmp_path / "pe" / "adapter_model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        expected = {PER_EXPERT.format(2, e, p, ab): shape for e in range(E)
                    for p, (i, o) in {"gate": (H, I), "up": (H, I), "down": (I, H)}.items()
                    for ab, shape in (("A", (r, i)), ("B", (o, r)))}
        assert set(f.keys()) == set(expected)
        for key, shape in expected.items():
            assert f.get_tensor(key).shape == shape, key
        assert np.array_equal(f.get_tensor(PER_EXPERT.format(2, 3, "down", "B")), a["down_b"][3])
    with safetensors.safe_open(str(tmp_path / "fu" / "adapter_model.safetensors"), framework="np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: v.shape for k, v in t.items()} == {
        FUSED_GATE_UP.format(2, "A"): (E * r, H), FUSED_GATE_UP.format(2, "B"): (2 * I, E * r),
        FUSED_DOWN.format(2, "A"): (E * r, I), FUSED_DOWN.format(2, "B"): (H, E * r)}
    # PEFT's ParamWrapper.get_delta_weight (0.21.2) for a [E, out, in] parameter, applied to the raw tensors:
    # A.reshape(E, r, in), B.reshape(out, r, E), delta = einsum("o r e, e r i -> e o i")
    def peft_delta(A, B):
        return np.einsum("ore,eri->eoi", B.reshape(B.shape[0], r, E), A.reshape(E, r, A.shape[-1]))
    gate_up = peft_delta(t[FUSED_GATE_UP.format(2, "A")], t[FUSED_GATE_UP.format(2, "B")])  # [E, 2I, H]
    down = peft_delta(t[FUSED_DOWN.format(2, "A")], t[FUSED_DOWN.format(2, "B")])  # [E, H, I]
    for e in range(E):  # gate's I rows first, then up's (transformers: gate, up = ....chunk(2, dim=-1))
        np.testing.assert_allclose(gate_up[e, :I], a["gate_b"][e] @ a["gate_a"][e], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gate_up[e, I:], a["up_b"][e] @ a["up_a"][e], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(down[e], a["down_b"][e] @ a["down_a"][e], rtol=1e-5, atol=1e-6)


def test_fused_and_per_expert_give_the_same_outputs(tmp_path):
    E, H, I, k, T, r = 4, 32, 32, 2, 12, 4
    p = R.make_problem(E, H, I, k, T, r, seed=3)
    a = dict(p.lora)
    a["up_a"] = a["gate_a"]
    moe_sft.save_adapter(tmp_path / "pe", {0: a}, lora_rank=r, lora_alpha=p.alpha)
    moe_sft.save_adapter(tmp_path / "fu", {0: a}, lora_rank=r, lora_alpha=p.alpha, layout="fused")
    outs = []
    for d in ("pe", "fu"):
        adapter = moe_sft.load_adapter(tmp_path / d)
        layer = moe_sft.MoESFT(p.gate, p.up, p.down, num_threads=1, **adapter.layer_kwargs)
        adapter.bind(layer, 0)
        outs.append(layer.forward(p.x, p.ids, p.weights))
    direct = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=r, lora_alpha=p.alpha, num_threads=1)
    direct.update_lora(*(a[n] for n in NAMES))
    expected = direct.forward(p.x, p.ids, p.weights)
    assert same_bits(outs[0], expected) and same_bits(outs[1], expected)


def test_fused_adapter_trains_with_one_shared_a(tmp_path):
    """One A bound as both gate_a and up_a: backward gives its grad as the sum of the gate and up shares (one
    array in both fields, overwritten or accumulated), and AdamW steps it once, so the fused layout survives."""
    E, H, I, k, T, r = 4, 32, 32, 2, 12, 4
    p = R.make_problem(E, H, I, k, T, r, seed=5)
    shared = dict(p.lora)
    shared["up_a"] = shared["gate_a"]
    separate = dict(shared)
    separate["up_a"] = shared["gate_a"].copy()
    grad_out = R.make_problem(E, H, I, k, T, r, seed=6).x
    grads = []
    for arrays in (shared, separate):
        layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=r, lora_alpha=p.alpha, num_threads=1)
        layer.update_lora(**arrays)
        layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
        grads.append(layer.backward(grad_out))
    g_shared, g_separate = grads
    assert g_shared.gate_a is g_shared.up_a
    np.testing.assert_array_equal(g_shared.gate_a, g_separate.gate_a + g_separate.up_a)
    for n in ("gate_b", "up_b", "down_a", "down_b"):
        assert same_bits(getattr(g_shared, n), getattr(g_separate, n))

    # accumulation over two micro-batches, into the Grads of the first
    layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=r, lora_alpha=p.alpha, num_threads=1)
    layer.update_lora(**shared)
    layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    g = layer.backward(grad_out)
    layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    layer.backward(grad_out, out=g, accumulate=True)
    assert g.gate_a is g.up_a
    np.testing.assert_allclose(g.gate_a, 2 * g_shared.gate_a, rtol=1e-4, atol=0)  # f32 sums in another order

    # a failing backward leaves out= as it was
    before = {n: getattr(g, n).copy() for n in NAMES}
    with pytest.raises(moe_sft.CacheEmptyError):
        layer.backward(grad_out, out=g, accumulate=True)
    assert all(same_bits(getattr(g, n), before[n]) for n in NAMES)

    # AdamW steps the shared A once and keeps it shared; the step equals the separate A's on the summed grad
    reference = {n: shared[n].copy() for n in NAMES if n != "up_a"}
    opt = moe_sft.AdamW(shared, lr=1e-2)
    assert opt.step(g_shared).step == 1
    assert shared["gate_a"] is shared["up_a"]
    ref_grads = {n: getattr(g_shared, n) for n in reference}
    moe_sft.AdamW(reference, lr=1e-2).step(ref_grads)
    for n in reference:
        assert same_bits(shared[n], reference[n]), n
    moe_sft.save_adapter(tmp_path, {0: shared}, lora_rank=r, lora_alpha=p.alpha, layout="fused")


def test_rslora_honoured(tmp_path):
    moe_sft.save_adapter(tmp_path, {0: lora_arrays(r=16)}, lora_rank=16, lora_alpha=32, use_rslora=True)
    adapter = moe_sft.load_adapter(tmp_path)
    assert adapter.use_rslora and adapter.scaling == 32 / 4
    assert adapter.layer_kwargs == {"lora_rank": 16, "lora_alpha": 8.0 * 16}


def test_reads_peft_style_names(tmp_path):
    """Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2, other LoRA tensors (attention) listed and left out."""
    E, H, I, r = 2, 16, 8, 2
    a = lora_arrays(E, H, I, r, seed=7)
    names = {"gate": "w1", "up": "w3", "down": "w2"}
    tensors = {f"base_model.model.model.layers.1.block_sparse_moe.experts.{e}.{names[p]}.lora_{ab}.weight":
               a[f"{p}_{ab.lower()}"][e] for e in range(E) for p in names for ab in "AB"}
    attention = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[attention] = np.zeros((r, H), np.float32)
    moe_sft.save_safetensors(tmp_path / "adapter_model.safetensors", tensors)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 4}))
    adapter = moe_sft.load_adapter(tmp_path, dtype=ml_dtypes.bfloat16)
    assert adapter.other_keys == [attention]
    for n in NAMES:
        assert same_bits(adapter.layers[1][n], a[n].astype(ml_dtypes.bfloat16)), n
    missing = "base_model.model.model.layers.1.block_sparse_moe.experts.1.w3.lora_B.weight"
    del tensors[missing]
    moe_sft.save_safetensors(tmp_path / "adapter_model.safetensors", tensors)
    with pytest.raises(moe_sft.InvalidArgumentError, match=f"layer 1 lacks {missing} "):
        moe_sft.load_adapter(tmp_path)


# ---- bad input: an error naming the key and both shapes, nothing returned ----

def rewrite(directory, change_tensors=None, change_config=None):
    path = directory / "adapter_model.safetensors"
    f = moe_sft.SafetensorsFile(path)
    tensors = {k: np.array(f[k]) for k in f}
    del f
    if change_tensors:
        change_tensors(tensors)
    moe_sft.save_safetensors(path, tensors)
    config = json.loads((directory / "adapter_config.json").read_text())
    if change_config:
        change_config(config)
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _pop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _cfg(key, value):
    return lambda c: c.__setitem__(key, value)


BAD = {
    "missing key": ("per_expert", _pop(PER_EXPERT.format(0, 2, "up", "B")), None,
                    "layer 0 lacks " + PER_EXPERT.format(0, 2, "up", "B")),
    "wrong shape": ("per_expert", _set(PER_EXPERT.format(0, 1, "down", "A"), np.zeros((4, 23), np.float32)), None,
                    PER_EXPERT.format(0, 1, "down", "A") + " has shape [4, 23]; expected [4, 24]"),
    "rank disagrees with config": ("per_expert", None, _cfg("r", 8),
                                   PER_EXPERT.format(0, 0, "gate", "A") + " has shape [4, 32]; expected [8, 32]"),
    "fused rank disagrees": ("fused", None, _cfg("r", 3),
                             FUSED_GATE_UP.format(0, "A") + " has shape [16, 32] and " + FUSED_GATE_UP.format(0, "B")
                             + " [48, 16]; expected [E·r, in] and [out, E·r] with r = 3"),
    "fused missing B": ("fused", _pop(FUSED_DOWN.format(0, "B")), None,
                        "has " + FUSED_DOWN.format(0, "A") + " (shape [16, 24]) but lacks " + FUSED_DOWN.format(0, "B")),
    "fused B disagrees with A": ("fused", _set(FUSED_DOWN.format(0, "B"), np.zeros((32, 12), np.float32)), None,
                                 FUSED_DOWN.format(0, "A") + " has shape [16, 24] and " + FUSED_DOWN.format(0, "B")
                                 + " [32, 12]"),
    "rank_pattern": ("per_expert", None, _cfg("rank_pattern", {"down_proj": 8}), "rank_pattern = {'down_proj': 8}"),
    "dora": ("per_expert", None, _cfg("use_dora", True), "use_dora is true"),
    "not LoRA": ("per_expert", None, _cfg("peft_type", "IA3"), "peft_type is 'IA3'"),
    "bad r": ("per_expert", None, _cfg("r", 0), "r = 0; expected a positive integer"),
    "no expert tensors": ("per_expert", lambda t: t.clear(), None, "holds no routed-expert LoRA tensors"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_adapters(tmp_path, case):
    layout, change_tensors, change_config, needle = BAD[case]
    moe_sft.save_adapter(tmp_path, {0: lora_arrays(shared_a=True)}, lora_rank=4, lora_alpha=8, layout=layout)
    rewrite(tmp_path, change_tensors, change_config)
    with pytest.raises(moe_sft.InvalidArgumentError) as err:
        moe_sft.load_adapter(tmp_path)
    assert needle in str(err.value), str(err.value)


def test_missing_layer_and_files(tmp_path):
    moe_sft.save_adapter(tmp_path, {0: lora_arrays(), 2: lora_arrays()}, lora_rank=4, lora_alpha=8)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"no routed-expert LoRA for layer 7 \(it has layers \[0, 2\]\)"):
        moe_sft.load_adapter(tmp_path, layers=[0, 7])
    assert sorted(moe_sft.load_adapter(tmp_path, layers=[2]).layers) == [2]
    with pytest.raises(moe_sft.InvalidArgumentError, match="has no adapter_config.json"):
        moe_sft.load_adapter(tmp_path / "nowhere")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(moe_sft.InvalidArgumentError, match="has no adapter_model.safetensors"):
        moe_sft.load_adapter(tmp_path)


def test_bind_checks_the_layer(tmp_path):
    p = R.make_problem(4, 32, 24, 2, 4, 4)
    moe_sft.save_adapter(tmp_path, {0: lora_arrays(4, 32, 24, 4)}, lora_rank=4, lora_alpha=8)
    adapter = moe_sft.load_adapter(tmp_path)
    layer = moe_sft.MoESFT(p.gate, p.up, p.down, **adapter.layer_kwargs)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"no routed-expert LoRA for layer 1 \(it has layers \[0\]\)"):
        adapter.bind(layer, 1)
    other = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=4, lora_alpha=16)
    with pytest.raises(moe_sft.InvalidArgumentError, match="scaling lora_alpha / lora_rank = 4.0 but the adapter's is 2.0"):
        adapter.bind(other, 0)
    q = R.make_problem(4, 32, 16, 2, 4, 4)
    narrow = moe_sft.MoESFT(q.gate, q.up, q.down, **adapter.layer_kwargs)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"gate_b has shape \(4, 24, 4\) in the adapter but the "
                                                           r"layer needs \(4, 16, 4\)"):
        adapter.bind(narrow, 0)
    assert adapter.bind(layer, 0) is layer


def test_save_refuses_bad_arrays(tmp_path):
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"gate_a and up_a differ, first at \(0, 0, 0\)"):
        moe_sft.save_adapter(tmp_path, {0: lora_arrays()}, 4, 8, layout="fused")
    bad = lora_arrays()
    bad["down_b"] = bad["down_b"][:, :, :3].copy()
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"layers\[0\]\['down_b'\] has shape \(4, 32, 3\); expected "
                                                           r"\(4, 32, 4\)"):
        moe_sft.save_adapter(tmp_path, {0: bad}, 4, 8)
    with pytest.raises(moe_sft.InvalidArgumentError, match="lora_rank = 0"):
        moe_sft.save_adapter(tmp_path, {0: lora_arrays()}, 0, 8)
    with pytest.raises(moe_sft.InvalidArgumentError, match="layout = 'stacked'"):
        moe_sft.save_adapter(tmp_path, {0: lora_arrays()}, 4, 8, layout="stacked")
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"layers\[0\] lacks down_b"):
        moe_sft.save_adapter(tmp_path, {0: {n: v for n, v in lora_arrays().items() if n != "down_b"}}, 4, 8)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_check_adapter_reads_saved_adapters(tmp_path, layout):
    a = lora_arrays(shared_a=True)
    a["down_b"][2, 5, 1] = np.nan
    moe_sft.save_adapter(tmp_path, {6: a}, lora_rank=4, lora_alpha=8, layout=layout)
    report = moe_sft.check_adapter(tmp_path / "adapter_model.safetensors")
    (bad,) = report.bad_tensors
    assert (bad.component, bad.layer, bad.projection, bad.which) == ("routed_experts", 6, "down", "lora_B")
    if layout == "per_expert":
        assert bad.name == PER_EXPERT.format(6, 2, "down", "B") and bad.expert == 2 and bad.first_bad_index == (5, 1)
    else:  # B [H, r·E]: column j·E + e
        assert bad.name == FUSED_DOWN.format(6, "B") and bad.first_bad_index == (5, 1 * 4 + 2)
