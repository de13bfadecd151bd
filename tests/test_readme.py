"""README.md's examples, executed as written, so they cannot rot: every ```python block in order in one
namespace (README's blocks continue each other: the routing example uses the layer of the first), the C
snippet built with README's own `cc ... $(python -m moe_sft --cflags --libs)` line and run, and exactly
README's CMake snippet (find_package + target_link_libraries) configured against the installed package the
way README says (-Dmoe_sft_DIR="$(python -m moe_sft --cmake-dir)")."""
import gc
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


PYTHON = blocks("python")
NAMESPACE = {"__name__": "readme"}


def test_readme_has_the_examples():
    assert len(PYTHON) >= 3 and len(blocks("c")) == 1 and len(blocks("cmake")) == 1


@pytest.fixture(scope="module", autouse=True)
def _free_the_namespace():
    """The blocks' objects go with this module's tests: a Transformers model holds its layers in reference
    cycles, which would otherwise outlive the nanobind module at exit (and make it report leaks)."""
    yield
    NAMESPACE.clear()
    gc.collect()


@pytest.mark.parametrize("index", [pytest.param(i, id=f"block{i}") for i in range(len(PYTHON))])
def test_python_block(index, monkeypatch, tmp_path, capsys):
    # blocks using an optional package skip cleanly without it
    for package, install in (("torch", "pip install torch==2.13.0"), ("transformers", "pip install 'moe_sft[hf]'"),
                             ("peft", "pip install 'moe_sft[hf]'")):
        if re.search(rf"^(?:import|from) .*\b{package}\b", PYTHON[index], re.MULTILINE):
            pytest.importorskip(package, reason=f"{package} is not installed ({install})")
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.delenv("MOE_SFT_ISA", raising=False)
    code = compile(PYTHON[index], f"README.md python block {index}", "exec")
    exec(code, NAMESPACE)  # noqa: S102 - README's own example code


# The C snippet uses the caller's buffers "in the shapes of the data contract"; the harness declares them
# (zeros: valid ids and finite values) and puts the snippet in a function that returns int.
C_HARNESS = """#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
{includes}

static int readme(void) {{
  const int32_t E = 4, H = 64, I = 48, T = 8, k = 2, r = 16;
  uint16_t *gate = calloc((size_t)E * I * H, 2), *up = calloc((size_t)E * I * H, 2);
  uint16_t *down = calloc((size_t)E * H * I, 2);
  float *gate_a = calloc((size_t)E * r * H, 4), *gate_b = calloc((size_t)E * I * r, 4);
  float *up_a = calloc((size_t)E * r * H, 4), *up_b = calloc((size_t)E * I * r, 4);
  float *down_a = calloc((size_t)E * r * I, 4), *down_b = calloc((size_t)E * H * r, 4);
  float *d_gate_a = calloc((size_t)E * r * H, 4), *d_gate_b = calloc((size_t)E * I * r, 4);
  float *d_up_a = calloc((size_t)E * r * H, 4), *d_up_b = calloc((size_t)E * I * r, 4);
  float *d_down_a = calloc((size_t)E * r * I, 4), *d_down_b = calloc((size_t)E * H * r, 4);
  int64_t *expert_ids = calloc((size_t)T * k, 8);
  float *routing_weights = calloc((size_t)T * k, 4), *grad_routing_weights = calloc((size_t)T * k, 4);
  uint16_t *x = calloc((size_t)T * H, 2), *out = calloc((size_t)T * H, 2);
  uint16_t *grad_out = calloc((size_t)T * H, 2), *grad_x = calloc((size_t)T * H, 2);
  (void)r;
{body}
  puts("readme snippet ran");
  return 0;
}}

int main(void) {{ return readme(); }}
"""


def c_program(folder):
    [snippet] = blocks("c")
    includes = "\n".join(line for line in snippet.splitlines() if line.startswith("#include"))
    body = "\n".join("  " + line for line in snippet.splitlines() if not line.startswith("#include"))
    source = folder / "main.c"
    source.write_text(C_HARNESS.format(includes=includes, body=body))
    return source


def readme_shell(command, folder):
    """One of README's shell lines, run in folder with this interpreter's environment first on PATH (so its
    `python` is the one the package is installed in)."""
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    env.pop("LD_LIBRARY_PATH", None)
    return subprocess.run(["bash", "-c", command], cwd=folder, env=env, capture_output=True, text=True)


def test_c_snippet_with_readme_build_line(tmp_path):
    c_program(tmp_path)
    [line] = [line for line in README.splitlines() if line.startswith("cc ") and "--cflags --libs" in line]
    run = readme_shell(line, tmp_path)
    assert run.returncode == 0 and "readme snippet ran" in run.stdout, f"{line}\n{run.stdout}\n{run.stderr}"


def test_cmake_snippet(tmp_path):
    [snippet] = blocks("cmake")
    c_program(tmp_path)
    (tmp_path / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18...3.31)\nproject(readme C)\n"
                                              "add_executable(main main.c)\n" + snippet)
    configure = re.search(r'configure with `(-Dmoe_sft_DIR="\$\(python -m moe_sft --cmake-dir\)")`', README)
    assert configure, "README names how to point CMake at the package"
    cmake = shlex.quote(os.path.join(os.path.dirname(sys.executable), "cmake"))
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "cmake")):
        cmake = "cmake"
    run = readme_shell(f"{cmake} -S . -B build {configure.group(1)} && {cmake} --build build && ./build/main",
                       tmp_path)
    assert run.returncode == 0 and "readme snippet ran" in run.stdout, f"{snippet}\n{run.stdout}\n{run.stderr}"
