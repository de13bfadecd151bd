"""Exceptions carrying the C library's status and message: one class per status, all MoESFTError.

Each class names the status it stands for (``status_name``, as moe_sft_status_string spells it); the status
codes are looked up in the library by those names, so no code is written down here. A status the library
adds later raises plain MoESFTError until it gets a class.
"""
import re

from . import _backend


class MoESFTError(RuntimeError):
    """A call into moe_sft failed. ``status`` is the C status name (e.g. "MOE_SFT_ERR_CACHE_FULL"),
    ``str(err)`` the library's message."""

    status_name = None

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class InvalidArgumentError(MoESFTError, ValueError):
    """An argument was rejected (shape, dtype, id, value...). Also a ValueError."""

    status_name = "MOE_SFT_ERR_INVALID_ARGUMENT"


class OutOfMemoryError(MoESFTError, MemoryError):
    """The library could not allocate. Also a MemoryError."""

    status_name = "MOE_SFT_ERR_OUT_OF_MEMORY"


class CacheFullError(MoESFTError):
    """forward(save_for_backward=True) with max_cache_depth forwards already saved (see discard_saved)."""

    status_name = "MOE_SFT_ERR_CACHE_FULL"


class CacheEmptyError(MoESFTError):
    """backward (or discard_saved) without a saved forward."""

    status_name = "MOE_SFT_ERR_CACHE_EMPTY"


class NonFiniteError(MoESFTError):
    """check_finite found a NaN or Inf; the message names the stage, tensor, position and value."""

    status_name = "MOE_SFT_ERR_NON_FINITE"


class UnsupportedError(MoESFTError):
    """A valid request this build or machine cannot serve (e.g. MOE_SFT_ISA names a family it cannot run)."""

    status_name = "MOE_SFT_ERR_UNSUPPORTED"


class InternalError(MoESFTError):
    """A bug in moe_sft: please report it with the message."""

    status_name = "MOE_SFT_ERR_INTERNAL"


ERRORS = (InvalidArgumentError, OutOfMemoryError, CacheFullError, CacheEmptyError, NonFiniteError, UnsupportedError,
          InternalError)


def _classes_by_code():
    """{status code: exception class}, from the library's status names (codes 1.. until it names none)."""
    by_name = {cls.status_name: cls for cls in ERRORS}
    classes, code = {}, 1
    while True:
        name = _backend.backend.status_string(code)
        if name == "unknown status":
            return classes
        classes[code] = by_name.get(name, MoESFTError)
        code += 1


_BY_CODE = _classes_by_code()


def status_name(code):
    """The library's name of a status code."""
    return _backend.backend.status_string(code)


def error_for(status_code, message):
    return _BY_CODE.get(status_code, MoESFTError)(status_name(status_code), message)


def invalid(message):
    return InvalidArgumentError(InvalidArgumentError.status_name, message)


# The library's messages start with the C function that failed; a Python caller called a Python method.
_PYTHON_NAMES = {"moe_sft_create": "MoESFT", "moe_sft_update_lora": "layer.update_lora",
                 "moe_sft_forward": "layer.forward", "moe_sft_backward": "layer.backward",
                 "moe_sft_discard_saved": "layer.discard_saved", "moe_sft_cache_depth": "layer.cache_depth",
                 "moe_sft_route": "moe_sft.route", "moe_sft_route_backward": "moe_sft.route_backward",
                 "moe_sft_quantize": "moe_sft.quantize", "moe_sft_isa": "moe_sft.isa",
                 "moe_sft_plan_exchange": "moe_sft.plan_exchange",
                 "moe_sft_adamw_create": "moe_sft.AdamW", "moe_sft_adamw_step": "AdamW.step",
                 "moe_sft_adamw_set_lr": "AdamW.lr", "moe_sft_adamw_set_config": "AdamW (hyperparameters)",
                 "moe_sft_adamw_set_step": "AdamW.load_state_dict"}
_C_NAME = re.compile(r"\bmoe_sft_[a-z_]+\b")


def python_message(message):
    """The library's message with the C functions it names replaced by the Python calls that reach them."""
    return _C_NAME.sub(lambda m: _PYTHON_NAMES.get(m.group(0), m.group(0)), message)
