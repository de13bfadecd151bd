"""moe_sft.hf against the real Transformers and PEFT: tiny random models of every family whose experts
Transformers 5 fuses, compared in float32 with Transformers' own "eager" experts carrying PEFT's LoRA
(target_parameters on mlp.experts.gate_up_proj / down_proj). moe_sft computes in bf16, so values agree to bf16
rounding (the bounds below are a few bf16 ulps of the tensors' scale).

A token whose router sees two experts almost tied can pick another expert when the hidden state differs by
that rounding (a discontinuity, not an error): the tests comparing grads use models with one routed layer,
whose router input is computed identically by both sides, and the checks of models with two routed layers
bound the logits per token, allowing a few tokens to route differently."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", minversion="5", reason="needs transformers>=5 (pip install 'moe_sft[hf]')")
peft = pytest.importorskip("peft", minversion="0.19.1", reason="needs peft>=0.19.1 (pip install 'moe_sft[hf]')")

import moe_sft  # noqa: E402
import moe_sft.hf as mh  # noqa: E402

E, R, ALPHA = 8, 4, 8
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
_COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)


def make_config(family, routed="all"):
    """A tiny config of each family: 8 experts, top-2, 2 layers; shared experts where the family has them.
    routed="one": a single routed-experts layer, fed by torch-only layers (one layer for Mixtral and OLMoE,
    whose layers are all MoE)."""
    t = transformers
    one = routed == "one"
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=48,
                                shared_expert_intermediate_size=64, num_experts=E, num_experts_per_tok=2,
                                mlp_only_layers=[1] if one else [])
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=48, num_experts=E,
                                num_experts_per_tok=2, mlp_only_layers=[1] if one else [])
    if family == "deepseek_v2":
        return t.DeepseekV2Config(**_COMMON, **_MLA, intermediate_size=96, moe_intermediate_size=48,
                                  n_routed_experts=E, num_experts_per_tok=2, n_shared_experts=1,
                                  first_k_dense_replace=int(one), q_lora_rank=None)
    if family == "deepseek_v3":  # sigmoid router with correction bias; layer 0 dense
        return t.DeepseekV3Config(**{**_COMMON, "num_hidden_layers": 2 if one else 3, "head_dim": 8}, **_MLA,
                                  intermediate_size=96, moe_intermediate_size=48, n_routed_experts=E,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32)
    if family == "mixtral":
        return t.MixtralConfig(**{**_COMMON, "num_hidden_layers": 1 if one else 2}, intermediate_size=48,
                               num_local_experts=E, num_experts_per_tok=2)
    if family == "olmoe":
        return t.OlmoeConfig(**{**_COMMON, "num_hidden_layers": 1 if one else 2}, intermediate_size=48,
                             num_experts=E, num_experts_per_tok=2)
    if family == "glm4_moe":
        return t.Glm4MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=48, n_routed_experts=E,
                               num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=int(one))
    raise AssertionError(family)


FAMILIES = ["qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "mixtral", "olmoe", "glm4_moe"]


def base_model(family, routed="all", seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, routed), experts_implementation="eager")
    with torch.no_grad():  # O(1) activations through the experts (their init is tiny) and a non-trivial router
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.normal_(0, p.shape[-1] ** -0.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    return model.eval()


def peft_reference(model, tmp_path, attention=False):
    """PEFT LoRA on the fused experts (and on q_proj / v_proj with ``attention``) with random B (PEFT's init
    leaves B zero, which would test nothing), saved by PEFT into tmp_path/"peft"."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGETS,
                             target_modules=["q_proj", "v_proj"] if attention else None)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(str(tmp_path / "peft"))
    return pm


def moe_sft_model(model, tmp_path, **lora_kwargs):
    ours = copy.deepcopy(model)
    params = mh.add_lora(ours, R, ALPHA, **lora_kwargs)
    mh.load_adapter(ours, str(tmp_path / "peft"))
    return ours, params


def batch(seed=0, T=24):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (2, T // 2), generator=gen)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_logits_close(got, want, routing_flips=0):
    """Every token's logits within 2e-2 of the largest logit, but for at most ``routing_flips`` tokens."""
    per_token = (got - want).abs().amax(-1).flatten()
    bad = int((per_token > 2e-2 * want.abs().max()).sum())
    assert bad <= routing_flips, f"{bad} of {per_token.numel()} tokens differ; worst {per_token.max().item():.3g}"


def peft_grads(pm, module_name):
    """The grads of PEFT's fused LoRA of ``module_name`` as moe_sft's six [E, ...] arrays."""
    p = dict(pm.named_parameters())
    pre = f"base_model.model.{module_name}."
    A_gu = p[pre + "base_layer.lora_A.default.weight"].grad
    B_gu = p[pre + "base_layer.lora_B.default.weight"].grad
    A_d, B_d = p[pre + "lora_A.default.weight"].grad, p[pre + "lora_B.default.weight"].grad
    B_gu = B_gu.reshape(B_gu.shape[0], R, E).permute(2, 0, 1)
    I = B_gu.shape[1] // 2
    return {"gate_up_a": A_gu.reshape(E, R, -1), "gate_b": B_gu[:, :I], "up_b": B_gu[:, I:],
            "down_a": A_d.reshape(E, R, -1), "down_b": B_d.reshape(B_d.shape[0], R, E).permute(2, 0, 1)}


def _router_weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager_with_peft(family, tmp_path):
    """Logits, loss, the grads of every LoRA matrix, of the input embeddings and of the router weights."""
    model = base_model(family, "one")
    ref = peft_reference(copy.deepcopy(model), tmp_path)
    ours, params = moe_sft_model(model, tmp_path)
    ids = batch()
    outs = []
    for m in (ref, ours):
        for p in _router_weights(m).values():
            p.requires_grad_(True)
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, labels=ids)
        out.loss.backward()
        outs.append((out, emb))
    (r_out, r_emb), (o_out, o_emb) = outs
    assert_logits_close(o_out.logits, r_out.logits)
    assert abs(o_out.loss.item() - r_out.loss.item()) <= 5e-3 * r_out.loss.item()
    assert rel(o_emb.grad, r_emb.grad) < 3e-2
    routers_ref, routers_ours = _router_weights(ref), _router_weights(ours)
    for name, p in routers_ours.items():
        assert rel(p.grad, routers_ref["base_model.model." + name].grad) < 3e-2, name
    for name in mh.experts_modules(ours):
        want = peft_grads(ref, name)
        for field in ("gate_b", "up_b", "down_a", "down_b"):
            proj, ab = field.split("_")
            assert rel(params[f"{name}.{proj}_proj.lora_{ab.upper()}"].grad, want[field]) < 3e-2, (name, field)
        # PEFT's one A for gate and up gets the sum of both shares
        shared = params[f"{name}.gate_proj.lora_A"].grad + params[f"{name}.up_proj.lora_A"].grad
        assert rel(shared, want["gate_up_a"]) < 3e-2, name
    # the base weights were released from torch: the packed layer is their only copy
    for module in mh.experts_modules(ours).values():
        assert module.gate_up_proj.numel() == 0 and module.down_proj.numel() == 0


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_saved_adapter_loads_in_peft(layout, tmp_path):
    """moe_sft's adapter on the plain Transformers model through peft.PeftModel.from_pretrained: same logits."""
    model = base_model("qwen3_moe")
    ref = peft_reference(copy.deepcopy(model), tmp_path)
    ours, params = moe_sft_model(model, tmp_path, shared_gate_up_a=(layout == "fused"))
    with torch.no_grad():  # move away from what PEFT saved, so that the check sees moe_sft's values
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.05)
    mh.save_adapter(ours, str(tmp_path / "ours"), layout=layout)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    ids = batch(1)
    with torch.no_grad():
        want, got, before = loaded(ids).logits, ours(ids).logits, ref(ids).logits
    assert_logits_close(got, want, routing_flips=2)
    assert (before - want).abs().max().item() > 0.1 * want.abs().max().item()  # the perturbation is visible: the check is not vacuous


def test_adamw_30_steps_track_peft(tmp_path):
    """30 torch.optim.AdamW steps on PEFT's fused LoRA and on moe_sft's (gate and up sharing one A, as PEFT's
    gate_up_proj does): the loss curves agree."""
    model = base_model("qwen3_moe", "one")
    ref = peft_reference(copy.deepcopy(model), tmp_path).train()
    ours, params = moe_sft_model(model, tmp_path, shared_gate_up_a=True)
    ours.train()
    opt_ref = torch.optim.AdamW([p for n, p in ref.named_parameters() if p.requires_grad], lr=3e-3)
    opt_ours = torch.optim.AdamW(list(params.values()), lr=3e-3)
    curves = ([], [])
    for step in range(30):
        ids = batch(step % 4)
        for m, opt, curve in ((ref, opt_ref, curves[0]), (ours, opt_ours, curves[1])):
            opt.zero_grad()
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
    ref_curve, our_curve = np.array(curves[0]), np.array(curves[1])
    assert ref_curve[-4:].mean() < ref_curve[:4].mean() - 0.1  # it trained
    np.testing.assert_allclose(our_curve, ref_curve, rtol=1e-2)


def test_gradient_checkpointing_same_grads(tmp_path):
    model = base_model("qwen3_moe")
    peft_reference(copy.deepcopy(model), tmp_path)
    ids = batch(2)
    grads = []
    for checkpointing in (False, True):
        ours, params = moe_sft_model(model, tmp_path)
        ours.train()
        if checkpointing:
            ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ours(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_peft_attention_lora_beside_moe_sft(tmp_path):
    """PEFT LoRA on q_proj / v_proj and moe_sft LoRA on the experts in one model: the same logits and grads as
    PEFT doing both (experts through target_parameters on the eager experts)."""
    model = base_model("qwen3_moe", "one")
    ref = peft_reference(copy.deepcopy(model), tmp_path, attention=True)
    ours = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=R, lora_alpha=ALPHA,
                                                                     target_modules=["q_proj", "v_proj"]))
    params = mh.add_lora(ours, R, ALPHA)
    mh.load_adapter(ours, str(tmp_path / "peft"))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".q_proj.lora_" in n or ".v_proj.lora_" in n:
                p.copy_(ref_params[n])
    ids = batch(3)
    l_ref, l_ours = ref(ids, labels=ids), ours(ids, labels=ids)
    assert_logits_close(l_ours.logits, l_ref.logits)
    l_ref.loss.backward()
    l_ours.loss.backward()
    ours_params = dict(ours.named_parameters())
    attention = [n for n in ours_params if ".q_proj.lora_" in n or ".v_proj.lora_" in n]
    assert attention and all(ours_params[n].requires_grad for n in attention)
    for n in attention:
        assert rel(ours_params[n].grad, ref_params[n].grad) < 3e-2, n
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_set_experts_implementation_packs_on_first_use():
    model = base_model("qwen3_moe")
    ids = batch(4)
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("moe_sft")
        assert model.config._experts_implementation == "moe_sft"
        got = model(ids).logits
    assert_logits_close(got, want, routing_flips=2)
    for module in mh.experts_modules(model).values():
        assert module.moe_sft.layer.lora_rank == 0 and module.gate_up_proj.numel() == 0
    with pytest.raises(moe_sft.InvalidArgumentError, match="already packed.*before the first forward"):
        mh.add_lora(model, R, ALPHA)


def test_from_pretrained_experts_name(tmp_path):
    """experts_implementation="moe_sft" through AutoModelForCausalLM.from_pretrained, and moe_sft.hf's own
    from_pretrained (experts read from the safetensors files, never as torch tensors): both give the eager
    model's logits with the same adapter."""
    model = base_model("qwen3_moe")
    model.save_pretrained(str(tmp_path / "ckpt"))
    ref = peft_reference(copy.deepcopy(model), tmp_path)
    ids = batch(5)
    with torch.no_grad():
        want = ref(ids).logits
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), experts_implementation="moe_sft")
    direct = mh.from_pretrained(str(tmp_path / "ckpt"))
    for m in (auto, direct):
        assert m.config._experts_implementation == "moe_sft"
        mh.add_lora(m, R, ALPHA)
        mh.load_adapter(m, str(tmp_path / "peft"))
        with torch.no_grad():
            got = m(ids).logits
        assert_logits_close(got, want, routing_flips=2)
    # moe_sft.hf.from_pretrained never made torch tensors of the experts
    assert all(mod.gate_up_proj.numel() == 0 for mod in mh.experts_modules(direct).values())
    quantized = mh.from_pretrained(str(tmp_path / "ckpt"), weight_format="int8")
    mh.add_lora(quantized, R, ALPHA)
    assert {m.moe_sft.layer.weight_format for m in mh.experts_modules(quantized).values()} == {"int8"}


def test_quantized_base_weights(tmp_path):
    """weight_format int8 / int4_awq: the eager model with the dequantized weights and the same LoRA is the reference."""
    model = base_model("qwen3_moe")
    ids = batch(6)
    for fmt, group_size in (("int8", None), ("int4_awq", 16)):
        dequantized = copy.deepcopy(model)
        with torch.no_grad():
            for module in mh.experts_modules(dequantized).values():
                for p in (module.gate_up_proj, module.down_proj):
                    w = p.detach().to(torch.bfloat16).float().numpy().astype(moe_sft.bfloat16)
                    p.copy_(torch.from_numpy(moe_sft.dequantize(moe_sft.quantize(w, fmt, group_size))))
        ref = peft_reference(dequantized, tmp_path / fmt)
        ours, _ = moe_sft_model(model, tmp_path / fmt, weight_format=fmt, group_size=group_size)
        assert all(m.moe_sft.layer.weight_format == fmt for m in mh.experts_modules(ours).values())
        with torch.no_grad():
            want, got = ref(ids).logits, ours(ids).logits
        assert_logits_close(got, want, routing_flips=2)


# ---- gpt-oss (GptOssExperts: interleaved, transposed, biased, clamped SwiGLU) ----

def gpt_oss_model(layers, seed=0):
    config = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E,
                                       num_experts_per_tok=2, layer_types=["full_attention"] * layers,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    with torch.no_grad():  # O(1) activations (some beyond swiglu_limit's clamp), biases, a non-trivial router
        for name, p in model.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                p.normal_(0, 2 * p.shape[-2] ** -0.5)
            elif name.endswith("_proj_bias"):
                p.normal_(0, 0.3)
            elif ".router." in name:
                p.normal_(0, 0.3)
    return model.eval()


def _grads_as_adapter(pm, directory):
    """PEFT's LoRA grads saved as a PEFT adapter, read back in moe_sft's layout: the layouts differ by reshapes and
    permutations only, which map grads as they map values."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(p.grad)
    pm.save_pretrained(directory)
    return moe_sft.load_adapter(directory, gpt_oss=True).layers


def test_gpt_oss_matches_eager_with_peft(tmp_path):
    """gpt-oss's logits, loss and the grads of the LoRA (gate and up sharing PEFT's gate_up_proj A), the input
    embeddings and the router (weight and bias), against the eager GptOssExperts under PEFT's target_parameters."""
    model = gpt_oss_model(1)
    ref = peft_reference(copy.deepcopy(model), tmp_path)
    ours, params = moe_sft_model(model, tmp_path)
    assert sorted(n.split("experts.")[1] for n in params) == ["down_proj.lora_A", "down_proj.lora_B",
                                                               "gate_proj.lora_B", "gate_up_proj.lora_A",
                                                               "up_proj.lora_B"]
    ids = batch()
    outs = []
    for m in (ref, ours):
        router = {n: p.requires_grad_(True) for n, p in m.named_parameters() if ".router." in n}
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, labels=ids)
        out.loss.backward()
        outs.append((out, emb, router))
    (r_out, r_emb, r_router), (o_out, o_emb, o_router) = outs
    assert_logits_close(o_out.logits, r_out.logits)
    assert abs(o_out.loss.item() - r_out.loss.item()) <= 5e-3 * r_out.loss.item()
    assert rel(o_emb.grad, r_emb.grad) < 3e-2
    assert len(o_router) == 2
    for name, p in o_router.items():
        assert rel(p.grad, r_router["base_model.model." + name].grad) < 3e-2, name
    want = _grads_as_adapter(ref, str(tmp_path / "grads"))[0]
    pre = "model.layers.0.mlp.experts."
    got = {"gate_a": params[pre + "gate_up_proj.lora_A"].grad, "gate_b": params[pre + "gate_proj.lora_B"].grad,
           "up_b": params[pre + "up_proj.lora_B"].grad, "down_a": params[pre + "down_proj.lora_A"].grad,
           "down_b": params[pre + "down_proj.lora_B"].grad}
    for field, g in got.items():
        assert rel(g, torch.from_numpy(want[field])) < 3e-2, field
    module = mh.experts_modules(ours)[pre[:-1]]
    assert all(getattr(module, n).numel() == 0 for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias",
                                                          "down_proj_bias"))


def test_gpt_oss_adapter_loads_in_peft(tmp_path):
    """moe_sft's gpt-oss adapter (fused, written without being asked for a layout) on the plain model through
    peft.PeftModel.from_pretrained: same logits; moe_sft.hf.load_adapter reads it back unchanged, also into a
    model from moe_sft.hf.from_pretrained."""
    model = gpt_oss_model(2)
    ref = peft_reference(copy.deepcopy(model), tmp_path)
    ours, params = moe_sft_model(model, tmp_path)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.05)
    mh.save_adapter(ours, str(tmp_path / "ours"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    ids = batch(1)
    with torch.no_grad():
        want, got, before = loaded(ids).logits, ours(ids).logits, ref(ids).logits
    assert_logits_close(got, want, routing_flips=2)
    assert (before - want).abs().max().item() > 0.1 * want.abs().max().item()
    again = copy.deepcopy(model)
    again_params = mh.add_lora(again, R, ALPHA)
    mh.load_adapter(again, str(tmp_path / "ours"))
    for n, p in params.items():
        torch.testing.assert_close(again_params[n], p, rtol=0, atol=0, msg=n)
    # moe_sft.hf.from_pretrained reads gpt-oss's experts and biases straight from the checkpoint
    model.save_pretrained(str(tmp_path / "ckpt"))
    direct = mh.from_pretrained(str(tmp_path / "ckpt"))
    mh.add_lora(direct, R, ALPHA)
    mh.load_adapter(direct, str(tmp_path / "ours"))
    with torch.no_grad():
        assert_logits_close(direct(ids).logits, got)
    with pytest.raises(moe_sft.InvalidArgumentError, match="gpt_oss=True"):
        mh.save_adapter(ours, str(tmp_path / "per_expert"), layout="per_expert")
    with pytest.raises(moe_sft.InvalidArgumentError, match="trained together or not at all"):
        mh.add_lora(copy.deepcopy(model), R, ALPHA, projections=("gate", "down"))


# ---- bad inputs ----

def test_unsupported_experts_class_is_named():
    config = make_config("qwen3_moe")
    config.hidden_act = "gelu"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(moe_sft.InvalidArgumentError,
                       match=r"Qwen3MoeExperts \(model\.layers\.0\.mlp\.experts\): its activation is GELUActivation"):
        mh.add_lora(model, R, ALPHA)


def test_model_without_moe_layers():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(moe_sft.InvalidArgumentError, match="LlamaForCausalLM has no routed-experts module"):
        mh.add_lora(model, R, ALPHA)


def _adapter_from(family_or_config, tmp_path, name, r=R, layers=2):
    config = make_config("qwen3_moe") if family_or_config is None else family_or_config
    config.num_hidden_layers = layers
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=ALPHA * r // R, target_parameters=TARGETS))
    pm.save_pretrained(str(tmp_path / name))
    return str(tmp_path / name)


def test_bad_adapters_name_key_and_shapes_and_load_nothing(tmp_path):
    model = base_model("qwen3_moe")
    peft_reference(copy.deepcopy(model), tmp_path)
    ours, params = moe_sft_model(model, tmp_path)
    before = {n: p.detach().clone() for n, p in params.items()}
    other_rank = _adapter_from(None, tmp_path, "rank8", r=8)
    with pytest.raises(moe_sft.InvalidArgumentError,
                       match=r"layers\.0\.mlp\.experts\.base_layer\.lora_A\.weight has shape \[64, 64\].*needing \[32, 64\]"):
        mh.load_adapter(ours, other_rank)
    cfg = make_config("qwen3_moe")
    cfg.moe_intermediate_size = 32
    other_shape = _adapter_from(cfg, tmp_path, "i32")
    with pytest.raises(moe_sft.InvalidArgumentError,
                       match=r"base_layer\.lora_B\.weight has shape \[64, 32\] but model\.layers\.0\.mlp\.experts needs \[96, 32\]"):
        mh.load_adapter(ours, other_shape)
    three_layers = _adapter_from(None, tmp_path, "three", layers=3)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"layers\.2\.mlp\.experts\.base_layer\.lora_A\.weight is for "
                                                           r"layer 2, which has no moe_sft experts"):
        mh.load_adapter(ours, three_layers)
    shapes = {"gate_a": (4, R, 64), "gate_b": (4, 48, R), "up_a": (4, R, 64), "up_b": (4, 48, R),
              "down_a": (4, R, 48), "down_b": (4, 64, R)}
    four_experts = moe_sft.save_adapter(str(tmp_path / "e4"), {L: {n: np.ones(s, np.float32) for n, s in
                                                                   shapes.items()} for L in (0, 1)}, R, ALPHA)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"layer 0 has LoRA for 4 experts \(base_model\.model\.model"
                                                           r"\.layers\.0\.mlp\.experts\.0\.gate_proj\.lora_A\.weight.* has 8"):
        mh.load_adapter(ours, four_experts)
    one_layer = _adapter_from(None, tmp_path, "one", layers=1)
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"no routed-expert LoRA for layer 1"):
        mh.load_adapter(ours, one_layer)
    for n, p in params.items():
        assert torch.equal(p, before[n]), n


def test_misuse(tmp_path):
    model = base_model("qwen3_moe")
    with pytest.raises(moe_sft.InvalidArgumentError, match="projections"):
        mh.add_lora(copy.deepcopy(model), R, ALPHA, projections=("gate", "gate"))
    with pytest.raises(moe_sft.InvalidArgumentError, match="add_lora"):
        mh.save_adapter(copy.deepcopy(model), str(tmp_path / "a"))
    params = mh.add_lora(model, R, ALPHA, projections=("down",))
    assert sorted(n.rsplit(".", 2)[-2:][0] for n in params) == ["down_proj"] * 4
    with pytest.raises(moe_sft.InvalidArgumentError, match="already packed"):
        mh.add_lora(model, R, ALPHA)
    wrapped = peft.get_peft_model(base_model("qwen3_moe"), peft.LoraConfig(r=R, target_parameters=TARGETS))
    with pytest.raises(moe_sft.InvalidArgumentError, match="wrapped by PEFT's LoRA"):
        mh.add_lora(wrapped, R, ALPHA)
    separate = copy.deepcopy(base_model("qwen3_moe"))
    mh.add_lora(separate, R, ALPHA)  # gate and up with an A each: PEFT's fused layout cannot hold them
    with pytest.raises(moe_sft.InvalidArgumentError, match="gate_a and up_a differ"):
        mh.save_adapter(separate, str(tmp_path / "b"), layout="fused")


def test_replaced_lora_parameter_is_used(tmp_path):
    """A LoRA Parameter replaced instead of updated in place is what the next forward uses, not the stale one."""
    model = base_model("qwen3_moe", "one")
    peft_reference(copy.deepcopy(model), tmp_path)
    ours, _ = moe_sft_model(model, tmp_path)
    wrapper = next(iter(mh.experts_modules(ours).values())).moe_sft
    ids = batch(7)
    with torch.no_grad():
        before = ours(ids).logits
        original = wrapper.down_b
        wrapper.down_b = torch.nn.Parameter(original + 0.3 * torch.randn_like(original))
        replaced = ours(ids).logits
        new_values, wrapper.down_b = wrapper.down_b.detach().clone(), original
        original.copy_(new_values)
        in_place = ours(ids).logits
    assert torch.equal(replaced, in_place) and not torch.equal(replaced, before)


def test_finetune_example(tmp_path):
    """examples/finetune_hf.py, shortened: the loss falls, the adapter is written and PEFT reloads it."""
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "finetune_hf.py")
    run = subprocess.run([sys.executable, example, "--steps", "16", "--batch", "4", "--length", "32",
                          "--out", str(tmp_path / "adapter")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PEFT on the plain model" in run.stdout and "load_adapter: identical" in run.stdout
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_import_moe_sft_loads_no_torch():
    code = "import sys, moe_sft; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'peft', 'moe_sft.hf')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
