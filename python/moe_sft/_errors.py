"""Exceptions carrying the C library's status and message."""

STATUS_NAMES = (
    "MOE_SFT_OK",
    "MOE_SFT_ERR_INVALID_ARGUMENT",
    "MOE_SFT_ERR_OUT_OF_MEMORY",
    "MOE_SFT_ERR_CACHE_FULL",
    "MOE_SFT_ERR_CACHE_EMPTY",
    "MOE_SFT_ERR_NON_FINITE",
    "MOE_SFT_ERR_UNSUPPORTED",
    "MOE_SFT_ERR_INTERNAL",
)
INVALID_ARGUMENT = 1


class MoESFTError(RuntimeError):
    """A call into moe_sft failed. ``status`` is the C status name, ``str(err)`` the library's message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class InvalidArgumentError(MoESFTError, ValueError):
    """An argument was rejected (shape, dtype, id, pointer...). Also a ValueError."""


def error_for(status_code, message):
    name = STATUS_NAMES[status_code] if 0 <= status_code < len(STATUS_NAMES) else f"status {status_code}"
    cls = InvalidArgumentError if status_code == INVALID_ARGUMENT else MoESFTError
    return cls(name, message)


def invalid(message):
    return InvalidArgumentError("MOE_SFT_ERR_INVALID_ARGUMENT", message)
