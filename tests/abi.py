"""The library's own names and codes, read from the installed header and library, so that no test holds a hand
copy of a status, dtype, weight-format or scoring code: the header's CDEF block goes to cffi as it is (README,
"Use it from another runtime"), so the enum values below are the header's, and the names come from the
library's own ``moe_sft_status_string`` and ``moe_sft_weight_format_name``."""
import os

import cffi

import moe_sft

HEADER = os.path.join(moe_sft.get_include(), "moe_sft.h")


def cdef_block(path=HEADER):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text.split("/* MOE_SFT_CDEF_BEGIN */")[1].split("/* MOE_SFT_CDEF_END */")[0]


ffi = cffi.FFI()
ffi.cdef(cdef_block())
lib = ffi.dlopen(moe_sft.get_library())


def enum(name):
    """{C enumerator name: value} of the header's enum ``name``."""
    return dict(ffi.typeof(name).relements)


STATUS = enum("moe_sft_status")
OK = lib.MOE_SFT_OK
INVALID = lib.MOE_SFT_ERR_INVALID_ARGUMENT
CACHE_FULL = lib.MOE_SFT_ERR_CACHE_FULL
CACHE_EMPTY = lib.MOE_SFT_ERR_CACHE_EMPTY
NON_FINITE = lib.MOE_SFT_ERR_NON_FINITE
UNSUPPORTED = lib.MOE_SFT_ERR_UNSUPPORTED
DTYPE_BF16 = lib.MOE_SFT_DTYPE_BF16
DTYPE_F32 = lib.MOE_SFT_DTYPE_F32
SCORING = {name[len("MOE_SFT_SCORING_"):].lower(): value for name, value in enum("moe_sft_scoring").items()}


def status_name(code):
    """The library's name of a status code ("MOE_SFT_OK", ...)."""
    return ffi.string(lib.moe_sft_status_string(code)).decode()


def _format_name(code):
    name = lib.moe_sft_weight_format_name(code)
    return None if name == ffi.NULL else ffi.string(name).decode()


# weight format name -> code, from the header's enum and the library's names of its values
FORMAT_CODE = {_format_name(code): code for code in sorted(enum("moe_sft_weight_format").values())}
FORMATS = tuple(FORMAT_CODE)  # in code order
