"""Hugging Face Transformers (>= 5) integration: the routed experts of a Transformers MoE model run on moe_sft.

    import moe_sft.hf                                    # registers experts_implementation "moe_sft"
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_sft")
    lora = moe_sft.hf.add_lora(model, r=16, alpha=32)    # {PEFT-style name: nn.Parameter}, trained by any optimizer
    moe_sft.hf.save_adapter(model, "out")                # PEFT files: peft.PeftModel.from_pretrained loads them
    moe_sft.hf.load_adapter(model, "out")                # or an adapter PEFT saved (target_parameters or per expert)
    model = moe_sft.hf.from_pretrained(path, weight_format="int4_awq")   # experts never become torch tensors

Transformers 5 fuses the experts of Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, Mixtral, OLMoE and GLM-4-MoE into one
module per layer (``gate_up_proj [E, 2I, H]``, gate's I rows then up's; ``down_proj [E, H, I]``; SiLU) whose
forward(hidden_states, top_k_index, top_k_weights) dispatches through ``ExpertsInterface`` on
``config._experts_implementation``. Under "moe_sft" that forward packs the module's base weights into a
moe_sft layer (a ``moe_sft.torch.MoEExperts`` kept as the submodule ``moe_sft``) the first time it is needed
and replaces the two big Parameters by empty ones, so the packed copy is the only one; router, shared experts,
attention and everything else stay torch's. Packing is one-way: the model cannot go back to "eager" or
"grouped_mm" afterwards. gpt-oss's GptOssExperts (``gate_up_proj [E, H, 2I]`` with gate and up interleaved,
``down_proj [E, I, H]``, biases, clamped SwiGLU; forward(hidden_states, router_indices, routing_weights)) is
packed through MoESFT.from_gpt_oss; its LoRA always shares gate's and up's A and its adapters have gpt-oss's
fused layout. Other experts classes (another activation, a custom ``_apply_gate``, biases or transposed /
interleaved layouts outside gpt-oss) are refused with their class name.

LoRA: the layer's rank and scale are fixed when it is packed, so add_lora packs (call it before the first
forward). The parameters live in ``<experts>.moe_sft`` as gate_a [E, r, H], gate_b [E, I, r], up_a, up_b,
down_a [E, r, I], down_b [E, H, r]; add_lora returns them under the names PEFT gives the per-expert LoRA
matrices, with the expert index stacked as the first dimension: ``model.layers.{L}.mlp.experts.gate_proj.lora_A``
(= PEFT's ``...experts.{e}.gate_proj.lora_A.weight`` for e = 0..E-1). PEFT LoRA on other modules works beside it:
apply ``peft.get_peft_model`` first, then add_lora (PEFT freezes every parameter that exists when it wraps).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re

import numpy as np
import torch
import transformers
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from . import _adapters
from . import torch as mt
from ._checkpoints import load_experts
from ._errors import invalid
from ._layer import MoESFT

__all__ = ["IMPLEMENTATION", "add_lora", "experts_modules", "from_pretrained", "load_adapter", "save_adapter"]

IMPLEMENTATION = "moe_sft"
_SUBMODULE = "moe_sft"  # the MoEExperts on an experts module, once packed
_CHECKPOINT_SOURCE = "_moe_sft_checkpoint"  # (directory, layer index, weight_format): set by from_pretrained
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The function registered as experts implementation "moe_sft" (called as forward of the experts module)."""
    wrapper = self._modules.get(_SUBMODULE)
    if wrapper is None:
        wrapper = _pack(self, type(self).__name__, {})
    return wrapper(hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, _experts_forward)


# ---- finding and packing the experts modules ----

def _is_experts_module(module):
    # what transformers' use_experts_implementation sets on every experts module it dispatches
    return all(hasattr(module, a) for a in ("is_concatenated", "is_transposed", "has_bias", "has_gate",
                                           "_is_expert_parallel"))


def _unsupported_reason(module):
    if getattr(module, "_is_expert_parallel", False):
        return "it is expert-parallel (sharded over devices)"
    if getattr(module, "has_post_expert_norm", False):
        return "it applies a norm after each expert (has_post_expert_norm=True)"
    return _family(module).unsupported(module)


class _Family:
    """How moe_sft runs one kind of Transformers experts module: which layouts it accepts, how its weights become
    a MoESFT, which Parameters the packed layer replaces, and how its PEFT adapters are laid out."""

    def __init__(self, weights, unsupported, make_layer, gpt_oss):
        self.weights = weights  # the module's Parameters the packed layer holds (released after packing)
        self.unsupported = unsupported  # module -> why moe_sft cannot run it, or None
        self.make_layer = make_layer  # (module, MoESFT kwargs) -> MoESFT on the module's weights
        self.gpt_oss = gpt_oss  # adapters: gpt-oss's fused layout (shared gate/up A, interleaved B rows)


def _fused_silu_unsupported(module):
    cls = type(module)
    if not module.has_gate:
        return "it has no gate projection (has_gate=False)"
    if not module.is_concatenated:
        return "its gate and up rows are interleaved (is_concatenated=False)"
    if module.is_transposed:
        return "its weights are stored transposed ([E, H, 2I], is_transposed=True)"
    if module.has_bias:
        return "its projections have biases (has_bias=True)"
    if getattr(cls, "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        return f"it defines its own gating ({cls.__name__}._apply_gate)"
    act = getattr(module, "act_fn", None)
    if not isinstance(act, (SiLUActivation, nn.SiLU)):
        return f"its activation is {type(act).__name__}, not SiLU"
    return None


def _fused_silu_layer(module, layer_kwargs):
    """gate_up_proj [E, 2I, H] (gate's I rows, then up's), down_proj [E, H, I]; weights on another device are
    copied to the CPU one projection at a time."""
    gate_up, down = module.gate_up_proj, module.down_proj
    I = gate_up.shape[1] // 2
    return MoESFT(*(mt.as_numpy(w.detach().cpu(), n, contiguous=False) for w, n in
                    ((gate_up[:, :I], "gate_up_proj"), (gate_up[:, I:], "gate_up_proj"), (down, "down_proj"))),
                  **layer_kwargs)


def _gpt_oss_unsupported(module):
    if (module.is_concatenated, module.is_transposed, module.has_bias, module.has_gate) != (False, True, True, True):
        return ("its layout flags differ from gpt-oss's (is_concatenated=False, is_transposed=True, has_bias=True, "
                "has_gate=True)")
    return None


def _gpt_oss_layer(module, layer_kwargs):
    """GptOssExperts: gate_up_proj [E, H, 2I] (gate and up interleaved), down_proj [E, I, H], both biases, the
    clamped SwiGLU with the module's alpha and limit (MoESFT.from_gpt_oss)."""
    arrays = {n: mt.as_numpy(getattr(module, n).detach().cpu(), n, contiguous=False)
              for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")}
    return MoESFT.from_gpt_oss(**arrays, swiglu_alpha=module.alpha, swiglu_limit=module.limit, **layer_kwargs)


_FUSED_SILU = _Family(("gate_up_proj", "down_proj"), _fused_silu_unsupported, _fused_silu_layer, gpt_oss=False)
_GPT_OSS = _Family(("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"), _gpt_oss_unsupported,
                   _gpt_oss_layer, gpt_oss=True)


def _family(module):
    """The _Family of an experts module (by its config's model_type)."""
    config = getattr(module, "config", None)
    return _GPT_OSS if getattr(config, "model_type", None) == "gpt_oss" else _FUSED_SILU


def experts_modules(model):
    """{qualified name: experts module} of every routed-experts module of ``model`` (a Transformers model or a
    PeftModel around one), after checking that moe_sft runs each of them. Raises when there is none, or when
    one has a layout moe_sft does not run (naming its class and why)."""
    found = {}
    for name, module in model.named_modules():
        if not _is_experts_module(module):
            continue
        if name.endswith(".base_layer"):
            raise invalid(f"{name} ({type(module).__name__}) is wrapped by PEFT's LoRA (target_parameters on the "
                          "experts): give the experts their LoRA with moe_sft.hf.add_lora instead, and PEFT only the "
                          "other modules")
        reason = _unsupported_reason(module)
        if reason is not None:
            raise invalid(f"moe_sft cannot run {type(module).__name__} ({name}): {reason}. moe_sft runs fused "
                          "experts with gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I], "
                          "SiLU and no biases (Qwen2/3-MoE, DeepSeek-V2/V3, Mixtral, OLMoE, GLM-4-MoE), and "
                          "gpt-oss's GptOssExperts")
        found[name] = module
    if not found:
        raise invalid(f"{type(model).__name__} has no routed-experts module moe_sft can run (no module decorated by "
                      "transformers' use_experts_implementation: the model has no MoE layers, or its experts are "
                      "not fused by this Transformers version)")
    return found


def _layer_index(name):
    m = _LAYER.search(name)
    if m is None:
        raise invalid(f"cannot tell the layer index of experts module {name} (expected a '.layers.N.' in its name)")
    return int(m.group(1))


def _pack(module, name, lora):
    """Packs ``module``'s routed experts into a MoEExperts (kept as ``module.moe_sft``) with the LoRA settings in
    ``lora`` (empty: rank 0) and releases the torch copies of the base weights."""
    reason = _unsupported_reason(module)
    if reason is not None:  # a module reached through the interface directly, not through experts_modules
        raise invalid(f"moe_sft cannot run {type(module).__name__} ({name}): {reason}")
    lora = dict(lora)
    mt_kwargs = {k: lora.pop(k) for k in ("lora_dtype", "init", "seed", "projections") if k in lora}
    if not lora.get("lora_rank"):
        mt_kwargs["projections"] = ()  # packed at first use, without adapters
    source = getattr(module, _CHECKPOINT_SOURCE, None)
    if source is not None:  # made by from_pretrained: the weights come from the checkpoint's files
        directory, L, weight_format = source
        weights = load_experts(directory, L)
        requested = lora.get("weight_format") or weight_format
        if weights.weight_format == "bf16":
            lora["weight_format"] = requested
        elif requested not in ("bf16", weights.weight_format):
            raise invalid(f"weight_format = {requested!r}, but {directory} holds layer {L}'s experts pre-quantized as "
                          f"{weights.weight_format!r}, which the layer keeps as they are")
        else:
            lora.pop("weight_format", None)
        layer = weights.create_layer(**_layer_kwargs(lora))
        del weights
        wrapper = mt.MoEExperts(layer, **mt_kwargs)
    else:
        if module.down_proj.numel() == 0:
            raise invalid(f"{name}'s base weights were released when it was packed for moe_sft; they are gone")
        with torch.no_grad():
            layer = _family(module).make_layer(module, _layer_kwargs(lora))
        wrapper = mt.MoEExperts(layer, **mt_kwargs)
    _release(module)
    module.add_module(_SUBMODULE, wrapper)
    return wrapper


def _layer_kwargs(lora):
    kwargs = {k: v for k, v in lora.items() if v is not None}
    kwargs.setdefault("lora_rank", 0)
    return kwargs


def _release(module):
    """Replaces the experts' weights by empty Parameters (same dtype and device): the packed layer is the only copy."""
    for pname in _family(module).weights:
        old = getattr(module, pname)
        setattr(module, pname, nn.Parameter(torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False))


# ---- LoRA ----

def _peft_name(path, field):
    proj, ab = field.split("_")
    return f"{path}.{proj}_proj.lora_{ab.upper()}"


def _model_path(name):
    """The experts module's name in the Transformers model (without a PeftModel's base_model.model. prefix)."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def add_lora(model, r, alpha, projections=("gate", "up", "down"), weight_format=None, init="peft", *,
             lora_dtype=torch.float32, seed=None, shared_gate_up_a=False, **layer_kwargs):
    """Packs every routed-experts module of ``model`` into a moe_sft layer with LoRA rank ``r`` and scale
    ``alpha / r`` and attaches its LoRA parameters (PEFT's init: A Kaiming-uniform, B zero; ``lora_dtype``
    float32 or bfloat16). ``projections``: which of gate, up, down are trained (the others get no parameters and
    contribute nothing). ``weight_format``: "bf16", "int8" or "int4_awq" (quantized at packing; QLoRA); None: the one
    from_pretrained was given, else "bf16".
    ``layer_kwargs`` go to moe_sft.MoESFT (group_size, max_cache_depth, num_threads, tp_count, check_finite).
    ``seed``: the init's seed for the first experts module (the i-th gets seed + i); None: each drawn from torch's
    default generator, so torch.manual_seed reproduces the init.
    ``shared_gate_up_a``: gate and up share one A (one Parameter bound as both, trained with the sum of both
    grads), which is exactly PEFT's LoRA on the fused gate_up_proj (target_parameters) and can be saved in the
    "fused" layout; its name is ``...experts.gate_up_proj.lora_A``. gpt-oss always shares it (its adapters have
    only PEFT's fused form), so there gate and up are trained both or neither.
    Switches the model to experts_implementation "moe_sft". Returns {PEFT-style name: nn.Parameter} (see the
    module's docstring), ready for any torch optimizer. Call it before the first forward through moe_sft: a
    layer packed without LoRA cannot get it later (its torch weights are gone)."""
    projections = tuple(projections)
    bad = [p for p in projections if p not in mt.PROJECTIONS]
    if bad or not projections or len(set(projections)) != len(projections):
        raise invalid(f"projections = {projections!r}; expected distinct names among 'gate', 'up', 'down'")
    if shared_gate_up_a and not {"gate", "up"} <= set(projections):
        raise invalid(f"shared_gate_up_a=True needs 'gate' and 'up' in projections, got {projections!r}")
    modules = experts_modules(model)
    if any(_family(m).gpt_oss for m in modules.values()):
        if len({"gate", "up"} & set(projections)) == 1:
            raise invalid(f"projections = {projections!r}: gpt-oss's gate and up share one LoRA A (PEFT's LoRA on "
                          "its gate_up_proj), so they are trained together or not at all")
        shared_gate_up_a = "gate" in projections
    for name, module in modules.items():
        if _SUBMODULE in module._modules:
            raise invalid(f"{name} is already packed for moe_sft (lora_rank {module._modules[_SUBMODULE].layer.lora_rank}); "
                          "add_lora must come before the first forward through moe_sft and be called once")
    _set_implementation(model, modules)
    lora = dict(lora_rank=r, lora_alpha=alpha, weight_format=weight_format, lora_dtype=lora_dtype, init=init,
                seed=seed, projections=projections, **layer_kwargs)
    params = {}
    for i, (name, module) in enumerate(modules.items()):
        per_layer = dict(lora, seed=None if seed is None else seed + i)
        wrapper = _pack(module, name, per_layer)
        path = _model_path(name)
        if shared_gate_up_a:
            with torch.no_grad():
                wrapper.gate_a.copy_(wrapper.up_a)  # gate and up start from one A
            wrapper.up_a = wrapper.gate_a
            params[f"{path}.gate_up_proj.lora_A"] = wrapper.gate_a
        for field, p in wrapper.lora_state().items():
            if isinstance(p, nn.Parameter) and not (shared_gate_up_a and field in ("gate_a", "up_a")):
                params[_peft_name(path, field)] = p
    _drop_unused_checkpoint_pages(model)
    return params


def _drop_unused_checkpoint_pages(model):
    """Transformers maps the safetensors files and keeps the tensors that need no conversion as views of that
    map; the experts' pages, read once to build gate_up_proj / down_proj, stay in the resident set after those
    copies are packed and freed. In every mapped ``*.safetensors`` file holding a tensor of ``model``, drops the
    pages no tensor of ``model`` uses (MADV_DONTNEED: a private file page never written is simply read from the
    file again if ever touched).
    Linux only; elsewhere the pages stay (clean file pages the kernel reclaims under memory pressure)."""
    try:
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, page = libc.madvise, os.sysconf("SC_PAGE_SIZE")
    except (OSError, AttributeError, ValueError):
        return
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    live = []
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if storage.nbytes() and t.device.type == "cpu":
            live.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    live.sort()

    def drop(lo, hi):  # rounded inward: a page shared with a live tensor stays
        lo, hi = -(-lo // page) * page, hi // page * page
        if hi > lo:
            madvise(lo, hi - lo, _MADV_DONTNEED)

    for fields in maps:
        if len(fields) < 6 or not fields[5].endswith(".safetensors"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if not any(start <= lo < end for lo, _ in live):
            continue  # not this model's map (another model's pages, possibly written in place, are left alone)
        cursor = start
        for lo, hi in live:
            if hi <= cursor:
                continue
            if lo >= end:
                break
            drop(cursor, lo)
            cursor = hi
        drop(cursor, end)


_MADV_DONTNEED = 4  # linux/mman.h


def _set_implementation(model, modules):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_experts_implementation"):  # a PreTrainedModel: its sub-models follow
        if base.config._experts_implementation != IMPLEMENTATION:
            base.set_experts_implementation(IMPLEMENTATION)
        return
    for module in modules.values():  # experts modules inside a plain nn.Module
        module.config._experts_implementation = IMPLEMENTATION


def _wrappers(model):
    """{layer index: (experts module name, MoEExperts)} of a model add_lora (or from_pretrained + add_lora) set up."""
    out = {}
    for name, module in experts_modules(model).items():
        wrapper = module._modules.get(_SUBMODULE)
        if wrapper is None or wrapper.layer.lora_rank == 0:
            raise invalid(f"{name} has no moe_sft LoRA: call moe_sft.hf.add_lora(model, r, alpha) first")
        L = _layer_index(name)
        if L in out:
            raise invalid(f"two experts modules have layer index {L}: {out[L][0]} and {name}")
        out[L] = (name, wrapper)
    return out


def _gpt_oss(model):
    """Whether the model's experts are gpt-oss's (its adapters then have gpt-oss's fused layout)."""
    return any(_family(m).gpt_oss for m in experts_modules(model).values())


def _lora_arrays(wrapper):
    """The six LoRA arrays of a MoEExperts as float32 numpy (zeros for the projections it does not train)."""
    state, shapes = wrapper.lora_state(), wrapper.layer.lora_shapes()
    with torch.no_grad():
        return {n: state[n].detach().float().numpy() if n in state else np.zeros(shapes[n], np.float32)
                for n in _adapters.LORA_NAMES}


# ---- adapters ----

def save_adapter(model, directory, layout=None):
    """Writes the moe_sft LoRA of ``model``'s experts as a PEFT adapter (adapter_model.safetensors +
    adapter_config.json) that ``peft.PeftModel.from_pretrained(plain_model, directory)`` loads onto the same
    Transformers model without moe_sft. layout: "per_expert" (target_modules gate_proj/up_proj/down_proj, also
    what vLLM and SGLang load; PEFT converts it to the fused experts) or "fused" (target_parameters
    mlp.experts.gate_up_proj / down_proj, PEFT's own form for fused experts; one A shared by gate and up, so
    gate_a must equal up_a). None: "per_expert", but "fused" for gpt-oss, the only layout PEFT has for its
    experts (add_lora gives it the shared A that needs). Returns the directory."""
    wrappers = _wrappers(model)
    ranks = {(w.layer.lora_rank, w.layer.lora_alpha) for _, w in wrappers.values()}
    if len(ranks) != 1:
        raise invalid(f"the experts modules have different LoRA ranks / alphas {sorted(ranks)}; a PEFT adapter has one")
    (r, alpha), = ranks
    layers = {L: _lora_arrays(wrapper) for L, (_, wrapper) in wrappers.items()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _adapters.save_adapter(directory, layers, r, alpha, layout=layout, gpt_oss=_gpt_oss(model),
                                  base_model_name_or_path=getattr(base.config, "_name_or_path", None) or None)


def load_adapter(model, directory):
    """Loads a PEFT LoRA adapter of the routed experts (saved by save_adapter, or by PEFT with target_parameters on
    the fused experts or target_modules per expert) into the LoRA parameters add_lora made, in place (an optimizer
    holding them keeps working). The adapter must have the model's layers, rank, scale and shapes: otherwise the
    error names the first mismatching key and both shapes, and nothing is loaded. Returns the Adapter read."""
    wrappers = _wrappers(model)
    adapter = _adapters.load_adapter(directory, dtype=np.float32, gpt_oss=_gpt_oss(model))
    weights = os.path.join(os.fspath(directory), _adapters.WEIGHTS_NAME)
    extra = sorted(set(adapter.layers) - set(wrappers))
    if extra:
        L = extra[0]
        raise invalid(f"{weights}: {adapter.keys[L]['gate_a']} is for layer {L}, which has no moe_sft experts in "
                      f"the model (its experts layers: {sorted(wrappers)})")
    missing = sorted(set(wrappers) - set(adapter.layers))
    if missing:
        raise invalid(f"{weights} has no routed-expert LoRA for layer {missing[0]} ({wrappers[missing[0]][0]}); it "
                      f"has layers {sorted(adapter.layers)}")
    for L, (name, wrapper) in sorted(wrappers.items()):
        layer = wrapper.layer
        if layer.lora_rank != adapter.rank:
            raise invalid(f"{weights}: {adapter.keys[L]['gate_a']} has shape {list(adapter.key_shapes[L]['gate_a'])} "
                          f"(r = {adapter.rank}) but {name} has lora_rank {layer.lora_rank}, needing "
                          f"{list(adapter.file_shape('gate_a', layer.lora_shapes()['gate_a']))}")
        scale = layer.lora_alpha / layer.lora_rank
        if not np.isclose(scale, adapter.scaling, rtol=1e-6):
            raise invalid(f"{directory}: the adapter's scaling (lora_alpha / r) is {adapter.scaling} but {name}'s is "
                          f"{scale}: add_lora(model, r={adapter.rank}, alpha={adapter.scaling * adapter.rank}) matches it")
        state = wrapper.lora_state()
        experts = adapter.layers[L]["gate_a"].shape[0]
        if adapter.layout == "per_expert" and experts != layer.expert_num:
            raise invalid(f"{weights}: layer {L} has LoRA for {experts} experts ({adapter.keys[L]['gate_a']} and the "
                          f"other experts' keys) but {name} has {layer.expert_num} experts")
        for field, shape in layer.lora_shapes().items():
            have = adapter.layers[L][field].shape
            if have != tuple(shape):
                raise invalid(f"{weights}: {adapter.keys[L][field]} has shape {list(adapter.key_shapes[L][field])} but "
                              f"{name} needs {list(adapter.file_shape(field, shape))}")
            if field not in state and np.any(adapter.layers[L][field]):
                raise invalid(f"{weights}: {adapter.keys[L][field]} is nonzero but {name} has no {field} (add_lora's "
                              f"projections were {wrapper.projections}): the adapter would be applied only in part")
    with torch.no_grad():
        for L, (_, wrapper) in wrappers.items():
            for field, t in wrapper.lora_state().items():
                t.copy_(torch.from_numpy(adapter.layers[L][field]))
    return adapter


# ---- loading a checkpoint with the experts straight into moe_sft ----

@contextlib.contextmanager
def _experts_without_weights(classes):
    """While active, the experts classes build with their weights (gate_up_proj, down_proj; gpt-oss's biases too) as
    empty plain tensors, not Parameters: Transformers then sees the checkpoint's expert tensors as unexpected keys
    and never reads them into torch (and its weight init still finds the attributes)."""
    saved = {cls: cls.__init__ for cls in classes}

    def make(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            for pname in _family(self).weights:
                if pname in self._parameters:
                    dtype = self._parameters.pop(pname).dtype
                    setattr(self, pname, torch.empty(0, dtype=dtype))
        return __init__

    try:
        for cls, original in saved.items():
            cls.__init__ = make(original)
        yield
    finally:
        for cls, original in saved.items():
            cls.__init__ = original


def from_pretrained(path, weight_format="bf16", *, auto_class=None, **hf_kwargs):
    """A Transformers model from the local checkpoint directory ``path`` whose routed experts are read straight
    from the safetensors shards into moe_sft layers (never as torch tensors); everything else is loaded by
    ``auto_class.from_pretrained(path, **hf_kwargs)`` (default AutoModelForCausalLM). The experts are packed in
    ``weight_format`` ("bf16", "int8", "int4_awq") when add_lora is called, or at the first forward (without
    LoRA) if it is not; until then nothing of them is resident. The model runs with experts_implementation
    "moe_sft" (other implementations cannot run it: it has no torch expert weights)."""
    auto_class = auto_class or transformers.AutoModelForCausalLM
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise invalid(f"path = {directory!r} is not a directory (moe_sft.hf.from_pretrained reads a local checkpoint)")
    if "experts_implementation" in hf_kwargs and hf_kwargs["experts_implementation"] != IMPLEMENTATION:
        raise invalid(f"experts_implementation = {hf_kwargs['experts_implementation']!r}: moe_sft.hf.from_pretrained "
                      f"loads the experts into moe_sft, so it is always {IMPLEMENTATION!r}")
    hf_kwargs["experts_implementation"] = IMPLEMENTATION
    config = hf_kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        skeleton = auto_class.from_config(config)
    classes = {type(m) for m in experts_modules(skeleton).values()}
    del skeleton
    with _experts_without_weights(classes):
        model = auto_class.from_pretrained(directory, config=config, **hf_kwargs)
    for name, module in experts_modules(model).items():
        setattr(module, _CHECKPOINT_SOURCE, (directory, _layer_index(name), weight_format))
        _release(module)
    return model
