"""The exchange plan of expert parallelism (moe_sft_plan_exchange): which of this rank's (token, slot) pairs go
to which rank, in which order. Pure bookkeeping: moe_sft.distributed moves the rows, a C host can do the same
with its own MPI (README, "Several hosts")."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from . import _backend
from ._arrays import _check, _expert_ids
from ._errors import invalid


@dataclass(frozen=True)
class ExchangePlan:
    """Send plan of one rank. ``counts[r]`` rows go to rank r, in the block starting at ``offsets[r]``; send row
    i is the pair ``pairs[i]`` (flat index t * top_k + j into expert_ids), i.e. token ``tokens[i]``, slot
    ``slots[i]``. Rows are ordered by (owner rank, expert id, token): each rank's block is sorted by expert."""

    counts: np.ndarray   # [world] int64
    offsets: np.ndarray  # [world] int64
    pairs: np.ndarray    # [rows] int64
    top_k: int

    @property
    def rows(self):
        return len(self.pairs)

    @property
    def tokens(self):
        return self.pairs // self.top_k

    @property
    def slots(self):
        return self.pairs % self.top_k


def placement_array(placement):
    """placement as the C-contiguous int32 [E] array of owner ranks the library reads."""
    p = np.asarray(placement)
    if p.dtype.kind not in "iu" or p.ndim != 1:
        raise invalid(f"placement must be a 1-D integer array (the owner rank of each expert), got dtype "
                      f"{p.dtype} and shape {p.shape}")
    if p.size and (p.min() < np.iinfo(np.int32).min or p.max() > np.iinfo(np.int32).max):
        bad = int(np.flatnonzero((p < np.iinfo(np.int32).min) | (p > np.iinfo(np.int32).max))[0])
        raise invalid(f"placement[{bad}] = {p[bad]} is out of range for a rank")
    return np.ascontiguousarray(p, dtype=np.int32)


def plan_exchange(expert_ids, placement, world):
    """Send plan of routing ``expert_ids`` [T, k] (int; -1 = no expert, never sent) when expert e lives on rank
    ``placement[e]`` (an int array [E], each in [0, world)) of ``world`` ranks. Returns an ExchangePlan. Ids
    outside [-1, E) and owners outside [0, world) raise InvalidArgumentError naming the index and value.

    The plan does not depend on which rank calls it: the rows a rank keeps are one block like the others (the
    all-to-all copies them locally), and the receiving side needs only the counts every rank sends it."""
    try:
        world = operator.index(world)
    except TypeError:
        raise invalid(f"moe_sft.plan_exchange: world = {world!r} is not an integer") from None
    ids = np.asarray(expert_ids)
    if ids.ndim != 2:
        raise invalid(f"moe_sft.plan_exchange: expert_ids has shape {ids.shape}; expected [tokens, top_k]")
    ids, k = _expert_ids(ids, ids.shape[0])
    owners = placement_array(placement)
    if not 1 <= world <= np.iinfo(np.int32).max:
        raise invalid(f"moe_sft.plan_exchange: world = {world} is out of range [1, {np.iinfo(np.int32).max}]")
    counts, offsets = np.empty(world, np.int64), np.empty(world, np.int64)
    pairs = np.empty(ids.size, np.int64)
    status, rows = _backend.backend.plan_exchange(ids, owners, world, counts, offsets, pairs)
    _check(status)
    return ExchangePlan(counts, offsets, pairs[:rows], k)
