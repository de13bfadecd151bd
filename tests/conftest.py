import os

import numpy as np
import pytest

import moe_sft
import reference as R

KNOWN_ISAS = ("generic", "avx512_bf16", "amx-emulated", "amx")


def _runs_here(isa):
    old = os.environ.get("MOE_SFT_ISA")
    os.environ["MOE_SFT_ISA"] = isa
    try:
        p = R.make_problem(1, 8, 8, 1, 1, 0)
        moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=0).close()
        return True
    except moe_sft.MoESFTError:
        return False
    finally:
        if old is None:
            del os.environ["MOE_SFT_ISA"]
        else:
            os.environ["MOE_SFT_ISA"] = old


AVAILABLE_ISAS = [isa for isa in KNOWN_ISAS if _runs_here(isa)]


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request, monkeypatch):
    """Runs the test once per kernel family this machine can run (the family is fixed at layer create)."""
    monkeypatch.setenv("MOE_SFT_ISA", request.param)
    return request.param


def make_layer(p, **kwargs):
    layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha, **kwargs)
    if p.rank:
        layer.update_lora(*(p.lora[n] for n in R.LORA_NAMES))
    return layer


def run_layer(layer, p, **backward_kwargs):
    """forward(save) + backward on problem p; returns (out, Grads)."""
    out = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    return out, layer.backward(p.grad_out, **backward_kwargs)


def assert_matches_reference(p, out, grads, tol=1e-2):
    ref = R.backward(p)
    errors = {"output": R.rel_err(out, R.forward(p))}
    for name in ["input", "routing_weights"] + (list(R.LORA_NAMES) if p.rank else []):
        errors[name] = R.rel_err(getattr(grads, name), ref[name])
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative error above {tol}: {bad} (all: {errors})"
    return errors
