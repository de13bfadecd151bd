"""gpt-oss's expert (moe_sft_activation SWIGLU_CLAMPED and the config's bias fields): forward and every grad against
the float64 reference of the clamped activation with biases (reference.py) on problems where both clamps are active
on part of the elements, for every kernel family, tp_count 1-3, LoRA f32/bf16 and the quantized formats made at
create; MoESFT.from_gpt_oss against the library's own layout; the config struct across its published sizes; every
bad activation parameter, bias and layout refused with a message naming it, nothing written."""
import dataclasses

import numpy as np
import pytest

import abi
import moe_sft
import reference as R
from conftest import assert_matches_reference, bind_lora, make_layer, run_layer

E, H, I, K, T, RANK = 5, 72, 80, 2, 24, 8  # I = 80: a partial 64-column block; tp 3 splits it unevenly


def clamped_problem(seed=0, **kwargs):
    p = R.make_gpt_oss_problem(E, H, I, K, T, RANK, seed=seed, **kwargs)
    gate_clamped, up_clamped, margin = R.clamp_stats(p)
    # both clamps active on part of the elements, and no element within rounding of a clamp's edge
    assert 0.1 < gate_clamped < 0.9 and 0.1 < up_clamped < 0.9, (gate_clamped, up_clamped)
    assert margin > 0.25, margin
    return p


@pytest.mark.parametrize("tp_count", [1, 2, 3])
@pytest.mark.parametrize("lora_dtype", [np.float32, R.bf16])
def test_clamped_swiglu_matches_reference(isa, tp_count, lora_dtype):
    p = clamped_problem(seed=tp_count, lora_dtype=lora_dtype)
    with make_layer(p, tp_count=tp_count) as layer:
        assert layer.activation == "swiglu_clamped" and layer.swiglu_limit == 7.0
        out, grads = run_layer(layer, p)
    assert_matches_reference(p, out, grads)


@pytest.mark.parametrize("weight_format, group_size", [("int8", None), ("int4_awq", 8)])
def test_clamped_swiglu_on_quantized_weights(isa, weight_format, group_size):
    """Quantized at create from p's bf16 weights: the reference runs on the weights the numpy formats (reference.py)
    encode."""
    p = clamped_problem(seed=7)
    group = group_size or 0
    ref = dataclasses.replace(p, **{n: R.dequantize(weight_format, *R.quantize(weight_format, getattr(p, n), group))
                                    for n in ("gate", "up", "down")})
    assert R.clamp_stats(ref)[2] > 0.25
    with make_layer(p, weight_format=weight_format, group_size=group_size, tp_count=2) as layer:
        out, grads = run_layer(layer, ref)
    assert_matches_reference(ref, out, grads, weight_format=weight_format)


def test_parameters_and_biases_are_used():
    """Another alpha, another limit and each bias alone move the output: none is ignored, and the reference follows
    each (a limit of 2 clamps elements the default 7 does not)."""
    p = clamped_problem(seed=3)
    variants = {"alpha": dataclasses.replace(p, activation=R.Activation("swiglu_clamped", 1.0, 7.0)),
                "limit": dataclasses.replace(p, activation=R.Activation("swiglu_clamped", 1.702, 2.0))}
    for name in p.biases:
        variants[name] = dataclasses.replace(p, biases={n: b for n, b in p.biases.items() if n != name})
    with make_layer(p) as layer:
        base = layer.forward(p.x, p.ids, p.weights)
    for name, q in variants.items():
        with make_layer(q) as layer:
            out, grads = run_layer(layer, q)
        assert not np.array_equal(out, base), name
        if name != "limit":  # limit 2 puts elements near its edge: checked by the reference below only in aggregate
            assert_matches_reference(q, out, grads)
        else:
            assert R.rel_err(out, R.forward(q)) < 1e-2


def test_silu_with_biases(isa):
    """Biases are independent of the activation: SiLU with all three."""
    p = R.make_problem(E, H, I, K, T, RANK, seed=5)
    p.biases = {n: b for n, b in R.make_gpt_oss_problem(E, H, I, K, T, RANK, seed=5).biases.items()}
    p.biases["gate_bias"] = p.biases["gate_bias"] / 14  # O(1) for SiLU
    p.biases["up_bias"] = p.biases["up_bias"] / 14
    with make_layer(p, tp_count=2) as layer:
        out, grads = run_layer(layer, p)
    assert_matches_reference(p, out, grads)


def gpt_oss_layout(p):
    """p's experts as transformers' GptOssExperts holds them."""
    gate_up = np.empty((E, H, 2 * I), R.bf16)
    gate_up[:, :, 0::2] = p.gate.transpose(0, 2, 1)
    gate_up[:, :, 1::2] = p.up.transpose(0, 2, 1)
    bias = np.empty((E, 2 * I), np.float32)
    bias[:, 0::2], bias[:, 1::2] = p.biases["gate_bias"], p.biases["up_bias"]
    return gate_up, np.ascontiguousarray(p.down.transpose(0, 2, 1)), bias, p.biases["down_bias"]


def test_from_gpt_oss_is_the_library_layout():
    """from_gpt_oss on Transformers' layout (bf16 given as uint16 bits, as a torch tensor's .view(torch.uint16)
    gives them) is the layer made from the library's own layout."""
    p = clamped_problem(seed=11)
    p.biases = {n: b.astype(R.bf16).astype(np.float32) for n, b in p.biases.items()}
    as_bits = [a.astype(R.bf16).view(np.uint16) for a in gpt_oss_layout(p)]
    with make_layer(p) as want, moe_sft.MoESFT.from_gpt_oss(*as_bits, lora_rank=RANK, lora_alpha=p.alpha) as got:
        assert (got.activation, got.swiglu_alpha, got.swiglu_limit) == ("swiglu_clamped", 1.702, 7.0)
        got.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
        a, ga = run_layer(want, p)
        b, gb = run_layer(got, p)
    assert np.array_equal(a, b)
    for name in ("input", "routing_weights") + R.LORA_NAMES:
        assert np.array_equal(getattr(ga, name), getattr(gb, name)), name


# ---- bad input ----

def bad(match, **kwargs):
    p = R.make_problem(2, 16, 16, 1, 1, 0)
    with pytest.raises(moe_sft.InvalidArgumentError, match=match):
        moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=0, **kwargs)


@pytest.mark.parametrize("field", ["swiglu_alpha", "swiglu_limit"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), 1e39, "7"])
def test_bad_activation_parameter(field, value):
    bad(rf"{field} = .*(finite float32 > 0|not a number)", activation="swiglu_clamped", **{field: value})


def test_bad_activation_arguments():
    bad(r"activation = 'gelu'; expected one of 'silu', 'swiglu_clamped'", activation="gelu")
    bad(r"swiglu_limit = 7.0 is given but activation = 'silu' does not read it", swiglu_limit=7.0)


@pytest.mark.parametrize("name, value, match", [
    ("gate_bias", np.zeros((2, 15), np.float32), r"gate_bias has shape \(2, 15\); expected \(2, 16\)"),
    ("up_bias", np.zeros((16,), np.float32), r"up_bias has shape \(16,\); expected \(2, 16\)"),
    ("down_bias", np.zeros((2, 16), np.int32), r"down_bias has dtype int32; expected a float type"),
    ("gate_bias", np.zeros((2, 16), np.uint8), r"gate_bias has dtype uint8; expected a float type"),
])
def test_bad_bias(name, value, match):
    bad(match, **{name: value})


def test_bad_gpt_oss_layout():
    p = clamped_problem()
    gate_up, down, gate_up_bias, down_bias = gpt_oss_layout(p)
    cases = [((gate_up[:, :, :-1], down, gate_up_bias, down_bias), r"gate_up_proj has shape \(5, 72, 159\)"),
             ((gate_up, down.transpose(0, 2, 1), gate_up_bias, down_bias), r"down_proj has shape \(5, 72, 80\)"),
             ((gate_up, down, gate_up_bias[:, :I], down_bias), r"gate_up_proj_bias has shape \(5, 80\)"),
             ((gate_up, down, gate_up_bias, down_bias[:, :-1]), r"down_proj_bias has shape \(5, 71\)")]
    for args, match in cases:
        with pytest.raises(moe_sft.InvalidArgumentError, match=match):
            moe_sft.MoESFT.from_gpt_oss(*args, lora_rank=0)


def test_non_finite_bias_with_check_finite():
    p = clamped_problem()
    biases = {n: b.copy() for n, b in p.biases.items()}
    biases["up_bias"][3, 17] = np.nan
    with pytest.raises(moe_sft.NonFiniteError, match=r"nan in up_bias at expert 3, column 17"):
        moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=0, activation="swiglu_clamped", check_finite=True, **biases)


# ---- the raw config struct ----

ffi, lib = abi.ffi, abi.lib


def raw_config(p, **fields):
    """A config for p's weights through cffi (the arrays are kept alive on the returned object)."""
    cfg = ffi.new("moe_sft_config *")
    lib.moe_sft_config_init(cfg)
    keep = [np.ascontiguousarray(a.view(np.uint16)) for a in (p.gate, p.up, p.down)]
    cfg.expert_num, cfg.hidden_size, cfg.intermediate_size, cfg.lora_rank = E, H, I, 0
    cfg.gate_proj, cfg.up_proj, cfg.down_proj = (ffi.cast("const void *", a.ctypes.data) for a in keep)
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            keep.append(value)
            value = ffi.cast("const float *", value.ctypes.data)
        setattr(cfg, name, value)
    return cfg, keep


def raw_create(cfg):
    out = ffi.new("moe_sft_layer **", ffi.cast("moe_sft_layer *", 1))
    status = lib.moe_sft_create(cfg, out)
    return status, out[0], ffi.string(lib.moe_sft_last_error()).decode()


def raw_forward(layer, p):
    out = np.zeros((T, H), np.uint16)
    ids, w, x = p.ids, p.weights, p.x.view(np.uint16)
    status = lib.moe_sft_forward(layer, T, K, ffi.cast("const int64_t *", ids.ctypes.data),
                                 ffi.cast("const float *", w.ctypes.data), ffi.cast("const uint16_t *", x.ctypes.data),
                                 ffi.cast("uint16_t *", out.ctypes.data), 0)
    assert status == abi.OK
    return out


def test_config_defaults_and_names():
    cfg = ffi.new("moe_sft_config *")
    lib.moe_sft_config_init(cfg)
    assert cfg.activation == lib.MOE_SFT_ACTIVATION_SILU
    assert cfg.swiglu_alpha == np.float32(1.702) and cfg.swiglu_limit == 7.0
    assert cfg.gate_bias == ffi.NULL and cfg.up_bias == ffi.NULL and cfg.down_bias == ffi.NULL
    for enumerator, code in abi.enum("moe_sft_activation").items():
        assert ffi.string(lib.moe_sft_activation_name(code)).decode() == enumerator[len("MOE_SFT_ACTIVATION_"):].lower()
    assert lib.moe_sft_activation_name(ffi.cast("moe_sft_activation", 2)) == ffi.NULL


def test_older_struct_sizes_keep_silu_and_no_biases():
    """A caller built against an older header passes a shorter struct: whatever lies beyond it (here: a clamped
    activation, a bad limit and a bias pointer) is not read, and the layer is the SiLU one without biases."""
    p = R.make_problem(E, H, I, K, T, 0, seed=2)
    with make_layer(p) as layer:
        want = layer.forward(p.x, p.ids, p.weights).view(np.uint16)
    pointer = ffi.sizeof("void *")
    sizes = [ffi.offsetof("moe_sft_config", "down_proj") + pointer,
             -(-(ffi.offsetof("moe_sft_config", "check_finite") + 4) // pointer) * pointer,
             ffi.offsetof("moe_sft_config", "down_zero") + pointer]
    junk = np.full((E, I), np.nan, np.float32)
    for size in sizes:
        cfg, keep = raw_config(p, activation=lib.MOE_SFT_ACTIVATION_SWIGLU_CLAMPED, swiglu_limit=-1.0,
                               gate_bias=junk)
        cfg.struct_size = size
        status, layer, message = raw_create(cfg)
        assert status == abi.OK, (size, message)
        try:
            assert np.array_equal(raw_forward(layer, p), want), size
        finally:
            lib.moe_sft_destroy(layer)


@pytest.mark.parametrize("field, value, status, match", [
    ("activation", 2, abi.INVALID, "cfg->activation = 2 is not a moe_sft_activation"),
    ("swiglu_alpha", 0.0, abi.INVALID, "cfg->swiglu_alpha = 0 with activation swiglu_clamped"),
    ("swiglu_limit", -7.0, abi.INVALID, "cfg->swiglu_limit = -7 with activation swiglu_clamped"),
    ("swiglu_limit", float("nan"), abi.INVALID, "cfg->swiglu_limit = nan with activation swiglu_clamped"),
    ("swiglu_alpha", float("inf"), abi.INVALID, "cfg->swiglu_alpha = inf with activation swiglu_clamped"),
])
def test_raw_bad_activation(field, value, status, match):
    p = R.make_problem(E, H, I, K, T, 0)
    fields = {"activation": lib.MOE_SFT_ACTIVATION_SWIGLU_CLAMPED, field: value}
    if field == "activation":
        fields[field] = ffi.cast("moe_sft_activation", value)
    cfg, keep = raw_config(p, **fields)
    got, layer, message = raw_create(cfg)
    assert (got, layer) == (status, ffi.NULL) and match in message, message


def test_raw_misaligned_bias():
    p = R.make_problem(E, H, I, K, T, 0)
    cfg, keep = raw_config(p)
    backing = np.zeros(E * H + 1, np.float32)
    cfg.down_bias = ffi.cast("const float *", backing.ctypes.data + 2)
    got, layer, message = raw_create(cfg)
    assert (got, layer) == (abi.INVALID, ffi.NULL) and "cfg->down_bias (address" in message, message


# ---- against transformers' own GptOssExperts ----

def gpt_oss_experts(p):
    """transformers' GptOssExperts (float32, eager) holding p's weights and biases."""
    torch = pytest.importorskip("torch", reason="the comparison with transformers needs torch")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss",
                                  reason="the comparison needs transformers with gpt-oss (>= 4.55)")
    from transformers import GptOssConfig
    config = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                          swiglu_limit=p.activation.limit, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, vocab_size=16)
    config._experts_implementation = "eager"
    experts = gpt_oss.GptOssExperts(config).float()
    assert experts.alpha == p.activation.alpha and experts.limit == p.activation.limit
    gate_up, down, gate_up_bias, down_bias = gpt_oss_layout(p)
    with torch.no_grad():
        for name, a in (("gate_up_proj", gate_up), ("down_proj", down), ("gate_up_proj_bias", gate_up_bias),
                        ("down_proj_bias", down_bias)):
            getattr(experts, name).copy_(torch.from_numpy(np.asarray(a, np.float32)))
    return torch, experts


def test_matches_transformers_gpt_oss_experts():
    """Forward, grad_input and the routing weights' grads against transformers' GptOssExperts in float32 (the
    library rounds to bf16 where its contract says: within 1e-2), on a problem with both clamps active."""
    p = clamped_problem(seed=13)
    p = dataclasses.replace(p, lora={})
    torch, experts = gpt_oss_experts(p)
    x = torch.tensor(R.f64(p.x), dtype=torch.float32, requires_grad=True)
    w = torch.tensor(p.weights, requires_grad=True)
    want = experts(x, torch.from_numpy(p.ids), w)
    want.backward(torch.from_numpy(R.f64(p.grad_out)).float())
    with moe_sft.MoESFT.from_gpt_oss(*gpt_oss_layout(p), lora_rank=0) as layer:
        out = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
        grads = layer.backward(p.grad_out)
    for name, got, ref in (("output", out, want), ("input", grads.input, x.grad),
                           ("routing_weights", grads.routing_weights, w.grad)):
        assert R.rel_err(got, ref.detach().double().numpy()) < 1e-2, name


# ---- PEFT adapters of gpt-oss (target_parameters on the experts' 3-D gate_up_proj and down_proj) ----

def peft_gpt_oss(p, tmp_path):
    """A tiny GptOssForCausalLM with p's experts, wrapped by PEFT with random LoRA on gate_up_proj and down_proj,
    and its adapter saved in tmp_path/peft: (torch, the PEFT model, its experts module, the base model factory)."""
    torch = pytest.importorskip("torch", reason="the PEFT round trip needs torch")
    peft = pytest.importorskip("peft", reason="the PEFT round trip needs peft")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip("transformers has no gpt-oss (>= 4.55 needed)")

    def base_model():
        config = transformers.GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=K, swiglu_limit=p.activation.limit,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=8, vocab_size=16)
        config._experts_implementation = "eager"
        model = transformers.GptOssForCausalLM(config).float()
        experts = model.model.layers[0].mlp.experts
        with torch.no_grad():
            for name, a in zip(("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"), gpt_oss_layout(p)):
                getattr(experts, name).copy_(torch.from_numpy(np.asarray(a, np.float32)))
        return model

    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(base_model(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:  # O(1) LoRA terms, as the reference's problems have
                param.copy_(torch.randn_like(param) / np.sqrt(param.shape[1]))
    model.save_pretrained(tmp_path / "peft")
    return torch, model, model.base_model.model.model.layers[0].mlp.experts, base_model


def test_peft_gpt_oss_adapter_round_trip(tmp_path):
    """PEFT's gpt-oss adapter, loaded with load_adapter(gpt_oss=True) into MoESFT.from_gpt_oss, gives PEFT's own
    experts' output; save_adapter(gpt_oss=True) writes it back in a form PEFT loads to the same model. Read as a
    non-gpt-oss fused adapter (gate and up concatenated), it gives another output: the flag is what makes it right."""
    peft = pytest.importorskip("peft")
    p = clamped_problem(seed=17)
    torch, model, experts, base_model = peft_gpt_oss(p, tmp_path)
    x = torch.tensor(R.f64(p.x), dtype=torch.float32)
    with torch.no_grad():
        want = experts(x, torch.from_numpy(p.ids), torch.from_numpy(p.weights)).double().numpy()

    def layer_output(adapter):
        with moe_sft.MoESFT.from_gpt_oss(*gpt_oss_layout(p), **adapter.layer_kwargs) as layer:
            adapter.bind(layer, 0)
            return layer.forward(p.x, p.ids, p.weights)

    adapter = moe_sft.load_adapter(tmp_path / "peft", gpt_oss=True)
    assert adapter.layout == "fused" and adapter.layers[0]["gate_a"] is adapter.layers[0]["up_a"]
    assert R.rel_err(layer_output(adapter), want) < 1e-2
    wrong = moe_sft.load_adapter(tmp_path / "peft")  # read as transformers 5's concatenated gate_up_proj
    assert R.rel_err(layer_output(wrong), want) > 0.1

    moe_sft.save_adapter(tmp_path / "ours", adapter, adapter.rank, adapter.alpha, gpt_oss=True)
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "ours")
    with torch.no_grad():
        again = reloaded.base_model.model.model.layers[0].mlp.experts(
            x, torch.from_numpy(p.ids), torch.from_numpy(p.weights)).double().numpy()
    assert np.allclose(again, want, rtol=1e-6, atol=1e-6)


def test_gpt_oss_adapter_layout_refused(tmp_path):
    p = clamped_problem()
    lora = {n: a for n, a in p.lora.items()}
    lora["up_a"] = lora["gate_a"]
    with pytest.raises(moe_sft.InvalidArgumentError, match="layout = 'per_expert' with gpt_oss=True"):
        moe_sft.save_adapter(tmp_path / "a", {0: lora}, RANK, 16, layout="per_expert", gpt_oss=True)
    moe_sft.save_adapter(tmp_path / "b", {0: lora}, RANK, 16)  # per expert
    with pytest.raises(moe_sft.InvalidArgumentError, match="gpt_oss=True, but layer 0 has per-expert LoRA"):
        moe_sft.load_adapter(tmp_path / "b", gpt_oss=True)


# ---- gpt-oss checkpoints (the dequantized bf16 releases' keys) ----

def write_gpt_oss_checkpoint(directory, p, layer=1, limit=7.0, drop=(), replace=None):
    """A gpt-oss checkpoint directory holding p's experts as layer ``layer`` (and a router, attention around them)."""
    gate_up, down, gate_up_bias, down_bias = gpt_oss_layout(p)
    pre = f"model.layers.{layer}."
    tensors = {pre + "mlp.router.weight": np.ones((E, H), R.bf16), pre + "mlp.router.bias": np.ones(E, R.bf16),
               pre + "self_attn.q_proj.weight": np.ones((H, H), R.bf16),
               pre + "mlp.experts.gate_up_proj": gate_up, pre + "mlp.experts.gate_up_proj_bias": gate_up_bias.astype(R.bf16),
               pre + "mlp.experts.down_proj": down, pre + "mlp.experts.down_proj_bias": down_bias.astype(R.bf16)}
    for key in drop:
        del tensors[pre + key]
    tensors.update({pre + k: v for k, v in (replace or {}).items()})
    directory.mkdir()
    (directory / "config.json").write_text(
        '{"model_type": "gpt_oss", "num_local_experts": %d, "hidden_size": %d, "intermediate_size": %d, '
        '"swiglu_limit": %r}' % (E, H, I, limit))
    moe_sft.save_safetensors(directory / "model.safetensors", tensors)
    return directory


def test_gpt_oss_checkpoint(tmp_path):
    """load_experts reads gpt-oss's keys (biases as the checkpoint rounds them, bf16) into the layer from_gpt_oss
    makes; swiglu_limit comes from config.json."""
    p = clamped_problem(seed=19)
    p.biases = {n: b.astype(R.bf16).astype(np.float32) for n, b in p.biases.items()}  # as the checkpoint holds them
    directory = write_gpt_oss_checkpoint(tmp_path / "ckpt", p, limit=6.5)
    weights = moe_sft.load_experts(directory, 1)
    assert (weights.layout, weights.weight_format, weights.experts, weights.hidden_size,
            weights.intermediate_size) == ("gpt_oss", "bf16", E, H, I)
    assert weights.model_kwargs["swiglu_limit"] == 6.5 and weights.model_kwargs["swiglu_alpha"] == 1.702
    with moe_sft.MoESFT.from_checkpoint(directory, 1, lora_rank=RANK, lora_alpha=p.alpha) as got, \
            moe_sft.MoESFT.from_gpt_oss(*gpt_oss_layout(p), swiglu_limit=6.5, lora_rank=RANK,
                                        lora_alpha=p.alpha) as want:
        assert got.activation == "swiglu_clamped" and got.swiglu_limit == 6.5
        outs = []
        for layer in (got, want):
            layer.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
            out, grads = run_layer(layer, p)
            outs.append((out, grads.input, grads.routing_weights, grads.gate_b, grads.up_a))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


def test_gpt_oss_checkpoint_expert_selection(tmp_path):
    """load_experts(experts=...) on a gpt-oss checkpoint (bf16 and MXFP4) holds exactly those experts, biases
    included, in the order asked: the same arrays as the whole layer's rows."""
    directory = write_gpt_oss_checkpoint(tmp_path / "bf16", clamped_problem(seed=29))
    _, tensors, _ = mxfp4_gpt_oss()
    mx = tmp_path / "mxfp4"
    mx.mkdir()
    (mx / "config.json").write_text('{"model_type": "gpt_oss"}')
    moe_sft.save_safetensors(mx / "model.safetensors", {f"model.layers.1.mlp.experts.{k}": v for k, v in tensors.items()})
    for path in (directory, mx):
        whole = moe_sft.load_experts(path, 1)
        sel = [whole.experts - 1, 0]
        part = moe_sft.load_experts(path, 1, experts=sel)
        assert (part.experts, part.total_experts, part.expert_ids) == (2, whole.experts, tuple(sel))
        for name in ("gate_proj", "up_proj", "down_proj"):
            w, p_ = getattr(whole, name), getattr(part, name)
            for a, b in (zip(w[2:4], p_[2:4]) if part.weight_format == "mxfp4" else [(w, p_)]):
                assert np.array_equal(np.asarray(a)[sel], b)
        for name in ("gate_bias", "up_bias", "down_bias"):
            assert np.array_equal(whole.model_kwargs[name][sel], part.model_kwargs[name])


@pytest.mark.parametrize("drop, replace, match", [
    (("mlp.experts.down_proj_bias",), None, r"lacks model\.layers\.1\.mlp\.experts\.down_proj_bias"),
    ((), {"mlp.experts.gate_up_proj_bias": np.zeros((E, I), R.bf16)},
     r"gate_up_proj_bias has shape \[5, 80\]; expected \[5, 160\]"),
    ((), {"mlp.experts.down_proj": np.zeros((E, H, I), R.bf16)},
     r"down_proj has shape \[5, 72, 80\]; expected \[5, 80, 72\]"),
    ((), {"mlp.experts.gate_up_proj": np.zeros((E, H, 2 * I + 1), R.bf16)},
     r"gate_up_proj has shape \[5, 72, 161\]; expected gpt-oss's \[E, H, 2I\]"),
])
def test_bad_gpt_oss_checkpoint(tmp_path, drop, replace, match):
    directory = write_gpt_oss_checkpoint(tmp_path / "ckpt", clamped_problem(), drop=drop, replace=replace)
    with pytest.raises(moe_sft.InvalidArgumentError, match=match):
        moe_sft.load_experts(directory, 1)


# ---- gpt-oss MXFP4 (the original release's *_blocks / *_scales) ----

def mxfp4_gpt_oss(seed=23):
    """(a clamped problem with H, I multiples of 32, its gpt-oss MXFP4 tensors {name: array} in the checkpoint's
    orientation, the problem on the weights they encode)."""
    p = R.make_gpt_oss_problem(4, 64, 96, 2, 20, 4, seed=seed)
    gate_up_rows = np.empty((4, 192, 64), R.bf16)  # [E, 2I, H]: rows are outputs, interleaved
    gate_up_rows[:, 0::2], gate_up_rows[:, 1::2] = p.gate, p.up
    q_gu, q_dn = moe_sft.quantize(gate_up_rows, "mxfp4"), moe_sft.quantize(p.down, "mxfp4")
    decoded_gu = moe_sft.dequantize(q_gu)
    ref = dataclasses.replace(p, gate=decoded_gu[:, 0::2], up=decoded_gu[:, 1::2], down=moe_sft.dequantize(q_dn))
    _, up_clamped, margin = R.clamp_stats(ref)
    assert margin > 0.25 and 0.1 < up_clamped < 0.9
    bias = np.empty((4, 192), np.float32)
    bias[:, 0::2], bias[:, 1::2] = p.biases["gate_bias"], p.biases["up_bias"]
    tensors = {"gate_up_proj_blocks": q_gu.weights.reshape(4, 192, 2, 16), "gate_up_proj_scales": q_gu.scale,
               "down_proj_blocks": q_dn.weights.reshape(4, 64, 3, 16), "down_proj_scales": q_dn.scale,
               "gate_up_proj_bias": bias, "down_proj_bias": p.biases["down_bias"]}
    return p, tensors, ref


def test_gpt_oss_mxfp4_checkpoint(tmp_path, isa):
    """The original release's layout: load_experts keeps the MXFP4 bytes (uint8 arrays only: no bf16 copy), and the
    layer matches the float64 reference on the weights they encode; from_gpt_oss on the same QuantizedWeight (as
    transformers' Mxfp4GptOssExperts holds them) gives the same layer."""
    p, tensors, ref = mxfp4_gpt_oss()
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "gpt_oss", "swiglu_limit": 7.0, '
                                           '"quantization_config": {"quant_method": "mxfp4"}}')
    moe_sft.save_safetensors(directory / "model.safetensors",
                             {f"model.layers.0.mlp.experts.{k}": v for k, v in tensors.items()})
    weights = moe_sft.load_experts(directory, 0)
    assert (weights.weight_format, weights.layout, weights.source_dtype) == ("mxfp4", "gpt_oss", "mxfp4")
    assert all(a.dtype == np.uint8 for q in (weights.gate_proj, weights.up_proj, weights.down_proj) for a in q[2:4])
    with weights.create_layer(lora_rank=p.rank, lora_alpha=p.alpha, tp_count=2) as layer:
        assert (layer.weight_format, layer.activation) == ("mxfp4", "swiglu_clamped")
        out, grads = run_layer(bind_lora(layer, ref), ref)
    assert_matches_reference(ref, out, grads)
    quantized = [moe_sft.QuantizedWeight("mxfp4", 32, tensors[f"{n}_blocks"], tensors[f"{n}_scales"], None)
                 for n in ("gate_up_proj", "down_proj")]
    with moe_sft.MoESFT.from_gpt_oss(*quantized, tensors["gate_up_proj_bias"], tensors["down_proj_bias"],
                                     lora_rank=p.rank, lora_alpha=p.alpha, tp_count=2) as layer:
        again, again_grads = run_layer(bind_lora(layer, ref), ref)
    assert np.array_equal(out, again) and np.array_equal(grads.input, again_grads.input)


def test_bad_gpt_oss_mxfp4(tmp_path):
    _, tensors, _ = mxfp4_gpt_oss()
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "gpt_oss"}')
    tensors["down_proj_scales"] = tensors["down_proj_scales"][:, :, :2].copy()
    moe_sft.save_safetensors(directory / "model.safetensors",
                             {f"model.layers.0.mlp.experts.{k}": v for k, v in tensors.items()})
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"down_proj_scales has shape \[4, 64, 2\]; expected "
                                                           r"\[4, 64, 3\]"):
        moe_sft.load_experts(directory, 0)
    q = moe_sft.QuantizedWeight("mxfp4", 32, tensors["gate_up_proj_blocks"], tensors["gate_up_proj_scales"], None)
    dn = moe_sft.QuantizedWeight("mxfp4", 32, tensors["down_proj_blocks"], tensors["down_proj_scales"], None)
    with pytest.raises(moe_sft.InvalidArgumentError, match="down_proj has weights uint8"):
        moe_sft.MoESFT.from_gpt_oss(q, dn, lora_rank=0)


def test_gradient_at_the_clamps_edges():
    """torch.clamp's convention: at g == limit and u == +-limit exactly the gradient passes, one bf16 step beyond it
    is zero. Zero base weights and B make g = gate_bias and u = up_bias exactly, and the LoRA B grads (s dG^T (x A^T))
    show whether dG and dU passed."""
    E_, H_, I_, r = 1, 16, 8, 2
    step = 2.0 ** -5  # bf16's spacing at 7
    gate_bias = np.array([[7.0, 7.0 + step, 6.0, -3.0, 7.0, 0.5, 7.0 + step, 1.0]], np.float32)
    up_bias = np.array([[7.0, -7.0, 7.0 + step, -7.0 - step, 0.0, -0.5, 3.0, 7.0]], np.float32)
    rng = np.random.default_rng(0)
    zeros = np.zeros((E_, I_, H_), R.bf16)
    lora = {"gate_a": rng.standard_normal((E_, r, H_)).astype(np.float32), "gate_b": np.zeros((E_, I_, r), np.float32),
            "up_a": rng.standard_normal((E_, r, H_)).astype(np.float32), "up_b": np.zeros((E_, I_, r), np.float32),
            "down_a": rng.standard_normal((E_, r, I_)).astype(np.float32),
            "down_b": rng.standard_normal((E_, H_, r)).astype(np.float32)}
    x = rng.standard_normal((2, H_)).astype(R.bf16)
    with moe_sft.MoESFT(zeros, zeros, np.zeros((E_, H_, I_), R.bf16), lora_rank=r, lora_alpha=r,
                        activation="swiglu_clamped", gate_bias=gate_bias, up_bias=up_bias) as layer:
        layer.update_lora(**lora)
        layer.forward(x, np.zeros((2, 1), np.int64), np.ones((2, 1), np.float32), save_for_backward=True)
        grads = layer.backward(rng.standard_normal((2, H_)).astype(R.bf16))
    gate_passes = np.abs(grads.gate_b[0]).sum(axis=1) > 0
    up_passes = np.abs(grads.up_b[0]).sum(axis=1) > 0
    assert gate_passes.tolist() == [True, False, True, True, True, True, False, True]
    assert up_passes.tolist() == [True, True, False, False, True, True, True, True]


def test_mxfp4_orientation_is_transformers():
    """transformers' own MXFP4 dequantization (integrations.mxfp4.convert_moe_packed_tensors, what it runs on the
    original release) of the blocks gives exactly gpt_oss_layout of the weights the library's reading encodes: the
    nibble order, the e8m0 scale, the [E, N, K] -> [E, K, N] orientation and the interleave agree."""
    torch = pytest.importorskip("torch", reason="the comparison with transformers needs torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4", reason="transformers without MXFP4 support")
    _, tensors, ref = mxfp4_gpt_oss()
    decoded = {n: mxfp4.convert_moe_packed_tensors(torch.from_numpy(tensors[f"{n}_blocks"]),
                                                   torch.from_numpy(tensors[f"{n}_scales"]),
                                                   dtype=torch.float32).numpy()
               for n in ("gate_up_proj", "down_proj")}
    assert np.array_equal(decoded["gate_up_proj"][:, :, 0::2], ref.gate.transpose(0, 2, 1))
    assert np.array_equal(decoded["gate_up_proj"][:, :, 1::2], ref.up.transpose(0, 2, 1))
    assert np.array_equal(decoded["down_proj"], ref.down.transpose(0, 2, 1))
