"""PEFT LoRA adapters of the routed experts, saved and loaded without torch: save_adapter, load_adapter, Adapter.

Two layouts of ``adapter_model.safetensors`` (checked against PEFT 0.21.2's lora.ParamWrapper and its
target_parameters injection, and transformers 5.x's fused experts):

per_expert (target_modules: PEFT, vLLM and SGLang load it) - one nn.Linear LoRA per expert and projection:
    base_model.model.model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.lora_B.weight   [out, r]

fused (target_parameters on transformers >= 5's mlp.experts.gate_up_proj [E, 2I, H] and down_proj [E, H, I]):
PEFT wraps each 3-D parameter in a ParamWrapper; the second one targeted on a module wraps the first, so
gate_up_proj (first in the module) is the inner ``base_layer`` and down_proj the outer wrapper:
    base_model.model.model.layers.{L}.mlp.experts.base_layer.lora_A.weight   [E·r, H]    gate_up_proj
    base_model.model.model.layers.{L}.mlp.experts.base_layer.lora_B.weight   [2I, E·r]
    base_model.model.model.layers.{L}.mlp.experts.lora_A.weight              [E·r, I]    down_proj
    base_model.model.model.layers.{L}.mlp.experts.lora_B.weight              [H, E·r]
A's rows are (expert, rank) with the expert slowest (PEFT: A.reshape(E, r, in)); B's columns are (rank,
expert) with the expert fastest (PEFT: B.reshape(out, r, E)); expert e's delta is B_e @ A_e. gate_up_proj's
rows are gate's I rows then up's (transformers: ``gate, up = linear(x, gate_up_proj[e]).chunk(2)``), so gate
and up share one A: load_adapter returns that one array as both gate_a and up_a (bound as both, MoESFT.backward
gives its grad, the sum of both shares, as one array, and AdamW steps it once), and save_adapter(layout="fused")
refuses gate_a != up_a.

gpt-oss (``gpt_oss=True``; PEFT's target_parameters on GptOssExperts' gate_up_proj [E, H, 2I] and down_proj
[E, I, H], both stored transposed, which PEFT's ParamWrapper reads through the experts' ``is_transposed``): the
same four keys and shapes, expert e's delta of gate_up_proj[e] being (B_e A_e)^T, but gate_up_proj's columns
interleave gate and up (gate = 0::2, up = 1::2), so B's rows do too: gate_b = B_e[0::2], up_b = B_e[1::2]. The
files do not say which model they belong to: load_adapter and save_adapter take gpt_oss=True for it.

The library's arrays (moe_sft's data contract): gate_a, up_a [E, r, H]; gate_b, up_b [E, I, r]; down_a
[E, r, I]; down_b [E, H, r].
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._arrays import bfloat16
from ._errors import invalid
from ._safetensors import SafetensorsFile, read_json_object, save_safetensors

__all__ = ["Adapter", "save_adapter", "load_adapter"]

LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")
LAYOUTS = ("per_expert", "fused")
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model.model.layers.{}.mlp.experts."
_PER_EXPERT_KEY = _PREFIX + "{}.{}_proj.lora_{}.weight"
_FUSED_KEY = {"gate_up": _PREFIX + "base_layer.lora_{}.weight", "down": _PREFIX + "lora_{}.weight"}
TARGET_MODULES = ["gate_proj", "up_proj", "down_proj"]
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# what load_adapter understands (any prefix before layers.N, PEFT's ".default" adapter name, Mixtral's names)
_MOE = r"(?P<pre>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\."
_PER_EXPERT_RE = re.compile(_MOE + r"(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)"
                            r"\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_FUSED_RE = re.compile(_MOE + r"(?P<inner>(?:base_layer\.)*)lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


@dataclass
class Adapter:
    """A loaded adapter: ``layers`` {layer_idx: {gate_a, gate_b, up_a, up_b, down_a, down_b}} (the library's
    stacked arrays, writeable, C-contiguous, float32 or bfloat16), ``rank`` and ``alpha`` (adapter_config.json's
    r and lora_alpha), ``use_rslora``, ``scaling`` (what multiplies B A x: alpha / r, or alpha / sqrt(r) with
    rsLoRA), ``layout`` ("per_expert" or "fused"; with "fused" gate_a and up_a are one array),
    ``other_keys`` (adapter tensors that are not routed-expert LoRA, e.g. attention's: not loaded),
    ``config`` (the whole adapter_config.json), and for error messages ``keys`` {layer_idx: {gate_a, ...: the
    file's key holding it (expert 0's with per_expert)}} and ``key_shapes`` (those tensors' shapes in the file)."""

    layers: dict
    rank: int
    alpha: float
    use_rslora: bool
    layout: str
    config: dict = field(repr=False)
    other_keys: list = field(default_factory=list, repr=False)
    keys: dict = field(default_factory=dict, repr=False)
    key_shapes: dict = field(default_factory=dict, repr=False)

    def __repr__(self):
        shapes = {L: {n: a.shape for n, a in arrays.items()} for L, arrays in sorted(self.layers.items())}
        first = next(iter(shapes.values()), {})
        return (f"Adapter(layers={sorted(self.layers)}, rank={self.rank}, alpha={self.alpha}, "
                f"use_rslora={self.use_rslora}, layout={self.layout!r}, shapes={first})")

    @property
    def scaling(self):
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def file_shape(self, name, shape):
        """The shape this adapter's layout stores the library array ``name`` of shape [E, a, b] in (the tensor
        named by ``keys``): per_expert [a, b]; fused A [E·a, b], B [out, b·E] with gate_up's out = 2a."""
        E, a, b = shape
        if self.layout == "per_expert":
            return (a, b)
        if name.endswith("_a"):
            return (E * a, b)
        return (2 * a if name in ("gate_b", "up_b") else a, b * E)

    @property
    def layer_kwargs(self):
        """lora_rank and lora_alpha for MoESFT(...) giving this adapter's scaling (rsLoRA included: the layer
        computes lora_alpha / lora_rank)."""
        return {"lora_rank": self.rank, "lora_alpha": self.scaling * self.rank}

    def bind(self, layer, layer_idx):
        """Binds layer ``layer_idx``'s arrays to a MoESFT (update_lora), after checking the layer has that
        rank and scaling and the arrays have its shapes."""
        arrays = self.layers.get(layer_idx)
        if arrays is None:
            raise invalid(f"the adapter has no routed-expert LoRA for layer {layer_idx} (it has layers "
                          f"{sorted(self.layers)})")
        if layer.lora_rank != self.rank:
            raise invalid(f"the layer has lora_rank {layer.lora_rank} but the adapter has r = {self.rank}")
        if not math.isclose(layer.lora_alpha / layer.lora_rank, self.scaling, rel_tol=1e-6):
            raise invalid(f"the layer's scaling lora_alpha / lora_rank = {layer.lora_alpha / layer.lora_rank} but "
                          f"the adapter's is {self.scaling} (MoESFT(..., **adapter.layer_kwargs) matches it)")
        for name, shape in layer.lora_shapes().items():
            if arrays[name].shape != tuple(shape):
                raise invalid(f"layer {layer_idx} {name} has shape {arrays[name].shape} in the adapter but the layer "
                              f"needs {tuple(shape)}")
        layer.update_lora(*(arrays[n] for n in LORA_NAMES))
        return layer


def save_adapter(directory, layers, lora_rank, lora_alpha, layout=None, base_model_name_or_path=None,
                 use_rslora=False, gpt_oss=False):
    """Writes ``directory``/adapter_model.safetensors and adapter_config.json in PEFT's format.

    layers: {layer_idx: {gate_a, gate_b, up_a, up_b, down_a, down_b}} (or an Adapter), the library's arrays
    (float32 or bfloat16, kept in their dtype). layout: "per_expert" (target_modules, the default) or "fused"
    (target_parameters on mlp.experts.gate_up_proj / down_proj; needs gate_a == up_a). gpt_oss=True: the layers
    are gpt-oss's (MoESFT.from_gpt_oss): "fused" (the default then, and the only layout PEFT has for them) with
    gate_up_proj's interleaved rows. Returns the directory.
    """
    if isinstance(layers, Adapter):
        layers = layers.layers
    layout = ("fused" if gpt_oss else "per_expert") if layout is None else layout
    if layout not in LAYOUTS:
        raise invalid(f"layout = {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")
    if gpt_oss and layout != "fused":
        raise invalid(f"layout = {layout!r} with gpt_oss=True: gpt-oss's experts are 3-D parameters, which PEFT "
                      "adapts with target_parameters only (layout 'fused')")
    r = _positive_int(lora_rank, "lora_rank")
    if not isinstance(layers, Mapping) or not layers:
        raise invalid("layers must be a non-empty dict {layer_idx: {gate_a, gate_b, up_a, up_b, down_a, down_b}}")
    tensors = {}
    for L, arrays in layers.items():
        L = _layer_index(L)
        a = _checked_layer(L, arrays, r)
        E = a["gate_a"].shape[0]
        if layout == "per_expert":
            for e in range(E):
                for proj in ("gate", "up", "down"):
                    tensors[_PER_EXPERT_KEY.format(L, e, proj, "A")] = a[proj + "_a"][e]
                    tensors[_PER_EXPERT_KEY.format(L, e, proj, "B")] = a[proj + "_b"][e]
        else:
            if not (a["gate_a"] is a["up_a"] or np.array_equal(a["gate_a"], a["up_a"])):
                diff = np.argwhere(a["gate_a"] != a["up_a"])[0]
                raise invalid(f"layout='fused' stores one A for gate and up (PEFT's gate_up_proj), but layer {L}'s "
                              f"gate_a and up_a differ, first at {tuple(int(i) for i in diff)}: bind one array as "
                              "both, or save layout='per_expert'")
            gate_up_b = _gate_up(a["gate_b"], a["up_b"], gpt_oss)  # [E, 2I, r]
            tensors[_FUSED_KEY["gate_up"].format(L, "A")] = a["gate_a"].reshape(E * r, -1)
            tensors[_FUSED_KEY["gate_up"].format(L, "B")] = _fused_b(gate_up_b)
            tensors[_FUSED_KEY["down"].format(L, "A")] = a["down_a"].reshape(E * r, -1)
            tensors[_FUSED_KEY["down"].format(L, "B")] = _fused_b(a["down_b"])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": r, "lora_alpha": _alpha_json(lora_alpha), "lora_dropout": 0.0, "use_rslora": bool(use_rslora),
        "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "target_modules": list(TARGET_MODULES) if layout == "per_expert" else [],
        "target_parameters": list(TARGET_PARAMETERS) if layout == "fused" else None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "exclude_modules": None,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    save_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors, metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return directory


def _gate_up_rows(I, gpt_oss):
    """Where gate's and up's I rows sit among gate_up_proj's 2I: gate's then up's (transformers 5), or interleaved
    (gpt-oss: gate = 0::2, up = 1::2)."""
    return (slice(0, None, 2), slice(1, None, 2)) if gpt_oss else (slice(0, I), slice(I, None))


def _gate_up(gate, up, gpt_oss):
    """gate_up_proj's rows [E, 2I, ...] from gate's and up's [E, I, ...]."""
    out = np.empty((gate.shape[0], 2 * gate.shape[1]) + gate.shape[2:], gate.dtype)
    gate_rows, up_rows = _gate_up_rows(gate.shape[1], gpt_oss)
    out[:, gate_rows], out[:, up_rows] = gate, up
    return out


def _fused_b(b):
    """[E, out, r] -> PEFT's [out, r·E], column j·E + e = B_e[:, j] (the expert fastest)."""
    E, out, r = b.shape
    return np.ascontiguousarray(b.transpose(1, 2, 0)).reshape(out, r * E)


def _alpha_json(alpha):
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise invalid(f"lora_alpha = {alpha} is not finite")
    return int(alpha) if alpha.is_integer() else alpha


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise invalid(f"{name} = {value!r}; expected a positive integer")
    return int(value)


def _layer_index(L):
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 0:
        raise invalid(f"layer index {L!r} is not a non-negative integer")
    return int(L)


def _checked_layer(L, arrays, r):
    """Layer L's six arrays, checked for one consistent [E, ...] shape set with rank r."""
    if not isinstance(arrays, Mapping):
        raise invalid(f"layers[{L}] must be a dict of the six LoRA arrays, got {type(arrays).__name__}")
    missing = [n for n in LORA_NAMES if n not in arrays]
    if missing:
        raise invalid(f"layers[{L}] lacks {', '.join(missing)} (needs {', '.join(LORA_NAMES)})")
    a = {}
    for n in LORA_NAMES:
        x = arrays[n]
        x = x if isinstance(x, np.ndarray) else np.asarray(x)
        if x.dtype != bfloat16 and x.dtype.kind != "f":
            raise invalid(f"layers[{L}][{n!r}] has dtype {x.dtype}; expected float32 or bfloat16")
        if x.ndim != 3:
            raise invalid(f"layers[{L}][{n!r}] has shape {x.shape}; expected 3-D [experts, ...]")
        a[n] = x
    E, _, H = a["gate_a"].shape
    I = a["gate_b"].shape[1]
    expected = {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H), "up_b": (E, I, r),
                "down_a": (E, r, I), "down_b": (E, H, r)}
    for n, shape in expected.items():
        if a[n].shape != shape:
            raise invalid(f"layers[{L}][{n!r}] has shape {a[n].shape}; expected {shape} (E, H from gate_a, I from "
                          f"gate_b, r = lora_rank = {r})")
    return a


# ---- loading ----

def load_adapter(directory, dtype=None, layers=None, gpt_oss=False):
    """Reads a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) written by
    save_adapter or by PEFT, in either layout, and returns an Adapter (``.layers``
    {layer_idx: {gate_a, gate_b, up_a, up_b, down_a, down_b}}, ``.rank``, ``.alpha``, ``.scaling``,
    ``.layer_kwargs``).

    dtype: of the returned arrays, np.float32 or bfloat16; None keeps the file's when it is one of those for
    every tensor, else float32. layers: the layer indices wanted (None: all); a missing one is an error.
    rank_pattern / alpha_pattern, DoRA and LoRA biases are refused (one rank and scaling for every expert).
    gpt_oss=True: the adapter is of a gpt-oss model (fused, gate_up_proj's B rows interleaved: see the module's
    text); the files cannot tell, so it must be said.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise invalid(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory")
    if not os.path.isfile(weights_path):
        bin_path = os.path.join(directory, "adapter_model.bin")
        hint = " (it has adapter_model.bin, a torch pickle this package does not read)" if os.path.exists(
            bin_path) else ""
        raise invalid(f"{directory} has no {WEIGHTS_NAME}{hint}")
    config = _read_config(config_path)
    r, alpha, use_rslora = config["r"], float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    if dtype is not None and np.dtype(dtype) not in (np.dtype(np.float32), bfloat16):
        raise invalid(f"dtype = {dtype!r}; expected np.float32, bfloat16 or None")
    f = SafetensorsFile(weights_path)
    per_expert, fused, other = {}, {}, []
    for key in f:
        m = _PER_EXPERT_RE.match(key)
        if m:
            L, e, proj = int(m["layer"]), int(m["expert"]), _PROJ[m["proj"]]
            per_expert.setdefault(L, {})[(e, proj, m["ab"])] = key
            continue
        m = _FUSED_RE.match(key)
        if m:
            fused.setdefault(int(m["layer"]), {})[(m["inner"].count("base_layer."), m["ab"])] = key
            continue
        if ".lora_" in key and ".experts." in key and ".shared_expert" not in key:
            if key.endswith(".bias"):
                raise invalid(f"{weights_path}: {key} is a LoRA bias; load_adapter supports lora_bias=False only")
            if "lora_magnitude_vector" in key:
                raise invalid(f"{weights_path}: {key} is a DoRA magnitude; load_adapter supports plain LoRA only")
        other.append(key)
    both = sorted(set(per_expert) & set(fused))
    if both:
        raise invalid(f"{weights_path}: layer {both[0]} has both per-expert keys ({next(iter(per_expert[both[0]].values()))}) "
                      f"and fused ones ({next(iter(fused[both[0]].values()))})")
    found = sorted(set(per_expert) | set(fused))
    if not found:
        raise invalid(f"{weights_path} holds no routed-expert LoRA tensors (expected "
                      f"{_PER_EXPERT_KEY.format('L', 'e', 'gate', 'A')} or {_FUSED_KEY['down'].format('L', 'A')}); "
                      f"its keys: {_some(list(f))}")
    wanted = found if layers is None else [_layer_index(L) for L in layers]
    for L in wanted:
        if L not in per_expert and L not in fused:
            raise invalid(f"{weights_path} has no routed-expert LoRA for layer {L} (it has layers {found})")
    if dtype is None:
        codes = {f.code(k) for L in wanted for k in (per_expert.get(L) or fused[L]).values()}
        dtype = bfloat16 if codes == {"BF16"} else np.dtype(np.float32)
    dtype = np.dtype(dtype)
    out, names = {}, {}
    for L in wanted:
        if L in per_expert:
            if gpt_oss:
                raise invalid(f"{weights_path}: gpt_oss=True, but layer {L} has per-expert LoRA "
                              f"({next(iter(per_expert[L].values()))}); PEFT adapts gpt-oss's experts with "
                              "target_parameters (fused keys) only")
            out[L], names[L] = _load_per_expert(f, weights_path, L, per_expert[L], r, dtype)
        else:
            out[L], names[L] = _load_fused(f, weights_path, L, fused[L], r, dtype, gpt_oss)
    layout = "fused" if any(L in fused for L in wanted) else "per_expert"
    shapes = {L: {n: tuple(f.shape(k)) for n, k in keys.items()} for L, keys in names.items()}
    return Adapter(out, r, alpha, use_rslora, layout, config, other, names, shapes)


def _read_config(path):
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise invalid(f"{path}: peft_type is {peft_type!r}; load_adapter reads LoRA adapters")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise invalid(f"{path}: r = {r!r}; expected a positive integer")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise invalid(f"{path}: lora_alpha = {alpha!r}; expected a number")
    config.setdefault("lora_alpha", alpha)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise invalid(f"{path}: {key} = {config[key]!r}; load_adapter supports one r and lora_alpha for every "
                          "module (empty rank_pattern / alpha_pattern)")
    if config.get("use_dora"):
        raise invalid(f"{path}: use_dora is true; load_adapter supports plain LoRA only")
    if config.get("lora_bias"):
        raise invalid(f"{path}: lora_bias is true; load_adapter supports LoRA without bias only")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise invalid(f"{path}: use_rslora = {use_rslora!r}; expected true or false")
    return config


def _some(keys, n=8):
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "") if keys else "(none)"


def _load_per_expert(f, path, L, keys, r, dtype):
    E = max(e for e, _, _ in keys) + 1
    for e in range(E):  # every expert needs all six: name the first one missing
        for proj in ("gate", "up", "down"):
            for ab in "AB":
                if (e, proj, ab) not in keys:
                    like = next(k for (_, p, x), k in keys.items() if (p, x) == (proj, ab)) if any(
                        (p, x) == (proj, ab) for _, p, x in keys) else None
                    m = _PER_EXPERT_RE.match(like) if like else None
                    missing = (like[:m.start("expert")] + str(e) + like[m.end("expert"):] if m
                               else _PER_EXPERT_KEY.format(L, e, proj, ab))
                    have = like or next(iter(keys.values()))
                    raise invalid(f"{path}: layer {L} lacks {missing} (it has experts up to {E - 1}, e.g. {have} "
                                  f"with shape {list(f.shape(have))})")
    shape_of = {k: f.shape(keys[k]) for k in keys}
    ga, gb = shape_of[(0, "gate", "A")], shape_of[(0, "gate", "B")]
    if len(ga) != 2 or len(gb) != 2:
        raise invalid(f"{path}: {keys[(0, 'gate', 'A')]} has shape {list(ga)} and {keys[(0, 'gate', 'B')]} "
                      f"{list(gb)}; expected [r, in] and [out, r] with r = {r} (adapter_config.json)")
    H, I = ga[1], gb[0]
    want = {"gate": ((r, H), (I, r)), "up": ((r, H), (I, r)), "down": ((r, I), (H, r))}
    order = {"gate": 0, "up": 1, "down": 2}
    for (e, proj, ab), shape in sorted(shape_of.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
        expected = want[proj][ab == "B"]
        if tuple(shape) != expected:
            raise invalid(f"{path}: {keys[(e, proj, ab)]} has shape {list(shape)}; expected {list(expected)} "
                          f"(r = {r} from adapter_config.json, hidden {H} from {keys[(0, 'gate', 'A')]}, "
                          f"intermediate {I} from {keys[(0, 'gate', 'B')]})")
    out = {}
    for proj in ("gate", "up", "down"):
        for ab, name in (("A", proj + "_a"), ("B", proj + "_b")):
            a = np.empty((E,) + want[proj][ab == "B"], dtype)
            for e in range(E):
                f.copy_into(keys[(e, proj, ab)], a[e])
            out[name] = a
    return out, {proj + "_" + ab.lower(): keys[(0, proj, ab)] for proj in ("gate", "up", "down") for ab in "AB"}


def _load_fused(f, path, L, keys, r, dtype, gpt_oss):
    depth = sorted({d for d, _ in keys})
    for d in depth:
        for ab in "AB":
            if (d, ab) not in keys:
                have = "B" if ab == "A" else "A"
                other = keys[(d, have)]
                raise invalid(f"{path}: layer {L} has {other} (shape {list(f.shape(other))}) but lacks "
                              f"{other.replace('lora_' + have, 'lora_' + ab)}")
    if len(depth) != 2:
        raise invalid(f"{path}: layer {L} has fused LoRA for {len(depth)} parameter(s) ({_some(sorted(keys.values()))}); "
                      "expected two: mlp.experts.gate_up_proj and mlp.experts.down_proj")
    pairs = [(keys[(d, "A")], keys[(d, "B")]) for d in reversed(depth)]  # PEFT's gate_up_proj (inner) first
    for a_key, b_key in pairs:
        sa, sb = f.shape(a_key), f.shape(b_key)
        if len(sa) != 2 or len(sb) != 2 or sa[0] % r or sb[1] != sa[0]:
            raise invalid(f"{path}: {a_key} has shape {list(sa)} and {b_key} {list(sb)}; expected [E·r, in] and "
                          f"[out, E·r] with r = {r} (adapter_config.json)")
    # which pair is gate_up_proj (in H, out 2I) and which down_proj (in I, out H): the shapes decide (both
    # assignments cannot fit); PEFT nests gate_up_proj inside (base_layer), which is tried first
    (a0, b0), (a1, b1) = sorted(pairs, key=lambda p: -p[0].count("base_layer."))
    def fits(gu, dn):
        return f.shape(gu[0])[1] == f.shape(dn[1])[0] and f.shape(gu[1])[0] == 2 * f.shape(dn[0])[1]
    if fits((a0, b0), (a1, b1)):
        gu, dn = (a0, b0), (a1, b1)
    elif fits((a1, b1), (a0, b0)):
        gu, dn = (a1, b1), (a0, b0)
    else:
        raise invalid(f"{path}: layer {L}'s fused shapes do not fit gate_up_proj [E, 2I, H] and down_proj [E, H, I]: "
                      + "; ".join(f"{k} {list(f.shape(k))}" for k in (a0, b0, a1, b1)))
    E = f.shape(gu[0])[0] // r
    if f.shape(dn[0])[0] != E * r:
        raise invalid(f"{path}: {dn[0]} has shape {list(f.shape(dn[0]))} but {gu[0]} has "
                      f"{list(f.shape(gu[0]))}: the experts E·r = {E * r} must agree")
    H, I = f.shape(gu[0])[1], f.shape(dn[0])[1]
    shared_a = np.empty((E, r, H), dtype)
    f.copy_into(gu[0], shared_a.reshape(E * r, H))
    down_a = np.empty((E, r, I), dtype)
    f.copy_into(dn[0], down_a.reshape(E * r, I))
    gate_up_b = _unfuse_b(f, gu[1], 2 * I, r, E, dtype)
    gate_rows, up_rows = _gate_up_rows(I, gpt_oss)
    arrays = {"gate_a": shared_a, "gate_b": np.ascontiguousarray(gate_up_b[:, gate_rows]), "up_a": shared_a,
              "up_b": np.ascontiguousarray(gate_up_b[:, up_rows]), "down_a": down_a,
              "down_b": _unfuse_b(f, dn[1], H, r, E, dtype)}
    return arrays, {"gate_a": gu[0], "gate_b": gu[1], "up_a": gu[0], "up_b": gu[1], "down_a": dn[0], "down_b": dn[1]}


def _unfuse_b(f, key, out, r, E, dtype):
    """PEFT's B [out, r·E] (expert fastest) -> [E, out, r]."""
    b = np.empty((E, out, r), dtype)
    src = f[key].reshape(out, r, E)
    for e in range(E):
        np.copyto(b[e], src[:, :, e], casting="unsafe")
    f.release(f[key])
    return b
