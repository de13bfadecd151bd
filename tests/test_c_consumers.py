"""The installed package from C: tests/c/smoke.c built with plain cc (python -m moe_sft --cflags --libs), with
CMake (find_package(moe_sft CONFIG)), with pkg-config, and with -fsanitize=address,undefined, then run on a
problem whose expected outputs come from the float64 numpy reference. The program compares them itself
(mean|a-b|/mean|b| <= 1e-2) and checks the error paths; see its header comment."""
import functools
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

import moe_sft
import reference as R

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "c", "smoke.c")
C_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror"]
SANITIZERS = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _tool(name):
    """``name`` from the running Python's environment first (pip's cmake lives there), then PATH."""
    return shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


def _compiler():
    compiler = os.environ.get("CC") or _tool("cc") or _tool("gcc") or _tool("clang")
    if not compiler:
        pytest.skip("no C compiler (cc, gcc or clang; or set CC)")
    return shlex.split(compiler)


@functools.lru_cache(maxsize=None)  # each is a fresh interpreter; the answers do not change within a run
def _moe_sft_flags(*flags):
    run = subprocess.run([sys.executable, "-m", "moe_sft", *flags], capture_output=True, text=True, check=True)
    return run.stdout.strip()


def _run(cmd, **kwargs):
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def problem_dir(tmp_path_factory):
    """A small problem with a -1 slot, written as raw arrays, and the reference's outputs as float64."""
    E, H, I, K, T, RANK = 4, 40, 24, 2, 9, 4
    p = R.make_problem(E, H, I, K, T, RANK, seed=100)
    p.ids[0, 1] = -1
    folder = tmp_path_factory.mktemp("smoke")
    (folder / "dims.txt").write_text(f"{E} {H} {I} {K} {T} {RANK} {p.alpha!r}\n")
    arrays = dict(gate=p.gate, up=p.up, down=p.down, x=p.x, grad_out=p.grad_out, ids=p.ids, weights=p.weights,
                  **p.lora)
    expected = {"output": R.forward(p), **R.backward(p)}
    arrays.update({f"expected_{name}": np.asarray(value, np.float64) for name, value in expected.items()})
    for name, a in arrays.items():
        a = a.view(np.uint16) if a.dtype == R.bf16 else a
        np.ascontiguousarray(a).tofile(folder / f"{name}.bin")
    return folder


def _build_cc(build, extra_flags=()):
    exe = build / "smoke"
    _run(_compiler() + C_FLAGS + list(extra_flags) + [SOURCE, "-o", str(exe)]
         + shlex.split(_moe_sft_flags("--cflags", "--libs")))
    return exe


def _build_pkg_config(build):
    pkg_config = _tool("pkg-config") or _tool("pkgconf")
    if not pkg_config:
        pytest.skip("pkg-config is not installed")
    env = dict(os.environ, PKG_CONFIG_PATH=_moe_sft_flags("--pkgconfig-dir"))
    flags = _run([pkg_config, "--cflags", "--libs", "moe_sft"], env=env).stdout
    exe = build / "smoke"
    _run(_compiler() + C_FLAGS + [SOURCE, "-o", str(exe)] + shlex.split(flags))
    return exe


def _build_cmake(build):
    cmake = _tool("cmake")
    assert cmake, "cmake not found: it comes with the test extra (pip install '.[test]')"
    env = dict(os.environ, CC=shlex.join(_compiler()))
    _run([cmake, "-S", os.path.join(HERE, "c"), "-B", str(build), f"-Dmoe_sft_DIR={_moe_sft_flags('--cmake-dir')}"],
         env=env)
    _run([cmake, "--build", str(build)])
    return build / "smoke"


BUILDS = {
    "cc": _build_cc,
    "cmake": _build_cmake,
    "pkg-config": _build_pkg_config,
    "sanitized": lambda build: _build_cc(build, SANITIZERS),
}


@pytest.mark.parametrize("build", BUILDS)
def test_c_program_against_the_installed_package(build, problem_dir, tmp_path):
    exe = BUILDS[build](tmp_path)
    # No LD_LIBRARY_PATH: the link flags' rpath (or CMake's build rpath) must find the library.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    done = subprocess.run([str(exe), str(problem_dir)], capture_output=True, text=True, env=env)
    report = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0 and "smoke: all checks passed" in done.stdout, report
    assert "FAIL" not in done.stdout and "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, report
    for check in ("output", "input", "routing_weights", *R.LORA_NAMES, "bad id: message", "bad id: output untouched",
                  "destroy(NULL)"):
        assert f"ok   {check}" in done.stdout, report


def test_build_flags_point_into_the_installed_package():
    include, library = moe_sft.get_include(), moe_sft.get_library()
    folder = os.path.dirname(library)
    assert _moe_sft_flags("--cflags") == f"-I{include}"
    assert _moe_sft_flags("--libs") == f"-L{folder} -lmoe_sft -Wl,-rpath,{folder}"
    assert os.path.isfile(os.path.join(_moe_sft_flags("--cmake-dir"), "moe_sftConfig.cmake"))
    assert os.path.isfile(os.path.join(_moe_sft_flags("--pkgconfig-dir"), "moe_sft.pc"))
    assert os.path.isfile(os.path.join(include, "moe_sft.h"))
