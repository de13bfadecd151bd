"""The two Python backends: the header's CDEF block as cffi reads it, one library for both, backend choice
through MOE_SFT_BACKEND, and the GIL released while the library computes."""
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import moe_sft
import reference as R
from conftest import make_layer
from moe_sft import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the backends' interface (moe_sft._ext and moe_sft._cffi_backend), each a C function of the same name but the
# Layer and AdamW classes
FUNCTIONS = {"create", "destroy", "update_lora", "forward", "backward", "discard_saved", "route", "route_backward",
             "plan_exchange", "quantize", "quantize_blocks", "weight_format_name", "activation_name", "dtype_name",
             "scoring_name", "cache_depth", "layer_isa", "isa",
             "status_string", "last_error", "version", "adamw_create", "adamw_destroy", "adamw_step",
             "adamw_get_config", "adamw_set_config", "adamw_set_lr", "adamw_get_step", "adamw_set_step", "adamw_state"}
CLASSES = {"Layer", "AdamW"}
ENUMS = {"Status", "DType", "WeightFormat", "Activation", "Scoring"}  # exported by the nanobind module for its callers


def _cffi():
    pytest.importorskip("cffi", reason="cffi is not installed (pip install 'moe_sft[cffi]')")
    return _backend.load("cffi")


HEADERS = {"source": os.path.join(ROOT, "include", "moe_sft.h"),
           "installed": os.path.join(moe_sft.get_include(), "moe_sft.h")}


@pytest.mark.parametrize("header", HEADERS)
def test_cdef_block_is_plain_c_that_cffi_reads_as_is(header):
    """The rule in moe_sft.h: the block between the CDEF markers goes to ffi.cdef() untouched."""
    block = _cffi().declarations(HEADERS[header])
    assert not re.search(r"^\s*#", block, re.MULTILINE), "the CDEF block must hold no preprocessor line"
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(block)
    lib = ffi.dlopen(moe_sft.get_library())
    functions = {name for name in dir(lib) if name.startswith("moe_sft_")}
    assert {f"moe_sft_{n}" for n in FUNCTIONS} | {"moe_sft_config_init"} <= functions
    for name in functions:  # every declared function is exported by the library
        getattr(lib, name)
    major, minor, patch = map(int, moe_sft.__version__.split("."))
    assert lib.moe_sft_version() == major * 10000 + minor * 100 + patch


def test_backends_expose_the_same_functions():
    nanobind = _backend.load("nanobind")
    assert {n for n in dir(nanobind) if not n.startswith("_")} == FUNCTIONS | ENUMS | CLASSES
    cffi_backend = _cffi()
    assert set(cffi_backend.__all__) == FUNCTIONS | CLASSES
    assert all(callable(getattr(cffi_backend, n)) for n in FUNCTIONS)


def test_both_backends_load_one_copy_of_the_library():
    """Both dlopen the package's libmoe_sft.so, so a process never holds two thread pools and arenas."""
    _backend.load("nanobind")
    _cffi()
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libmoe_sft" in line}
    assert paths == {os.path.realpath(moe_sft.get_library())}


def _import_moe_sft(cases):
    """Imports moe_sft in a fresh interpreter per case (env_backend, block_nanobind), all at once; returns
    (returncode, backend name or error text) per case."""
    runs = []
    for env_backend, block_nanobind in cases:
        block = "sys.modules['moe_sft._moe_sft_ext'] = None; " if block_nanobind else ""  # makes its import fail
        code = f"import sys; {block}import moe_sft; print(moe_sft.backend())"
        env = {k: v for k, v in os.environ.items() if k != "MOE_SFT_BACKEND"}
        if env_backend is not None:
            env["MOE_SFT_BACKEND"] = env_backend
        runs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    results = []
    for run in runs:
        out, err = run.communicate()
        results.append((run.returncode, out.strip() if run.returncode == 0 else err.strip().splitlines()[-1]))
    return results


def test_backend_choice():
    _cffi()
    default, nanobind, cffi, fallback, (code, error), (code2, error2) = _import_moe_sft(
        [(None, False), ("nanobind", False), ("cffi", False), (None, True), ("nanobind", True), ("ctypes", False)])
    assert default == (0, "nanobind")
    assert nanobind == (0, "nanobind")
    assert cffi == (0, "cffi")
    assert fallback == (0, "cffi")
    assert code != 0 and "ImportError: the nanobind backend of moe_sft is unavailable" in error
    assert code2 != 0 and "'ctypes' is not a moe_sft backend; MOE_SFT_BACKEND takes one of nanobind, cffi" in error2


def test_the_selected_backend_is_in_use(backend):
    assert moe_sft.backend() == backend
    assert _backend.backend is _backend.load(backend)


def test_compute_releases_the_gil(backend):
    """A Python thread keeps running while another thread is inside a forward call.

    A ticker thread notes every stretch in which it could not run; if the call held the GIL, the ticker
    would stall for the whole call. The call is made long (scaled from a timed run) so that an ordinary OS
    preemption of the ticker stays far below half of it."""
    p = R.make_problem(8, 512, 384, 2, 256, 8, seed=80)
    layer = make_layer(p, num_threads=1)  # leaves the other core to the ticker
    tokens = 256
    start = time.perf_counter()
    layer.forward(p.x, p.ids, p.weights)
    tokens = int(min(16384, tokens * max(1.0, 0.25 / (time.perf_counter() - start))))
    x, ids, weights = (np.resize(a, (tokens, a.shape[1])) for a in (p.x, p.ids, p.weights))

    stalls, running, done = [], threading.Event(), threading.Event()

    def tick():
        last = time.perf_counter()
        running.set()
        while not done.is_set():
            now = time.perf_counter()
            if now - last > 1e-3:
                stalls.append((last, now))
            last = now
        stalls.append((last, time.perf_counter()))

    ticker = threading.Thread(target=tick)
    ticker.start()
    running.wait()
    start = time.perf_counter()
    layer.forward(x, ids, weights)
    end = time.perf_counter()
    done.set()
    ticker.join()
    longest = max([min(b, end) - max(a, start) for a, b in stalls] + [0.0])
    assert longest < 0.5 * (end - start), (
        f"the ticker thread stalled {longest:.3f} s of a {end - start:.3f} s forward: the call holds the GIL")
