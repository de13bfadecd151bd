"""moe_sft.plan_exchange / moe_sft_plan_exchange: the send side of expert parallelism, against a numpy
reference written from the definition (rows ordered by owner rank, expert id, pair index), on both Python
backends, and at the pointer level (NULL, misaligned, overlapping arrays; nothing written on error)."""
import re

import numpy as np
import pytest

import moe_sft
from conftest import both_backends


def reference_plan(ids, placement, world):
    flat = ids.reshape(-1)
    pairs = np.flatnonzero(flat >= 0)
    order = np.lexsort((pairs, flat[pairs], placement[flat[pairs]]))  # last key sorts first
    pairs = pairs[order]
    counts = np.bincount(placement[flat[pairs]], minlength=world).astype(np.int64)
    return counts, np.concatenate([[0], np.cumsum(counts)[:-1]]), pairs


CASES = {  # name: (T, k, E, world, placement rule, -1 fraction)
    "even": (37, 3, 8, 2, lambda E, w, rng: np.arange(E) % w, 0.0),
    "uneven": (53, 4, 12, 3, lambda E, w, rng: np.array([0] * 7 + [1] * 1 + [2] * 4), 0.1),
    "rank without experts": (20, 2, 6, 4, lambda E, w, rng: np.array([0, 3, 3, 0, 1, 3]), 0.2),
    "shuffled": (64, 6, 16, 3, lambda E, w, rng: rng.integers(0, w, E), 0.05),
    "all -1": (5, 2, 4, 2, lambda E, w, rng: np.array([0, 1, 0, 1]), 1.0),
    "no tokens": (0, 2, 4, 2, lambda E, w, rng: np.array([0, 1, 0, 1]), 0.0),
    "one rank": (9, 2, 3, 1, lambda E, w, rng: np.zeros(E, int), 0.0),
}


@both_backends
@pytest.mark.parametrize("case", CASES)
def test_plan_matches_the_definition(case):
    T, k, E, world, rule, holes = CASES[case]
    rng = np.random.default_rng(len(case))
    placement = rule(E, world, rng)
    ids = rng.integers(0, E, (T, k))
    ids[rng.random((T, k)) < holes] = -1
    plan = moe_sft.plan_exchange(ids.astype(np.int32), placement, world)
    counts, offsets, pairs = reference_plan(ids, placement, world)
    np.testing.assert_array_equal(plan.counts, counts)
    np.testing.assert_array_equal(plan.offsets, offsets)
    np.testing.assert_array_equal(plan.pairs, pairs)
    assert plan.rows == (ids >= 0).sum() and plan.counts.sum() == plan.rows
    np.testing.assert_array_equal(plan.tokens * k + plan.slots, plan.pairs)
    # each rank's block holds exactly its experts' pairs, sorted by expert then token
    for r in range(world):
        block = ids.reshape(-1)[plan.pairs[offsets[r]:offsets[r] + counts[r]]]
        assert (placement[block] == r).all() and (np.diff(block) >= 0).all()


@both_backends
@pytest.mark.parametrize("ids, placement, world, message", [
    ([[0, 4]], [0, 1, 0, 1], 2, "expert_ids[0, 1] = 4 is out of range [-1, 4)"),
    ([[0, -2]], [0, 1, 0, 1], 2, "expert_ids[0, 1] = -2 is out of range [-1, 4)"),
    ([[0, 1]], [0, 1, 2, 1], 2, "placement[2] = 2 is out of range [0, 2)"),
    ([[0, 1]], [0, -1, 0, 1], 2, "placement[1] = -1 is out of range [0, 2)"),
    ([[0, 1]], [0, 1, 0, 1], 0, "world = 0 is out of range"),
    ([[0, 1]], [], 2, "expert_num = 0 is out of range"),
    (np.zeros((3, 0), int), [0, 1], 2, "top_k = 0 is out of range"),
])
def test_bad_input_names_argument_index_and_value(ids, placement, world, message):
    with pytest.raises(moe_sft.InvalidArgumentError, match=r"moe_sft\.plan_exchange: .*" + re.escape(message)):
        moe_sft.plan_exchange(np.asarray(ids), np.asarray(placement, dtype=np.int64), world)


def test_python_checks_before_the_library():
    with pytest.raises(moe_sft.InvalidArgumentError, match="placement must be a 1-D integer array"):
        moe_sft.plan_exchange(np.zeros((2, 2), int), np.zeros(4), 2)
    with pytest.raises(moe_sft.InvalidArgumentError, match="placement\\[1\\] = 4294967296 is out of range"):
        moe_sft.plan_exchange(np.zeros((2, 2), int), np.array([0, 2 ** 32]), 2)
    with pytest.raises(moe_sft.InvalidArgumentError, match="expert_ids has shape"):
        moe_sft.plan_exchange(np.zeros(4, int), [0, 1], 2)
    with pytest.raises(moe_sft.InvalidArgumentError, match="world = 1.5 is not an integer"):
        moe_sft.plan_exchange(np.zeros((2, 2), int), [0, 1], 1.5)


def test_pointer_level_errors_write_nothing():
    """What only a C caller can send: NULL, misaligned and overlapping arrays. Outputs keep their sentinel."""
    pytest.importorskip("cffi", reason="the pointer-level tests reach the C ABI through cffi")
    from abi import INVALID, OK, ffi, lib

    ids = np.array([[0, 1], [2, -1], [3, 0]], np.int64)
    placement = np.array([1, 0, 1, 0], np.int32)
    out = {n: np.full(size, 77, np.int64) for n, size in (("counts", 2), ("offsets", 2), ("pairs", 6), ("rows", 1))}

    def p(a, ctype="int64_t *", shift=0):
        return ffi.NULL if a is None else ffi.cast(ctype, a.__array_interface__["data"][0] + shift)

    def call(qlen=3, top_k=2, i=ids, experts=4, pl=placement, world=2, counts=out["counts"], offsets=out["offsets"],
             pairs=out["pairs"], rows=out["rows"], shift=None):
        shift = shift or {}
        return lib.moe_sft_plan_exchange(qlen, top_k, p(i, shift=shift.get("ids", 0)), experts,
                                         p(pl, "int32_t *", shift.get("placement", 0)), world, p(counts),
                                         p(offsets), p(pairs, shift=shift.get("pairs", 0)), p(rows))

    def last():
        return ffi.string(lib.moe_sft_last_error()).decode()

    fails = [
        (dict(i=None), "expert_ids is NULL"), (dict(pl=None), "placement is NULL"),
        (dict(counts=None), "send_counts is NULL"), (dict(offsets=None), "send_offsets is NULL"),
        (dict(pairs=None), "send_pairs is NULL"), (dict(rows=None), "send_rows is NULL"),
        (dict(shift={"ids": 4}), "expert_ids (address"), (dict(shift={"placement": 2}), "placement (address"),
        (dict(qlen=-1), "qlen = -1 is out of range"), (dict(world=-3), "world = -3 is out of range"),
        (dict(offsets=out["counts"]), "send_counts and send_offsets overlap"),
        (dict(pairs=ids.reshape(-1)), "expert_ids and send_pairs overlap"),
    ]
    for kwargs, message in fails:
        before = {n: a.copy() for n, a in out.items()}
        assert call(**kwargs) == INVALID, kwargs
        assert message in last(), (kwargs, last())
        for n, a in out.items():
            np.testing.assert_array_equal(a, before[n], err_msg=f"{kwargs}: {n} written on error")
    assert call() == OK
    assert out["rows"][0] == 5 and list(out["counts"]) == [2, 3] and list(out["pairs"]) == [1, 4, 0, 5, 2, -1]
    assert call(qlen=0, i=None, pairs=None) == OK and out["rows"][0] == 0 and list(out["counts"]) == [0, 0]
