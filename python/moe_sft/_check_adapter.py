"""check_adapter: find the NaN and Inf values in a LoRA adapter, grouped by projection and expert, before
training resumes from it or inference loads it (an adapter can come out of training with hundreds of
poisoned tensors, and the first symptom is a sampling error far downstream).

Input: a dict name -> array, or the path of a ``.safetensors`` file, read here without the safetensors
package, by the package's own reader (moe_sft._safetensors: a memory map, the header validated first), a
bounded chunk at a time. Names are understood in two conventions:

- PEFT: ``base_model.model.model.layers.3.mlp.experts.17.gate_proj.lora_A.weight`` -> layer 3, routed
  expert 17, projection "gate", "lora_A". Shared experts, attention and dense MLP modules are grouped too.
- moe_sft's stacked arrays ``gate_a`` [E, r, H], ``gate_b``, ``up_a``, ``up_b``, ``down_a``, ``down_b``
  (also ``gate_lora_a``, ``gate_proj_lora_a``, with any ``layers.N.`` prefix), and PEFT-style names of a
  3-D tensor in an ``experts`` module without an expert index: one entry per bad expert (leading axis).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ._errors import invalid
from ._arrays import bfloat16
from ._safetensors import SafetensorsFile

__all__ = ["check_adapter", "AdapterReport", "BadTensor", "BadGroup"]

_CHUNK = 1 << 22  # elements scanned at a time: bounds the temporaries for multi-GB tensors

_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)(?=\.|$)")
_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)(?=\.|$)")
_STACKED = re.compile(r"^(gate|up|down)(?:_proj)?_(?:lora_)?([ab])$")
# expert projections by module name: HF gate/up/down_proj, Mixtral's w1 / w3 / w2
_EXPERT_PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up",
                       "w2": "down"}
_ATTENTION = {"self_attn", "attention", "attn", "cross_attn"}


@dataclass(frozen=True)
class BadTensor:
    """One tensor (or one expert's slice of a stacked array) holding non-finite values.

    component: "routed_experts", "shared_experts", "attention", "mlp" (dense) or "other"; layer and expert:
    ints or None; projection: "gate" / "up" / "down" for expert projections, else the module name (e.g.
    "q_proj"); which: "lora_A" / "lora_B" (or PEFT's other lora_* parts), "" for a non-LoRA tensor.
    first_bad_index is in the coordinates of the whole tensor ``name`` (expert axis included)."""

    name: str
    component: str
    layer: Optional[int]
    expert: Optional[int]
    projection: str
    which: str
    size: int
    n_nan: int
    n_inf: int
    first_bad_index: tuple
    first_bad_value: float


@dataclass(frozen=True)
class BadGroup:
    """Bad tensors of one (component, projection): how many (a stacked array counts once per bad expert),
    their NaN / Inf counts, and the layers and experts they belong to."""

    component: str
    projection: str
    tensors: int
    n_nan: int
    n_inf: int
    layers: tuple
    experts: tuple


@dataclass
class AdapterReport:
    """What check_adapter found. ``ok`` is True when every value is finite."""

    source: str
    tensors: int  # tensors read
    elements: int  # values read
    bad_tensors: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.bad_tensors

    def summary(self):
        """The bad tensors grouped by (component, projection), largest groups first."""
        groups = {}
        for b in self.bad_tensors:
            groups.setdefault((b.component, b.projection), []).append(b)
        out = [BadGroup(c, p, len(bs), sum(b.n_nan for b in bs), sum(b.n_inf for b in bs),
                        tuple(sorted({b.layer for b in bs if b.layer is not None})),
                        tuple(sorted({b.expert for b in bs if b.expert is not None})))
               for (c, p), bs in groups.items()]
        return sorted(out, key=lambda g: (-g.tensors, g.component, g.projection))

    def __str__(self, limit=20):
        if self.ok:
            return f"check_adapter({self.source}): all {self.tensors} tensors finite ({self.elements} values)"
        names = len({b.name for b in self.bad_tensors})
        lines = [f"check_adapter({self.source}): {names} of {self.tensors} tensors hold non-finite values "
                 f"({sum(b.n_nan for b in self.bad_tensors)} NaN, {sum(b.n_inf for b in self.bad_tensors)} Inf)"]
        for g in self.summary():
            where = [f"layers {_ranges(g.layers)}"] if g.layers else []
            where += [f"experts {_ranges(g.experts)}"] if g.experts else []
            lines.append(f"  {g.component} {g.projection}: {g.tensors} bad ({g.n_nan} NaN, {g.n_inf} Inf)"
                         + (", " + ", ".join(where) if where else ""))
        lines.append("bad tensors:")
        for b in self.bad_tensors[:limit]:
            expert = f" [expert {b.expert}]" if _stacked_entry(b) else ""
            lines.append(f"  {b.name}{expert}: {b.n_nan} NaN, {b.n_inf} Inf of {b.size}, first at "
                         f"{b.first_bad_index} = {b.first_bad_value}")
        if len(self.bad_tensors) > limit:
            lines.append(f"  ... and {len(self.bad_tensors) - limit} more")
        return "\n".join(lines)


def check_adapter(arrays_or_safetensors_path):
    """Reports the non-finite values of an adapter: a dict name -> array, or a ``.safetensors`` path.
    Returns an AdapterReport (``ok``, ``bad_tensors``, ``summary()``, readable ``str()``)."""
    source = arrays_or_safetensors_path
    if isinstance(source, Mapping):
        report = AdapterReport("<arrays>", 0, 0)
        for name, array in source.items():
            _check_tensor(report, str(name), _readable(np.asarray(array), name))
        return report
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        report = AdapterReport(path, 0, 0)
        for name, array in _read_safetensors(path):
            _check_tensor(report, name, array)
        return report
    raise invalid(f"check_adapter takes a dict name -> array or a .safetensors path, got {type(source).__name__}")


def _readable(a, name):
    if a.dtype.kind in "fbiu" or a.dtype == bfloat16:
        return a
    raise invalid(f"{name} has dtype {a.dtype}; check_adapter reads float, bfloat16, integer and bool arrays")


def _read_safetensors(path):
    """(name, array) for every tensor of the file, each a view of one memory map (the package's reader, which
    validates the whole header before the first tensor is handed out)."""
    f = SafetensorsFile(path)
    for name in f:
        yield name, f[name]


def _check_tensor(report, name, a):
    report.tensors += 1
    report.elements += a.size
    if a.dtype.kind in "biu":
        return
    component, layer, expert, projection, which = _parse_name(name)
    if component == "routed_experts" and expert is None and a.ndim == 3:
        for e in range(a.shape[0]):  # a stacked array: report per expert
            found = _scan(a[e])
            if found:
                index, value, n_nan, n_inf = found
                report.bad_tensors.append(BadTensor(name, component, layer, e, projection, which, a[e].size, n_nan,
                                                    n_inf, (e, *index), value))
        return
    found = _scan(a)
    if found:
        index, value, n_nan, n_inf = found
        report.bad_tensors.append(BadTensor(name, component, layer, expert, projection, which, a.size, n_nan, n_inf,
                                            index, value))


def _scan(a):
    """None when every value of ``a`` is finite, else (first bad index, its value, NaN count, Inf count)."""
    flat = a.reshape(-1)
    n_nan = n_inf = 0
    first = None
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if chunk.dtype not in (np.float32, np.float64):
            chunk = chunk.astype(np.float32)  # exact for f16 and bf16
        finite = np.isfinite(chunk)
        if finite.all():
            continue
        nan = np.isnan(chunk)
        n_nan += int(nan.sum())
        n_inf += int(chunk.size - finite.sum() - nan.sum())
        if first is None:
            first = start + int(np.argmin(finite))
    if first is None:
        return None
    index = tuple(int(i) for i in np.unravel_index(first, a.shape))
    return index, float(flat[first]), n_nan, n_inf


def _parse_name(name):
    """(component, layer, expert, projection, which) from a tensor name; see the module docstring."""
    parts = name.split(".")
    layer = _LAYER.search(name)
    expert = _EXPERT.search(name)
    layer = int(layer.group(1)) if layer else None
    expert = int(expert.group(1)) if expert else None
    stacked = _STACKED.match(parts[-1])
    lora = next((i for i, p in enumerate(parts) if p.startswith("lora_")), None)
    if stacked:  # moe_sft's own arrays: gate_a, up_b, ...
        return "routed_experts", layer, expert, stacked.group(1), "lora_" + stacked.group(2).upper()
    if lora is not None:
        module, which = parts[:lora], parts[lora]
    else:
        module, which = parts[:-1] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts, ""
    leaf = module[-1] if module else name
    if expert is not None or "experts" in module:
        component = "routed_experts"
    elif any(p.startswith("shared_expert") for p in module):
        component = "shared_experts"
    elif _ATTENTION.intersection(module):
        component = "attention"
    elif "mlp" in module:
        component = "mlp"
    else:
        component = "other"
    if component in ("routed_experts", "shared_experts"):
        leaf = _EXPERT_PROJECTIONS.get(leaf, leaf)
    if component == "routed_experts" and expert is None and leaf in ("experts", "base_layer"):
        # PEFT's fused target_parameters layout (see moe_sft._adapters): experts.base_layer.lora_* is
        # gate_up_proj (wrapped first), experts.lora_* is down_proj
        leaf = "gate_up" if leaf == "base_layer" else "down"
    return component, layer, expert, leaf, which


def _stacked_entry(b):
    return b.expert is not None and not _EXPERT.search(b.name)


def _ranges(values):
    """"1-3, 7" for (1, 2, 3, 7)."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
