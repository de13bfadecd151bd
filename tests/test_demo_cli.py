"""python -m moe_sft demo: impossible options end like argparse's own refusals (usage, one line naming the
option, exit status 2), never in a traceback or a silent fix; a small run end to end trains with moe_sft.AdamW,
writes the adapter as PEFT files where --out says (a fresh temporary directory without it), and the adapter
read back gives the trained layer's outputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import moe_sft
from moe_sft import demo


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


def test_demo_runs_a_tiny_problem(capsys, tmp_path):
    first, final, out_dir = demo.run(experts=2, hidden=32, intermediate=16, top_k=1, tokens=16, rank=4, steps=3,
                                     log_every=1, out_dir=tmp_path / "adapter")
    assert first == first and final == final  # finite losses, not nan
    out = capsys.readouterr().out
    assert "loss" in out and f"adapter saved to {tmp_path / 'adapter'}" in out
    assert out_dir == str(tmp_path / "adapter")
    adapter = moe_sft.load_adapter(out_dir)
    assert adapter.rank == 4 and adapter.alpha == 32 and list(adapter.layers) == [demo.LAYER_IDX]


def test_demo_default_out_is_a_fresh_temporary_directory(capsys):
    _, _, out_dir = demo.run(experts=2, hidden=32, intermediate=16, top_k=1, tokens=8, rank=2, steps=1)
    try:
        assert os.path.basename(out_dir).startswith("moe_sft_demo_adapter_")
        assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
        assert f"adapter saved to {out_dir}" in capsys.readouterr().out
    finally:
        for name in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, name))
        os.rmdir(out_dir)


def test_demo_from_the_command_line_trains_saves_and_reloads(tmp_path):
    """The user's path end to end, small: the loss falls (exit status 0), the PEFT files are where --out says,
    and the adapter they hold, bound to a fresh layer, gives the outputs the demo's check compared."""
    out_dir = tmp_path / "demo_adapter"
    result = subprocess.run([sys.executable, "-m", "moe_sft", "demo", "--experts", "4", "--hidden", "64",
                             "--intermediate", "32", "--tokens", "64", "--rank", "4", "--alpha", "8", "--steps", "40",
                             "--seed", "1", "--out", str(out_dir)],
                            capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"adapter saved to {out_dir}" in result.stdout and "same layer outputs" in result.stdout
    assert "AdamW" in result.stdout
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    with moe_sft.SafetensorsFile(out_dir / "adapter_model.safetensors") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.mlp.experts.3.down_proj.lora_B.weight" in keys and len(keys) == 4 * 6
    adapter = moe_sft.load_adapter(out_dir)
    shapes = {n: a.shape for n, a in adapter.layers[0].items()}
    assert shapes == {"gate_a": (4, 4, 64), "gate_b": (4, 32, 4), "up_a": (4, 4, 64), "up_b": (4, 32, 4),
                      "down_a": (4, 4, 32), "down_b": (4, 64, 4)}
    assert np.any(adapter.layers[0]["down_b"] != 0)  # trained: B moved away from its zero init
