"""Kernel blocking and tails, through the layer with one expert so every GEMM shape is under control:
M (rows of an expert) around the register / tile blocks, K and N around the 16-column panels, 32-wide
K tiles and 64-column tasks, including 1 and odd sizes; the small-M d·W path (M <= 8 on avx512_fma, <= 4
on avx512_bf16) and the re-paired path; and agreement of every kernel family with the portable one."""
import pytest

import moe_sft
import abi
import reference as R
from conftest import AVAILABLE_ISAS, assert_matches_reference, make_layer, run_layer

ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 33]
WIDTHS = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100]


def single_expert(T, H, I, rank, seed):
    p = R.make_problem(1, H, I, 1, T, rank, seed=seed)
    p.ids[:] = 0
    return p


@pytest.mark.parametrize("rows", ROWS)
def test_rows_around_blocks(isa, rows):
    p = single_expert(rows, 40, 72, 2, seed=rows)
    assert_matches_reference(p, *run_layer(make_layer(p), p), conditioned_routing=True)


@pytest.mark.parametrize("hidden", WIDTHS)
def test_hidden_around_panels(isa, hidden):
    p = single_expert(5, hidden, 48, 2, seed=hidden)
    assert_matches_reference(p, *run_layer(make_layer(p), p), conditioned_routing=True)


@pytest.mark.parametrize("inter", WIDTHS)
def test_intermediate_around_panels(isa, inter):
    p = single_expert(7, 48, inter, 3, seed=100 + inter)
    assert_matches_reference(p, *run_layer(make_layer(p), p), conditioned_routing=True)


def test_large_rows_and_widths(isa):
    p = single_expert(50, 130, 200, 4, seed=7)  # several K blocks, tasks and register blocks at once
    assert_matches_reference(p, *run_layer(make_layer(p), p), conditioned_routing=True)


@pytest.mark.parametrize("other", [i for i in AVAILABLE_ISAS if i != "generic"])
def test_families_agree_with_generic(monkeypatch, other):
    """Same arithmetic, other blocking: results agree far inside the reference tolerance."""
    p = R.make_problem(5, 70, 90, 2, 40, 4, seed=11)
    p.ids[:3, :] = 2  # one expert with many rows next to experts with few
    results = {}
    for isa in ("generic", other):
        monkeypatch.setenv("MOE_SFT_ISA", isa)
        layer = make_layer(p)
        assert layer.isa == isa
        results[isa] = run_layer(layer, p)
    (out_a, g_a), (out_b, g_b) = results["generic"], results[other]
    assert R.rel_err(out_b, out_a) < 2e-3
    for name in ("input", "routing_weights") + R.LORA_NAMES:
        assert R.rel_err(getattr(g_b, name), getattr(g_a, name)) < 2e-3, name


def _unavailable_here():
    """(family, MOE_SFT_MAX_ISA value) pairs where the family cannot run: the families this machine lacks, as
    they are, and every family above generic with MOE_SFT_MAX_ISA=generic (so the path runs on every machine,
    also one that runs every family)."""
    missing = [(i, None) for i in ("amx", "avx512_fma", "avx512_bf16") if i not in AVAILABLE_ISAS]
    return missing + [(i, "generic") for i in ("amx", "avx512_fma", "avx512_bf16", "amx-emulated")]


@pytest.mark.parametrize("family, cap", _unavailable_here(), ids=lambda v: str(v))
def test_forcing_an_unavailable_family_fails_clearly(monkeypatch, family, cap):
    if cap is None:
        monkeypatch.delenv("MOE_SFT_MAX_ISA", raising=False)
    else:
        monkeypatch.setenv("MOE_SFT_MAX_ISA", cap)
    monkeypatch.setenv("MOE_SFT_ISA", family)
    p = R.make_problem(1, 8, 8, 1, 1, 0)
    with pytest.raises(moe_sft.MoESFTError) as err:
        moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=0)
    assert err.value.status == abi.status_name(abi.UNSUPPORTED)
    assert f"MOE_SFT_ISA={family} cannot run here" in str(err.value)
    if cap is not None:
        assert f"above MOE_SFT_MAX_ISA={cap}" in str(err.value)
    with pytest.raises(moe_sft.MoESFTError, match="cannot run here") as err:
        moe_sft.isa()
    assert err.value.status == abi.status_name(abi.UNSUPPORTED)


def test_isa_cap_limits_the_automatic_choice(monkeypatch):
    """MOE_SFT_MAX_ISA=generic: new layers get generic; the family it names still runs when forced; a name that
    is no family is refused."""
    monkeypatch.delenv("MOE_SFT_ISA", raising=False)
    monkeypatch.setenv("MOE_SFT_MAX_ISA", "generic")
    assert moe_sft.isa() == "generic"
    monkeypatch.setenv("MOE_SFT_ISA", "generic")
    assert moe_sft.isa() == "generic"
    monkeypatch.setenv("MOE_SFT_MAX_ISA", "vax")
    with pytest.raises(moe_sft.InvalidArgumentError, match="MOE_SFT_MAX_ISA=vax is not a kernel family"):
        moe_sft.isa()


def test_isa_reports_the_family_new_layers_get(isa):
    assert moe_sft.isa() == isa  # the fixture forced it with MOE_SFT_ISA
    p = R.make_problem(1, 8, 8, 1, 1, 0)
    assert moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=0).isa == isa


def test_isa_without_forcing_picks_the_best_available(monkeypatch):
    monkeypatch.delenv("MOE_SFT_ISA", raising=False)
    # Of the two AVX-512 families, the one whose products measure faster here (which one, only the probe
    # inside the library knows).
    best = [{i} for i in ("amx", "generic") if i in AVAILABLE_ISAS][0]
    if "amx" not in AVAILABLE_ISAS and "avx512_bf16" in AVAILABLE_ISAS:
        best = {"avx512_fma", "avx512_bf16"}
    assert moe_sft.isa() in best
    monkeypatch.setenv("MOE_SFT_ISA", "vax")
    with pytest.raises(moe_sft.InvalidArgumentError, match="MOE_SFT_ISA=vax is not a kernel family"):
        moe_sft.isa()
