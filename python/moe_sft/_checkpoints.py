"""Base weights of one MoE layer's routed experts from a Hugging Face checkpoint directory, without torch:
load_experts and ExpertWeights (MoESFT.from_checkpoint is built on them).

The directory: config.json (optional; its expert counts and quantization_config are checked when present) and
model.safetensors.index.json with its shards, or one model.safetensors. Only the requested layer's expert
tensors are read, through the memory map of moe_sft._safetensors, expert by expert into preallocated stacked
arrays, the pages read dropped from the resident set as it goes: loading costs about the layer's expert bytes.

Key layouts under ``{prefix}layers.{L}.`` (any prefix, e.g. ``model.`` or ``language_model.model.``):
  per expert   mlp.experts.{e}.{gate,up,down}_proj.weight         [I, H], [I, H], [H, I]   Qwen2/3-MoE, DeepSeek-V2/V3,
                                                                                        OLMoE, GLM-4-MoE
  Mixtral      block_sparse_moe.experts.{e}.{w1,w3,w2}.weight      w1 gate, w3 up, w2 down
  fused        mlp.experts.gate_up_proj [E, 2I, H] (gate's I rows, then up's: transformers 5's
               ``gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)``), mlp.experts.down_proj [E, H, I]
  gpt-oss      (config.json's model_type "gpt_oss", or keys with gpt-oss's suffixes) mlp.experts.gate_up_proj
               [E, H, 2I] (transposed, gate and up interleaved: gate = columns 0::2), gate_up_proj_bias [E, 2I],
               down_proj [E, I, H], down_proj_bias [E, H], as the dequantized (bf16) releases ship, or MXFP4 as the
               original ships: gate_up_proj_blocks [E, 2I, H/32, 16] (rows interleaved) and _scales [E, 2I, H/32],
               down_proj_blocks [E, H, I/32, 16] and _scales [E, H, I/32] (read as they are into MXFP4
               QuantizedWeight, rows de-interleaved: no bf16 copy is ever made); the layer gets
               the clamped SwiGLU with config.json's swiglu_limit (default 7.0) and swiglu_alpha (1.702, the
               modeling code's) and the biases (moe_sft._activation has the layout)
Shared experts (mlp.shared_experts / shared_expert) are not routed experts and are never read.

dtypes: BF16 as is; F16 and F32 rounded to bf16 (round to nearest even); compressed-tensors pack-quantized int4
(Kimi-K2: per expert and projection ``weight_packed`` int32 [N, K/8], ``weight_scale`` bf16 [N, K/g],
``weight_shape`` [2] = [N, K]) stacked as they are into the INT4_K2 arrays of MoESFT.from_quantized; block-scaled
FP8 (DeepSeek-V3/R1, Qwen3-FP8: per expert and projection ``weight`` F8_E4M3 [N, K] and ``weight_scale_inv`` F32
or BF16 [ceil(N/bn), ceil(K/bk)], the block [bn, bk] from config.json's quantization_config.weight_block_size,
128 x 128 when there is none) stacked as they are, codes as bytes, into fp8_e4m3_block QuantizedWeight: never
dequantized.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from ._activation import GPT_OSS_ALPHA, GPT_OSS_LIMIT, split_gate_up
from ._arrays import bfloat16
from ._errors import invalid
from ._quantize import FP8, QuantizedWeight, block_size_for
from ._safetensors import SafetensorsFile, read_json_object

__all__ = ["ExpertWeights", "load_experts"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_FLOAT_CODES = ("BF16", "F16", "F32")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
_EXPERT_KEY = re.compile(r"^(?P<block>mlp|block_sparse_moe)\.experts\.(?:(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|"
                         r"down_proj|w1|w3|w2)\.(?P<field>\w+)|(?P<fused>(?:gate_up_proj|down_proj)"
                         r"(?P<suffix>_bias|_blocks|_scales)?)(?:\.weight)?)$")
_ANY_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ExpertWeights:
    """One layer's routed-expert base weights, ready for MoESFT: ``gate_proj``, ``up_proj`` [E, I, H] and
    ``down_proj`` [E, H, I] as bf16 arrays (weight_format "bf16": MoESFT(gate_proj, up_proj, down_proj, ...))
    or as QuantizedWeight (weight_format "int4_k2": MoESFT.from_quantized(...)); ``create_layer(**kwargs)``
    picks the right one. ``layout``: "per_expert", "mixtral" or "fused"; ``source_dtype``: the checkpoint's
    ("BF16", "F16", "F32" or "int4-pack-quantized")."""

    layer_idx: int
    weight_format: str
    gate_proj: Union[np.ndarray, QuantizedWeight]
    up_proj: Union[np.ndarray, QuantizedWeight]
    down_proj: Union[np.ndarray, QuantizedWeight]
    experts: int
    hidden_size: int
    intermediate_size: int
    layout: str
    source_dtype: str
    expert_ids: tuple = None     # the checkpoint's ids of the experts held, in order (None: all of them)
    total_experts: int = None    # the layer's routed experts in the checkpoint (= experts when all are held)
    model_kwargs: dict = field(default_factory=dict)  # MoESFT arguments the model fixes (gpt-oss's activation, biases)

    def __post_init__(self):
        if self.total_experts is None:
            self.total_experts = self.experts

    def __repr__(self):
        held = f"{self.experts} of {self.total_experts}" if self.expert_ids is not None else f"{self.experts}"
        activation = f", activation={self.model_kwargs['activation']!r}" if self.model_kwargs else ""
        return (f"ExpertWeights(layer_idx={self.layer_idx}, weight_format={self.weight_format!r}, experts="
                f"{held}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"layout={self.layout!r}, source_dtype={self.source_dtype!r}{activation})")

    def create_layer(self, cls=None, **layer_kwargs):
        """A MoESFT (or ``cls``) on these weights; layer_kwargs are MoESFT's (lora_rank, lora_alpha, ...), over the
        model's own ``model_kwargs`` (gpt-oss: activation, swiglu_alpha, swiglu_limit and the biases)."""
        if cls is None:
            from ._layer import MoESFT as cls
        kwargs = {**self.model_kwargs, **layer_kwargs}
        if self.weight_format == "bf16":
            return cls(self.gate_proj, self.up_proj, self.down_proj, **kwargs)
        return cls.from_quantized(self.gate_proj, self.up_proj, self.down_proj, **kwargs)


class _Checkpoint:
    """config.json and the key -> shard map of a checkpoint directory; shards opened on first use."""

    def __init__(self, directory):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise invalid(f"{self.dir} is not a directory (expected a Hugging Face checkpoint directory)")
        self.config = {}
        config_path = os.path.join(self.dir, "config.json")
        if os.path.isfile(config_path):
            self.config = read_json_object(config_path)
        index_path = os.path.join(self.dir, INDEX_NAME)
        single = os.path.join(self.dir, SINGLE_NAME)
        self._files = {}
        if os.path.isfile(index_path):
            index = read_json_object(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise invalid(f"{index_path} has no weight_map object of key -> shard file name")
            self.weight_map = weight_map
            self.source = index_path
        elif os.path.isfile(single):
            self._files[SINGLE_NAME] = SafetensorsFile(single)
            self.weight_map = {k: SINGLE_NAME for k in self._files[SINGLE_NAME]}
            self.source = single
        else:
            found = sorted(os.listdir(self.dir))
            raise invalid(f"{self.dir} has neither {INDEX_NAME} nor {SINGLE_NAME} (found: "
                          f"{', '.join(found[:12]) or 'nothing'}{', ...' if len(found) > 12 else ''})")

    def file(self, key):
        name = self.weight_map[key]
        f = self._files.get(name)
        if f is None:
            path = os.path.join(self.dir, name)
            if os.path.basename(name) != name or not os.path.isfile(path):
                raise invalid(f"{self.source} maps {key} to shard {name!r}, which is not a file in {self.dir}")
            f = self._files[name] = SafetensorsFile(path)
        if key not in f:
            raise invalid(f"{self.source} maps {key} to {f.path}, which has no such tensor")
        return f

    def shape(self, key):
        return self.file(key).shape(key)

    def code(self, key):
        return self.file(key).code(key)


def _text_config(config):
    for sub in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(sub), dict):
            return {**config, **config[sub]}
    return config


def load_experts(checkpoint_dir, layer_idx, experts=None):
    """The routed experts of layer ``layer_idx`` of a Hugging Face checkpoint directory, as ExpertWeights
    (bf16 arrays, or int4_k2 QuantizedWeight for compressed-tensors pack-quantized checkpoints).

    experts: None for all, or a list of distinct expert ids: only those are read (their bytes alone), stacked
    in that order (expert parallelism: each rank loads its own). Every expert's shape is still checked."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, (int, np.integer)) or layer_idx < 0:
        raise invalid(f"layer_idx = {layer_idx!r}; expected a non-negative integer")
    L = int(layer_idx)
    ckpt = _Checkpoint(checkpoint_dir)
    config = _text_config(ckpt.config)
    layer_re = re.compile(rf"^(?P<pre>(?:.*\.)?)layers\.{L}\.(?P<rest>.+)$")
    layer_keys, groups = [], {}
    for key in ckpt.weight_map:
        m = layer_re.match(key)
        if not m:
            continue
        layer_keys.append(key)
        e = _EXPERT_KEY.match(m["rest"])
        if e:
            groups.setdefault((m["pre"], e["block"]), []).append((key, e))
    where = f"{ckpt.source}"
    if not layer_keys:
        layers = sorted({int(m.group(1)) for k in ckpt.weight_map for m in [_ANY_LAYER.search(k)] if m})
        layers_text = f"{layers[0]}..{layers[-1]}" if layers else "none"
        raise invalid(f"{where} has no layer {L} (its layers: {layers_text})")
    if not groups:
        raise invalid(f"layer {L} of {where} has no routed experts (expected e.g. "
                      f"model.layers.{L}.mlp.experts.0.gate_proj.weight or model.layers.{L}.mlp.experts.gate_up_proj); "
                      f"its keys: {_some(sorted(layer_keys))}")
    if len(groups) > 1:
        raise invalid(f"layer {L} of {where} has routed experts under several prefixes: "
                      + ", ".join(f"{pre}layers.{L}.{block}.experts" for pre, block in sorted(groups)))
    (pre, block), entries = next(iter(groups.items()))
    base = f"{pre}layers.{L}.{block}.experts."
    fused = {m["fused"]: key for key, m in entries if m["fused"]}
    per_expert = {}
    for key, m in entries:
        if m["e"] is not None:
            per_expert.setdefault((int(m["e"]), _PROJ[m["proj"]]), {})[m["field"]] = key
    if fused and per_expert:
        raise invalid(f"layer {L} of {where} mixes fused ({_some(sorted(fused.values()))}) and per-expert "
                      f"({_some(sorted(k for v in per_expert.values() for k in v.values()))}) expert tensors")
    if fused and (config.get("model_type") == "gpt_oss" or any(m["suffix"] for _, m in entries)):
        result = _load_gpt_oss(ckpt, L, base, fused, config, experts)
    elif fused:
        result = _load_fused(ckpt, L, base, fused, experts)
    else:
        layout = "mixtral" if block == "block_sparse_moe" else "per_expert"
        names = ({"gate": "w1", "up": "w3", "down": "w2"} if layout == "mixtral"
                 else {p: p + "_proj" for p in ("gate", "up", "down")})
        result = _load_per_expert(ckpt, L, base, names, per_expert, layout, config, experts)
    _check_config(config, result, where)
    return result


def _selection(experts, E, L):
    """The expert ids to read, in order: all of them, or ``experts`` checked against the layer's E."""
    if experts is None:
        return range(E)
    sel = np.asarray(experts)
    if sel.ndim != 1 or (sel.size and sel.dtype.kind not in "iu"):
        raise invalid(f"experts must be a 1-D list of expert ids, got {sel.dtype} {sel.shape}")
    for i, e in enumerate(sel.tolist()):
        if not 0 <= e < E:
            raise invalid(f"experts[{i}] = {e} is out of range [0, {E}): layer {L} has {E} routed experts")
        if e in sel[:i]:
            raise invalid(f"experts[{i}] = {e} is listed twice")
    return sel.tolist()


def _weights(L, weight_format, gate, up, down, sel, E, H, I, layout, source, model_kwargs=None):
    held = len(sel)
    return ExpertWeights(L, weight_format, gate, up, down, held, H, I, layout, source,
                         None if isinstance(sel, range) else tuple(sel), E, model_kwargs or {})


def _some(keys, n=12):
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def _check_config(config, w, where):
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            if value != w.total_experts:
                raise invalid(f"config.json has {name} = {value} but layer {w.layer_idx} of {where} has "
                              f"{w.total_experts} routed experts")
            break
    intermediate = "intermediate_size" if w.layout == "gpt_oss" else "moe_intermediate_size"
    for name, have in (("hidden_size", w.hidden_size), (intermediate, w.intermediate_size)):
        value = config.get(name)
        if isinstance(value, int) and value > 0 and value != have:
            raise invalid(f"config.json has {name} = {value} but layer {w.layer_idx}'s experts in {where} have {have}")


def _float_code(ckpt, key):
    code = ckpt.code(key)
    if code not in _FLOAT_CODES:
        hint = " (F8_E4M3 weights are read with their weight_scale_inv)" if code.startswith("F8") else ""
        raise invalid(f"{key} has dtype {code}; load_experts reads {', '.join(_FLOAT_CODES)} weights, "
                      f"compressed-tensors int4 (weight_packed) and block-scaled FP8{hint}")
    return code


def _load_fused(ckpt, L, base, fused, experts):
    _require(ckpt, L, base, fused, ("gate_up_proj", "down_proj"))
    gu_key, dn_key = fused["gate_up_proj"], fused["down_proj"]
    gu, dn = ckpt.shape(gu_key), ckpt.shape(dn_key)
    if len(gu) != 3 or len(dn) != 3 or gu[1] % 2 or dn[0] != gu[0] or dn[1] != gu[2] or 2 * dn[2] != gu[1]:
        raise invalid(f"{gu_key} has shape {list(gu)} and {dn_key} {list(dn)}; expected [E, 2I, H] and [E, H, I] "
                      "(transformers 5's orientation; transposed [E, H, 2I] layouts are not read)")
    codes = {_float_code(ckpt, gu_key), _float_code(ckpt, dn_key)}
    E, H, I = gu[0], gu[2], dn[2]
    sel = _selection(experts, E, L)
    gate, up, down = (np.empty(s, bfloat16) for s in ((len(sel), I, H), (len(sel), I, H), (len(sel), H, I)))
    fg, fd = ckpt.file(gu_key), ckpt.file(dn_key)
    for i, e in enumerate(sel):
        fg.copy_into(gu_key, gate[i], (e, slice(0, I)))
        fg.copy_into(gu_key, up[i], (e, slice(I, 2 * I)))
        fd.copy_into(dn_key, down[i], e)
    return _weights(L, "bf16", gate, up, down, sel, E, H, I, "fused", "/".join(sorted(codes)))


def _require(ckpt, L, base, fused, names):
    for name in names:
        if name not in fused:
            have = next(iter(fused.values()))
            raise invalid(f"layer {L} of {ckpt.source} has {have} {list(ckpt.shape(have))} but lacks {base}{name}")


def _gpt_oss_activation(config):
    """MoESFT's activation arguments for a gpt-oss config.json."""
    return {"activation": "swiglu_clamped", "swiglu_alpha": config.get("swiglu_alpha", GPT_OSS_ALPHA),
            "swiglu_limit": config.get("swiglu_limit", GPT_OSS_LIMIT)}


def _load_gpt_oss(ckpt, L, base, fused, config, experts):
    mxfp4 = "gate_up_proj_blocks" in fused or "down_proj_blocks" in fused
    weight_names = (("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales") if mxfp4
                    else ("gate_up_proj", "down_proj"))
    _require(ckpt, L, base, fused, weight_names + ("gate_up_proj_bias", "down_proj_bias"))
    E, H, I = (_gpt_oss_mxfp4_dims if mxfp4 else _gpt_oss_bf16_dims)(ckpt, *(fused[n] for n in weight_names))
    sel = _selection(experts, E, L)
    gate, up, down = (_gpt_oss_mxfp4 if mxfp4 else _gpt_oss_bf16)(ckpt, sel, E, H, I, *(fused[n] for n in weight_names))
    gub_key, dnb_key = fused["gate_up_proj_bias"], fused["down_proj_bias"]
    for key, want in ((gub_key, (E, 2 * I)), (dnb_key, (E, H))):
        if tuple(ckpt.shape(key)) != want:
            raise invalid(f"{key} has shape {list(ckpt.shape(key))}; expected {list(want)} (gpt-oss's layout, E, H "
                          f"and I from {fused[weight_names[0]]})")
        _float_code(ckpt, key)
    gate_up_bias, down_bias = np.empty((len(sel), 2 * I), np.float32), np.empty((len(sel), H), np.float32)
    for i, e in enumerate(sel):
        ckpt.file(gub_key).copy_into(gub_key, gate_up_bias[i], e)
        ckpt.file(dnb_key).copy_into(dnb_key, down_bias[i], e)
    gate_bias, up_bias = split_gate_up(gate_up_bias)
    model = {**_gpt_oss_activation(config), "gate_bias": gate_bias, "up_bias": up_bias, "down_bias": down_bias}
    source = "mxfp4" if mxfp4 else "/".join(sorted({_float_code(ckpt, fused[n]) for n in weight_names}))
    return _weights(L, "mxfp4" if mxfp4 else "bf16", gate, up, down, sel, E, H, I, "gpt_oss", source, model)


def _gpt_oss_bf16_dims(ckpt, gu_key, dn_key):
    """E, H, I of gpt-oss's gate_up_proj [E, H, 2I] (interleaved) and down_proj [E, I, H], checked."""
    gu = ckpt.shape(gu_key)
    if len(gu) != 3 or gu[2] % 2:
        raise invalid(f"{gu_key} has shape {list(gu)}; expected gpt-oss's [E, H, 2I] (gate and up interleaved)")
    E, H, I = gu[0], gu[1], gu[2] // 2
    if tuple(ckpt.shape(dn_key)) != (E, I, H):
        raise invalid(f"{dn_key} has shape {list(ckpt.shape(dn_key))}; expected {[E, I, H]} (gpt-oss's layout, E, "
                      f"H and I from {gu_key} {list(gu)})")
    _float_code(ckpt, gu_key), _float_code(ckpt, dn_key)
    return E, H, I


def _gpt_oss_bf16(ckpt, sel, E, H, I, gu_key, dn_key):
    """The bf16 gate, up [n, I, H], down [n, H, I] of the experts ``sel``, de-interleaved and transposed while
    they are copied."""
    gate, up, down = (np.empty(s, bfloat16) for s in ((len(sel), I, H), (len(sel), I, H), (len(sel), H, I)))
    fg, fd = ckpt.file(gu_key), ckpt.file(dn_key)
    for i, e in enumerate(sel):  # written through transposed views: [H, I] of the checkpoint into [I, H]
        fg.copy_into(gu_key, gate[i].T, (e, slice(None), slice(0, None, 2)))
        fg.copy_into(gu_key, up[i].T, (e, slice(None), slice(1, None, 2)))
        fd.copy_into(dn_key, down[i].T, e)
    return gate, up, down


def _gpt_oss_mxfp4_dims(ckpt, gu_blocks, gu_scales, dn_blocks, dn_scales):
    """E, H, I of gpt-oss's MXFP4 *_blocks [E, N, K/32, 16] and *_scales [E, N, K/32], checked."""
    gb = ckpt.shape(gu_blocks)
    if len(gb) != 4 or gb[1] % 2 or gb[3] != 16:
        raise invalid(f"{gu_blocks} has shape {list(gb)}; expected gpt-oss's MXFP4 [E, 2I, H/32, 16]")
    E, I, H = gb[0], gb[1] // 2, gb[2] * 32
    want = {gu_scales: (E, 2 * I, H // 32), dn_blocks: (E, H, I // 32, 16), dn_scales: (E, H, I // 32)}
    for key in (gu_blocks,) + tuple(want):
        if ckpt.code(key) != "U8":
            raise invalid(f"{key} has dtype {ckpt.code(key)}; expected U8 (MXFP4 nibbles and e8m0 scales)")
    for key, shape in want.items():
        if tuple(ckpt.shape(key)) != shape:
            raise invalid(f"{key} has shape {list(ckpt.shape(key))}; expected {list(shape)} (E, H and I from "
                          f"{gu_blocks} {list(gb)})")
    return E, H, I


def _gpt_oss_mxfp4(ckpt, sel, E, H, I, gu_blocks, gu_scales, dn_blocks, dn_scales):
    """The MXFP4 QuantizedWeight of gate, up and down of the experts ``sel`` (rows are outputs: gate_up_proj's
    interleave gate and up), the rows de-interleaved while the bytes are copied: no weight is ever dequantized."""
    out = []
    for blocks, scales, rows, N, K in ((gu_blocks, gu_scales, slice(0, None, 2), I, H),
                                       (gu_blocks, gu_scales, slice(1, None, 2), I, H),
                                       (dn_blocks, dn_scales, slice(None), H, I)):
        weights, scale = np.empty((len(sel), N, K // 2), np.uint8), np.empty((len(sel), N, K // 32), np.uint8)
        for i, e in enumerate(sel):
            ckpt.file(blocks).copy_into(blocks, weights[i].reshape(N, K // 32, 16), (e, rows))
            ckpt.file(scales).copy_into(scales, scale[i], (e, rows))
        out.append(QuantizedWeight("mxfp4", 32, weights, scale, None))
    return tuple(out)


def _expert_count(ckpt, L, base, names, per_expert, field):
    E = max(e for e, _ in per_expert) + 1
    for e in range(E):
        for proj in ("gate", "up", "down"):
            fields = per_expert.get((e, proj), {})
            if field not in fields:
                raise invalid(f"layer {L} of {ckpt.source} lacks {base}{e}.{names[proj]}.{field} (it has experts up "
                              f"to {E - 1}" + (f"; that module has {', '.join(sorted(fields))}" if fields else "")
                              + ")")
    return E


def _load_per_expert(ckpt, L, base, names, per_expert, layout, config, experts):
    fields = set().union(*per_expert.values())
    if "weight_packed" in fields:
        return _load_k2(ckpt, L, base, names, per_expert, layout, config, experts)
    if "weight" not in fields:
        raise invalid(f"layer {L} of {ckpt.source}: the experts hold {', '.join(sorted(fields))}; load_experts reads "
                      "weight (BF16/F16/F32) or weight_packed / weight_scale / weight_shape (compressed-tensors int4)")
    if "weight_scale_inv" in fields:
        return _load_fp8(ckpt, L, base, names, per_expert, layout, config, experts)
    if "weight_scale" in fields:
        raise invalid(f"layer {L} of {ckpt.source}: the experts have weight_scale tensors next to weight: quantized "
                      "checkpoints other than compressed-tensors int4 (weight_packed) and block-scaled FP8 "
                      "(weight_scale_inv) are not supported")
    E = _expert_count(ckpt, L, base, names, per_expert, "weight")
    key = {(e, p): per_expert[(e, p)]["weight"] for e in range(E) for p in ("gate", "up", "down")}
    I, H = _shape2(ckpt, key[(0, "gate")])
    want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    codes = set()
    for (e, p), k in key.items():
        if tuple(ckpt.shape(k)) != want[p]:
            raise invalid(f"{k} has shape {list(ckpt.shape(k))}; expected {list(want[p])} (from "
                          f"{key[(0, 'gate')]} {list(want['gate'])})")
        codes.add(_float_code(ckpt, k))
    sel = _selection(experts, E, L)
    out = {p: np.empty((len(sel),) + want[p], bfloat16) for p in ("gate", "up", "down")}
    for i, e in enumerate(sel):
        for p in ("gate", "up", "down"):
            ckpt.file(key[(e, p)]).copy_into(key[(e, p)], out[p][i])
    return _weights(L, "bf16", out["gate"], out["up"], out["down"], sel, E, H, I, layout, "/".join(sorted(codes)))


def _shape2(ckpt, key):
    shape = ckpt.shape(key)
    if len(shape) != 2:
        raise invalid(f"{key} has shape {list(shape)}; expected 2-D [out, in]")
    return shape


def _load_k2(ckpt, L, base, names, per_expert, layout, config, experts):
    E = _expert_count(ckpt, L, base, names, per_expert, "weight_packed")
    _expert_count(ckpt, L, base, names, per_expert, "weight_scale")
    if any("weight_zero_point" in v for v in per_expert.values()):
        raise invalid(f"layer {L} of {ckpt.source}: the experts have weight_zero_point (asymmetric int4); "
                      "load_experts reads symmetric pack-quantized int4 (Kimi-K2's) only")
    qc = config.get("quantization_config") or {}
    if qc and qc.get("format") not in (None, "pack-quantized"):
        raise invalid(f"config.json's quantization_config.format is {qc.get('format')!r}; load_experts reads "
                      "compressed-tensors pack-quantized int4")
    group_from_config = None
    for group in (qc.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if weights.get("num_bits") not in (None, 4) or weights.get("symmetric") is False:
            raise invalid(f"config.json's quantization_config has weights {weights}; load_experts reads symmetric "
                          "4-bit pack-quantized weights")
        group_from_config = weights.get("group_size") or group_from_config
    dims = {}  # proj -> (N, K), from weight_shape (or the packed shape)
    for e in range(E):
        for p in ("gate", "up", "down"):
            f = per_expert[(e, p)]
            packed, scale = f["weight_packed"], f["weight_scale"]
            if ckpt.code(packed) != "I32":
                raise invalid(f"{packed} has dtype {ckpt.code(packed)}; expected I32 (8 int4 values a word)")
            if ckpt.code(scale) != "BF16":
                raise invalid(f"{scale} has dtype {ckpt.code(scale)}; expected BF16 (the INT4_K2 format's scales)")
            N, Kw = _shape2(ckpt, packed)
            if "weight_shape" in f:
                ws = f["weight_shape"]
                shape_file = ckpt.file(ws)
                if ckpt.code(ws) not in ("I64", "I32") or shape_file.shape(ws) != (2,):
                    raise invalid(f"{ws} has dtype {ckpt.code(ws)} and shape {list(shape_file.shape(ws))}; "
                                  "expected 2 integers [N, K]")
                NK = tuple(int(v) for v in shape_file[ws])
            else:
                NK = (N, 8 * Kw)
            if NK[0] != N or NK[1] % 8 or NK[1] // 8 != Kw:
                raise invalid(f"{packed} has shape {[N, Kw]} but the weight's shape is {list(NK)}: expected "
                              f"[{NK[0]}, {NK[1]} / 8]")
            S = ckpt.shape(scale)
            if len(S) != 2 or S[0] != N or S[1] == 0 or NK[1] % S[1]:
                raise invalid(f"{scale} has shape {list(S)}; expected [{N}, K / group_size] for K = {NK[1]}")
            dims.setdefault(p, (NK, NK[1] // S[1], packed))
            first, g, first_key = dims[p]
            if (NK, NK[1] // S[1]) != (first, g):
                raise invalid(f"{packed} is [{NK[0]}, {NK[1]}] with group size {NK[1] // S[1]} but {first_key} is "
                              f"[{first[0]}, {first[1]}] with {g}: every expert must have one shape")
    (I, H), g = dims["gate"][0], dims["gate"][1]
    for p, want in (("up", (I, H)), ("down", (H, I))):
        if dims[p][0] != want or dims[p][1] != g:
            raise invalid(f"{dims[p][2]} is {list(dims[p][0])} with group size {dims[p][1]}; expected {list(want)} "
                          f"with group size {g} (from {dims['gate'][2]})")
    if group_from_config is not None and group_from_config != g:
        raise invalid(f"config.json's quantization_config has group_size {group_from_config} but the scales of "
                      f"layer {L} give {g}")
    sel = _selection(experts, E, L)
    out = {}
    for p, (N, K) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        weights = np.empty((len(sel), N, K // 8), np.int32)
        scale = np.empty((len(sel), N, K // g), bfloat16)
        for i, e in enumerate(sel):
            f = per_expert[(e, p)]
            ckpt.file(f["weight_packed"]).copy_into(f["weight_packed"], weights[i])
            ckpt.file(f["weight_scale"]).copy_into(f["weight_scale"], scale[i])
        out[p] = QuantizedWeight("int4_k2", g, weights, scale, None)
    return _weights(L, "int4_k2", out["gate"], out["up"], out["down"], sel, E, H, I, layout, "int4-pack-quantized")


def _fp8_block(config):
    """The [bn, bk] of an FP8 checkpoint's config.json (quantization_config.weight_block_size; 128 x 128 when
    there is none), after checking that it describes block-scaled e4m3."""
    qc = config.get("quantization_config") or {}
    where = "config.json's quantization_config"
    if not isinstance(qc, dict):
        raise invalid(f"{where} is {qc!r}; expected an object")
    if qc.get("quant_method") not in (None, "fp8"):
        raise invalid(f"{where}.quant_method is {qc.get('quant_method')!r} but the experts hold F8_E4M3 weight and "
                      "weight_scale_inv; expected 'fp8'")
    if qc.get("fmt") not in (None, "e4m3"):
        raise invalid(f"{where}.fmt is {qc.get('fmt')!r}; load_experts reads e4m3 weights")
    block = qc.get("weight_block_size")
    if block is None and "weight_block_size" in qc:
        raise invalid(f"{where}.weight_block_size is null: per-tensor FP8 scales are not supported (block-scaled only)")
    return block_size_for(block, f"{where}.weight_block_size")


def _load_fp8(ckpt, L, base, names, per_expert, layout, config, experts):
    E = _expert_count(ckpt, L, base, names, per_expert, "weight")
    _expert_count(ckpt, L, base, names, per_expert, "weight_scale_inv")
    bn, bk = _fp8_block(config)
    key = {(e, p): per_expert[(e, p)] for e in range(E) for p in ("gate", "up", "down")}
    I, H = _shape2(ckpt, key[(0, "gate")]["weight"])
    want = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    scale_codes = set()
    for (e, p), f in key.items():
        w, s = f["weight"], f["weight_scale_inv"]
        if ckpt.code(w) != "F8_E4M3":
            raise invalid(f"{w} has dtype {ckpt.code(w)}; expected F8_E4M3 (its module has weight_scale_inv)")
        if tuple(ckpt.shape(w)) != want[p]:
            raise invalid(f"{w} has shape {list(ckpt.shape(w))}; expected {list(want[p])} (from "
                          f"{key[(0, 'gate')]['weight']} {list(want['gate'])})")
        N, K = want[p]
        scale_shape = (-(-N // bn), -(-K // bk))
        if tuple(ckpt.shape(s)) != scale_shape:
            raise invalid(f"{s} has shape {list(ckpt.shape(s))}; expected {list(scale_shape)} = [ceil({N} / {bn}), "
                          f"ceil({K} / {bk})] for config.json's weight_block_size [{bn}, {bk}]")
        if ckpt.code(s) not in ("F32", "BF16"):
            raise invalid(f"{s} has dtype {ckpt.code(s)}; expected F32 or BF16")
        scale_codes.add(ckpt.code(s))
    scale_dtype = bfloat16 if scale_codes == {"BF16"} else np.dtype(np.float32)  # mixed: f32 holds both exactly
    sel = _selection(experts, E, L)
    out = {}
    for p, (N, K) in want.items():
        weights = np.empty((len(sel), N, K), np.uint8)
        scale = np.empty((len(sel), -(-N // bn), -(-K // bk)), scale_dtype)
        for i, e in enumerate(sel):
            f = key[(e, p)]
            ckpt.file(f["weight"]).copy_into(f["weight"], weights[i], raw=True)
            ckpt.file(f["weight_scale_inv"]).copy_into(f["weight_scale_inv"], scale[i])
        out[p] = QuantizedWeight(FP8, (bn, bk), weights, scale, None)
    return _weights(L, FP8, out["gate"], out["up"], out["down"], sel, E, H, I, layout, "F8_E4M3")
