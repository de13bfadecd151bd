"""python -m moe_sft demo: impossible options end like argparse's own refusals (usage, one line naming the
option, exit status 2), never in a traceback or a silent fix."""
import os
import subprocess
import sys

import pytest

from moe_sft import demo

pytestmark = pytest.mark.backend_independent

BAD_OPTIONS = {
    "rank 0": (["--rank", "0"], "--rank must be at least 1"),
    "steps 0": (["--steps", "0"], "--steps must be at least 1"),
    "top_k above experts": (["--top-k", "9"], "--top-k 9 is more than --experts 8"),
    "top_k 0": (["--top-k", "0"], "--top-k must be at least 1"),
    "no tokens": (["--tokens", "0"], "--tokens must be at least 1"),
    "no experts": (["--experts", "0"], "--experts must be at least 1"),
    "negative hidden": (["--hidden", "-4"], "--hidden must be at least 1"),
    "intermediate 0": (["--intermediate", "0"], "--intermediate must be at least 1"),
    "negative threads": (["--threads", "-1"], "--threads must be at least 0"),
    "zero lr": (["--lr", "0"], "--lr must be a positive finite number"),
    "nan alpha": (["--alpha", "nan"], "--alpha must be a positive finite number"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_demo_refuses_impossible_options(case, capsys):
    argv, needle = BAD_OPTIONS[case]
    with pytest.raises(SystemExit) as exit_:
        demo.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "usage:" in err


def test_demo_refusal_from_the_command_line_has_no_traceback():
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "moe_sft", "demo", "--rank", "0"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert "--rank must be at least 1" in result.stderr and "Traceback" not in result.stderr


def test_demo_runs_a_tiny_problem(capsys):
    first, final = demo.run(experts=2, hidden=32, intermediate=16, top_k=1, tokens=16, rank=4, steps=3, log_every=1)
    assert first == first and final == final  # finite losses, not nan
    assert "loss" in capsys.readouterr().out
