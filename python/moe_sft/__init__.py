"""moe_sft: LoRA training on the routed experts of Mixture-of-Experts layers, on the CPU, without torch.

    layer = moe_sft.MoESFT(gate_proj, up_proj, down_proj, lora_rank=16, lora_alpha=32.0)
    layer.update_lora(gate_a, gate_b, up_a, up_b, down_a, down_b)   # kept by reference
    out = layer.forward(x, expert_ids, routing_weights, save_for_backward=True)
    grads = layer.backward(grad_out)             # or layer.discard_saved() when no backward will come

    expert_ids, routing_weights = moe_sft.route(gate_logits, top_k)           # NaN-safe top-k router
    grad_logits = moe_sft.route_backward(gate_logits, expert_ids, grads.routing_weights)
    print(moe_sft.check_adapter("adapter_model.safetensors"))                 # where are the NaNs?

    layer = moe_sft.MoESFT(gate_proj, up_proj, down_proj, weight_format="int4_awq", group_size=128)  # QLoRA
    q = [moe_sft.quantize(w, "int8") for w in (gate_proj, up_proj, down_proj)]   # or a checkpoint's arrays
    layer = moe_sft.MoESFT.from_quantized(*q, lora_rank=16)

    layer = moe_sft.MoESFT.from_checkpoint("path/to/hf_checkpoint", layer_idx=3, lora_rank=16)  # or load_experts
    moe_sft.save_adapter("out", {3: lora_arrays}, lora_rank=16, lora_alpha=32)  # PEFT files; load_adapter reads

    lora = moe_sft.lora_init(layer, seed=0)      # PEFT's init: A Kaiming-uniform, B zero
    layer.update_lora(**lora)
    opt = moe_sft.AdamW(lora, lr=1e-3, max_grad_norm=1.0)   # torch.optim.AdamW in the library, in place
    report = opt.step(layer.backward(grad_out))             # report.skipped: a NaN/Inf grad changed nothing
"""
from . import _backend
from ._adapters import Adapter, load_adapter, save_adapter
from ._check_adapter import AdapterReport, BadGroup, BadTensor, check_adapter
from ._checkpoints import ExpertWeights, load_experts
from ._exchange import ExchangePlan, plan_exchange
from ._errors import (CacheEmptyError, CacheFullError, InternalError, InvalidArgumentError, MoESFTError,
                      NonFiniteError, OutOfMemoryError, UnsupportedError, error_for)
from ._layer import Grads, MoESFT, bfloat16
from ._optim import AdamW, StepReport, lora_init
from ._paths import get_include, get_library
from ._quantize import QuantizedWeight, dequantize, quantize
from ._router import route, route_backward
from ._safetensors import SafetensorsFile, save_safetensors

__all__ = ["MoESFT", "Grads", "MoESFTError", "InvalidArgumentError", "OutOfMemoryError", "CacheFullError",
           "CacheEmptyError", "NonFiniteError", "UnsupportedError", "InternalError", "bfloat16", "quantize",
           "dequantize", "QuantizedWeight", "route", "route_backward", "check_adapter", "AdapterReport", "BadTensor",
           "BadGroup", "get_include", "get_library", "library_version", "backend", "isa", "__version__",
           "save_adapter", "load_adapter", "Adapter", "load_experts", "ExpertWeights", "SafetensorsFile",
           "save_safetensors", "AdamW", "StepReport", "lora_init", "plan_exchange", "ExchangePlan"]


def isa():
    """Kernel family new layers get here and now ("amx", "avx512_fma", "avx512_bf16", "amx-emulated",
    "generic"), honouring MOE_SFT_ISA; raises MoESFTError when that names a family this machine cannot run."""
    status, name = _backend.backend.isa()
    if status != 0:
        raise error_for(status, _backend.backend.last_error())
    return name


def library_version():
    """Version of the loaded C library as (major, minor, patch)."""
    v = _backend.backend.version()
    return (v // 10000, v // 100 % 100, v % 100)


# The version is written once, in moe_sft.h (MOE_SFT_VERSION_MAJOR/MINOR/PATCH); the package metadata is read
# from there at build time (pyproject.toml), and the package reports the library it loaded.
__version__ = ".".join(map(str, library_version()))


def backend():
    """Name of the backend in use: 'nanobind' or 'cffi' (chosen at import, see MOE_SFT_BACKEND)."""
    return _backend.NAME
