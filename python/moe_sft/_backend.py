"""The backend that reaches libmoe_sft: the nanobind extension module or cffi.

A backend exposes the C ABI function by function, with numpy arrays for pointers, a Layer object that owns a
moe_sft_layer (and keeps its bound LoRA arrays alive) and statuses as return values (see ``_ext.cpp`` and
``_cffi_backend.py``, which mirror each other). ``_layer``, ``_router`` and ``_quantize`` are its users: they
check every array (naming the argument) and turn statuses into exceptions. Both load the same library file,
so a process holds one copy of the library whichever backends it imports.

The environment variable MOE_SFT_BACKEND=nanobind|cffi forces one, read when moe_sft is imported; without it
nanobind is used when its module imports, cffi otherwise.
"""
import importlib
import os

NAMES = ("nanobind", "cffi")
_MODULES = {"nanobind": "._moe_sft_ext", "cffi": "._cffi_backend"}


def load(name):
    """The backend module called ``name``; ImportError says why it is unavailable."""
    if name not in _MODULES:
        raise ImportError(f"{name!r} is not a moe_sft backend; MOE_SFT_BACKEND takes one of {', '.join(NAMES)}")
    try:
        return importlib.import_module(_MODULES[name], __package__)
    except (ImportError, OSError) as err:  # OSError: the library or header is missing or will not load
        hint = " (pip install 'moe_sft[cffi]')" if getattr(err, "name", None) == "cffi" else ""
        raise ImportError(f"the {name} backend of moe_sft is unavailable{hint}: {err}") from err


def _choose():
    forced = os.environ.get("MOE_SFT_BACKEND")
    if forced:
        return forced, load(forced)
    reasons = []
    for name in NAMES:
        try:
            return name, load(name)
        except ImportError as err:
            reasons.append(str(err))
    raise ImportError("no moe_sft backend could be loaded: " + "; ".join(reasons))


def use(name):
    """Switches this process to backend ``name``. For the test suite, which compares the backends in one
    process; programs pick a backend with MOE_SFT_BACKEND before importing moe_sft."""
    global NAME, backend
    backend = load(name)
    NAME = name


NAME, backend = _choose()
