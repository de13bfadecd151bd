"""Where the installed files C programs and the cffi backend need live inside the package.

They are searched along the package's ``__path__`` rather than next to this file: in an editable install
the Python sources stay in the source tree while the built files (library, header, CMake and pkg-config
files) sit in the build tree, and ``__path__`` lists both.
"""
import os

import moe_sft

LIBRARY_NAME = "libmoe_sft.so"


def _find(*parts):
    for folder in moe_sft.__path__:
        path = os.path.join(folder, *parts)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{os.path.join(*parts)} not found in the moe_sft package ({', '.join(moe_sft.__path__)}); "
                            "is the package installed (pip install .) rather than imported from the source tree?")


def get_include():
    """Folder holding moe_sft.h (for compiling C programs against the installed library)."""
    return os.path.dirname(_find("include", "moe_sft.h"))


def get_library():
    """Path of the installed libmoe_sft shared library."""
    return _find(LIBRARY_NAME)


def get_cmake_dir():
    """Folder holding moe_sftConfig.cmake, for find_package(moe_sft CONFIG) (as moe_sft_DIR)."""
    return os.path.dirname(_find("cmake", "moe_sftConfig.cmake"))


def get_pkgconfig_dir():
    """Folder holding moe_sft.pc, for PKG_CONFIG_PATH."""
    return os.path.dirname(_find("pkgconfig", "moe_sft.pc"))


def get_peak_program():
    """Path of moe_sft_peak (bench/peak), or None when this build has none (compiler without AVX-512 BF16)."""
    try:
        return _find("moe_sft_peak")
    except FileNotFoundError:
        return None
