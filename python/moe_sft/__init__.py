"""moe_sft: LoRA training on the routed experts of Mixture-of-Experts layers, on the CPU, without torch.

    layer = moe_sft.MoESFT(gate_proj, up_proj, down_proj, lora_rank=16, lora_alpha=32.0)
    layer.update_lora(gate_a, gate_b, up_a, up_b, down_a, down_b)   # kept by reference
    out = layer.forward(x, expert_ids, routing_weights, save_for_backward=True)
    grads = layer.backward(grad_out)
"""
import os as _os

from . import _backend
from ._errors import InvalidArgumentError, MoESFTError
from ._layer import Grads, MoESFT, bfloat16

__version__ = "0.1.0"

__all__ = ["MoESFT", "Grads", "MoESFTError", "InvalidArgumentError", "bfloat16", "get_include", "get_library",
           "library_version", "backend", "__version__"]

_HERE = _os.path.dirname(_os.path.abspath(__file__))


def get_include():
    """Folder holding moe_sft.h (for compiling C programs against the installed library)."""
    return _os.path.join(_HERE, "include")


def get_library():
    """Path of the installed libmoe_sft shared library."""
    for name in sorted(_os.listdir(_HERE)):
        if name.startswith("libmoe_sft.so"):
            return _os.path.join(_HERE, name)
    raise FileNotFoundError(f"libmoe_sft.so not found in {_HERE}")


def library_version():
    """Version of the loaded C library as (major, minor, patch)."""
    v = _backend.backend.version()
    return (v // 10000, v // 100 % 100, v % 100)


def backend():
    """Name of the backend in use ('nanobind')."""
    return _backend.NAME
