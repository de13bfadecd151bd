"""examples/train.c, a C program that trains LoRA adapters with nothing but moe_sft.h (layer, bf16 converters,
AdamW), built against the installed package as a user builds it (cc ... $(python -m moe_sft --cflags --libs)),
plain and under -fsanitize=address,undefined, and run: the loss it prints must fall."""
import os
import re
import shlex
import subprocess

import pytest

from test_c_consumers import C_FLAGS, SANITIZERS, _compiler, _moe_sft_flags, _run


SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train.c")


@pytest.mark.parametrize("sanitized", [False, True], ids=["cc", "sanitized"])
def test_train_example_builds_runs_and_the_loss_falls(tmp_path, sanitized):
    exe = tmp_path / "train"
    _run(_compiler() + C_FLAGS + (SANITIZERS if sanitized else []) + [SOURCE, "-o", str(exe)]
         + shlex.split(_moe_sft_flags("--cflags", "--libs")))
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env.update(ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    done = subprocess.run([str(exe), "20"], capture_output=True, text=True, env=env, timeout=300)
    report = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, report
    losses = [float(v) for v in re.findall(r"^step +\d+ +loss (\S+)", done.stdout, re.M)]
    assert len(losses) == 21, report
    assert losses[-1] < 0.5 * losses[0], report
    assert "train: loss fell from" in done.stdout, report
