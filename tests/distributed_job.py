"""One multi-process job of tests/test_distributed.py: every case below on every rank, one launch per world size.

    mpirun -n N python distributed_job.py mpi
    python distributed_job.py torch RANK N PORT      (N processes, torch.distributed gloo on 127.0.0.1:PORT)

Each rank prints one line per case, "CASE <name> ok" or "CASE <name> FAIL <why>", and "DONE" at the end; the
test checks the lines of every rank. The reference is a single-process MoESFT over all experts on the tokens of
all ranks (every rank builds the same global problem from one seed, so the reference needs no communication).
"""
import os
import sys
import traceback

import numpy as np

import moe_sft
import reference as R
from moe_sft import distributed as D

U = 2.0 ** -8  # bf16's unit roundoff (8 significant bits)


def comm_of(argv):
    if argv[1] == "mpi":
        from mpi4py import MPI
        return MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    import torch.distributed as dist
    rank, world, port = int(argv[2]), int(argv[3]), argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return None, rank, world


def split(comm, groups, mine):
    """The sub-communicator of group ``mine`` of ``groups`` (lists of ranks; every rank in exactly one)."""
    if comm is not None:
        rank = comm.Get_rank()
        return comm.Split(color=mine, key=groups[mine].index(rank))
    import torch.distributed as dist
    made = [dist.new_group(g) for g in groups]  # every rank creates every group, in the same order
    return made[mine]


def full_layer(p, **kwargs):
    layer = moe_sft.MoESFT(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha, **kwargs)
    layer.update_lora(**p.lora)
    return layer


def local_lora(p, mine):
    return {n: np.ascontiguousarray(a[mine]) for n, a in p.lora.items()}


def ep_layer(comm, p, mine, **kwargs):
    layer = D.ExpertParallelMoE(comm, p.gate.shape[0], mine, p.gate[mine], p.up[mine], p.down[mine],
                                lora_rank=p.rank, lora_alpha=p.alpha, **kwargs)
    layer.update_lora(**local_lora(p, mine))
    return layer


def close_bf16(name, got, want, slots):
    """got = bf16(sum_j bf16(a_j)) against want = bf16(sum_j a_j): |got - want| <= u (sum_j |a_j| + |got| +
    |want|), with ``slots`` the per-slot results bf16(a_j) (k arrays): one rounding of each slot's row, and one
    rounding of each sum. A wrong or missing row is off by about |a_j|, far beyond."""
    got, want = R.f64(got), R.f64(want)
    bound = U * (sum(np.abs(R.f64(s)) for s in slots) * (1 + U) + np.abs(got) + np.abs(want)) + 1e-30
    err = np.abs(got - want)
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}{list(i)}: {got[i]} vs {want[i]}, bound {bound[i]}")


def close_f32(name, got, want, terms):
    """f32 sums of the same terms in another order: |error| <= n 2^-24 sum |terms|; taken as 1e-4 of the
    largest reference value (n up to a few hundred terms here) — a single wrong term is far beyond."""
    got, want = R.f64(got), R.f64(want)
    tol = 1e-4 * max(np.abs(want).max(initial=0.0), 1e-30) * max(1.0, terms / 100.0)
    err = np.abs(got - want).max(initial=0.0)
    if err > tol:
        raise AssertionError(f"{name}: max error {err} > {tol}")


class Global:
    """The problem of all ranks: tokens of rank r are rows starts[r] .. starts[r+1] of p."""

    def __init__(self, p, counts, placement):
        self.p, self.counts, self.placement = p, counts, np.asarray(placement)
        self.starts = np.concatenate([[0], np.cumsum(counts)])

    def rows(self, r):
        return slice(self.starts[r], self.starts[r + 1])

    def mine(self, r):
        return np.flatnonzero(self.placement == r)


def reference(g):
    """Outputs, grads and the per-slot outputs / grad_inputs of the single-process layer over all tokens."""
    p = g.p
    ids = p.ids
    layer = full_layer(p)
    out = layer.forward(p.x, ids, p.weights, save_for_backward=True)
    grads = layer.backward(p.grad_out)
    slot_out, slot_gi = [], []
    for j in range(ids.shape[1]):
        slot_out.append(layer.forward(p.x, ids[:, j:j + 1], p.weights[:, j:j + 1], save_for_backward=True))
        slot_gi.append(layer.backward(p.grad_out).input)
    return out, grads, slot_out, slot_gi


def check_rank(g, rank, out, grads, ref, mine=None):
    """This rank's part of the reference: its tokens' rows, its experts' LoRA grads (``mine``, in local order)."""
    ref_out, ref_grads, slot_out, slot_gi = ref
    rows, mine = g.rows(rank), g.mine(rank) if mine is None else mine
    close_bf16("out", out, ref_out[rows], [s[rows] for s in slot_out])
    close_bf16("grad_input", grads.input, ref_grads.input[rows], [s[rows] for s in slot_gi])
    close_f32("grad_routing_weights", grads.routing_weights, ref_grads.routing_weights[rows], g.p.x.shape[1])
    np.testing.assert_array_equal(grads.routing_weights[g.p.ids[rows] < 0], 0)
    for n in R.LORA_NAMES:
        close_f32(n, getattr(grads, n), getattr(ref_grads, n)[mine], len(g.p.x))


def problem(counts, E, k, seed, holes=0.0):
    p = R.make_problem(E, 48, 64, k, int(sum(counts)), 4, seed=seed)
    rng = np.random.default_rng(seed + 1)
    p.ids[rng.random(p.ids.shape) < holes] = -1
    return p


# ---- cases: each takes (comm, rank, world) and raises on failure ----

def case_uneven_with_holes(comm, rank, world):
    """Random routing with -1 ids; uneven token counts and an uneven, shuffled placement."""
    counts = [7 + 5 * r for r in range(world)]
    placement = np.array([0, 0, 0, 0, 0, 1, 2 % world, 1, 0, 2 % world, 0, 0])
    g = Global(problem(counts, 12, 3, seed=11, holes=0.15), counts, placement)
    p, rows = g.p, g.rows(rank)
    mine = g.mine(rank)[::-1]  # the local order is the caller's: reversed here
    layer = ep_layer(comm, p, mine)
    out = layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    grads = layer.backward(p.grad_out[rows])
    check_rank(g, rank, out, grads, reference(g), mine)
    assert out.dtype == moe_sft.bfloat16
    out32 = layer.forward(p.x[rows].astype(np.float32), p.ids[rows], p.weights[rows])
    assert out32.dtype == np.float32 and np.array_equal(out32, out.astype(np.float32))


def case_tokens_elsewhere_and_idle_ranks(comm, rank, world):
    """Rank 0's tokens all go to other ranks' experts; the last rank has no tokens; no token reaches rank 1's
    experts when world > 2 (rank 1 computes nothing but still takes part)."""
    counts = [9] + [6] * (world - 2) + [0]
    E = 2 * world
    placement = np.arange(E) % world
    g = Global(problem(counts, E, 2, seed=5), counts, placement)
    p = g.p
    targets = [e for e in range(E) if placement[e] != 0 and (world == 2 or placement[e] != 1)]
    rng = np.random.default_rng(3)
    p.ids[:] = np.array([rng.choice(targets, 2, replace=False) for _ in range(len(p.x))]).reshape(p.ids.shape)
    rows = g.rows(rank)
    layer = ep_layer(comm, p, g.mine(rank))
    out = layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    grads = layer.backward(p.grad_out[rows])
    check_rank(g, rank, out, grads, reference(g))
    if rank == 1 and world > 2:
        assert all(not getattr(grads, n).any() for n in R.LORA_NAMES)


def case_saved_forwards_lifo_and_discard(comm, rank, world):
    """Two saved forwards of different batches, backward in LIFO order; discard_saved drops one; depth as MoESFT."""
    counts = [6 + r for r in range(world)]
    E = 3 * world
    g = Global(problem(counts, E, 2, seed=21), counts, np.arange(E) % world)
    p, rows = g.p, g.rows(rank)
    layer = ep_layer(comm, p, g.mine(rank), max_cache_depth=2)
    half = Global(problem(counts, E, 2, seed=22), counts, np.arange(E) % world)
    half.p.gate, half.p.up, half.p.down, half.p.lora = p.gate, p.up, p.down, p.lora
    q = half.p
    out1 = layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    layer.forward(q.x[rows], q.ids[rows], q.weights[rows], save_for_backward=True)
    assert layer.cache_depth == 2
    try:
        layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
        raise AssertionError("a third saved forward did not raise")
    except moe_sft.CacheFullError:
        pass
    grads2 = layer.backward(q.grad_out[rows])
    check_rank(half, rank, layer.forward(q.x[rows], q.ids[rows], q.weights[rows]), grads2, reference(half))
    grads1 = layer.backward(p.grad_out[rows])
    check_rank(g, rank, out1, grads1, reference(g))
    assert layer.cache_depth == 0
    layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    layer.discard_saved()
    assert layer.cache_depth == 0 and layer.layer.cache_depth == 0
    # out= with accumulate adds the LoRA grads of two passes
    layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    acc = layer.backward(p.grad_out[rows])
    layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    layer.backward(p.grad_out[rows], out=acc, accumulate=True)
    for n in R.LORA_NAMES:
        close_f32(n, getattr(acc, n), 2 * getattr(grads1, n), 1)


def case_fused_adapter_accumulates_once(comm, rank, world):
    """A fused adapter (one A bound as gate_a and up_a): its grad is one array under both names, accumulated
    once per backward, equal to the single process's."""
    counts = [5 + r for r in range(world)]
    E = 2 * world
    g = Global(problem(counts, E, 2, seed=101), counts, np.arange(E) % world)
    p, rows, mine = g.p, g.rows(rank), g.mine(rank)
    p.lora["up_a"] = p.lora["gate_a"]
    whole = full_layer(p)
    layer = D.ExpertParallelMoE(comm, E, mine, p.gate[mine], p.up[mine], p.down[mine], lora_rank=p.rank,
                                lora_alpha=p.alpha)
    local = local_lora(p, mine)
    local["up_a"] = local["gate_a"]
    layer.update_lora(**local)
    want = acc = None
    for _ in range(2):  # the second pass adds into the first's grads
        whole.forward(p.x, p.ids, p.weights, save_for_backward=True)
        want = whole.backward(p.grad_out, out=want, accumulate=want is not None)
        layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
        acc = layer.backward(p.grad_out[rows], out=acc, accumulate=acc is not None)
    assert acc.up_a is acc.gate_a and want.up_a is want.gate_a
    for n in R.LORA_NAMES:
        close_f32(n, getattr(acc, n), getattr(want, n)[mine], len(p.x))


def expect_raise_everywhere(call, own_error, failing, rank, words):
    """call() must raise on every rank: own_error on the failing ranks (an int or a set), RemoteError naming
    them and their message elsewhere."""
    failing = {failing} if isinstance(failing, int) else set(failing)
    try:
        call()
    except D.RemoteError as err:
        assert rank not in failing and err.ranks == sorted(failing), (rank, err.ranks, str(err))
        assert all(f"rank {r}: " in str(err) for r in failing), str(err)
        assert all(w in str(err) for w in words), str(err)
        return
    except own_error as err:
        assert rank in failing, (rank, repr(err))
        return
    raise AssertionError("the call did not raise")


def case_bad_input_on_one_rank(comm, rank, world):
    """An id out of range on the last rank: every rank raises before any exchange; nothing saved anywhere; the
    layer works afterwards."""
    counts = [5] * world
    E = 2 * world
    g = Global(problem(counts, E, 2, seed=31), counts, np.arange(E) % world)
    p, rows = g.p, g.rows(rank)
    layer = ep_layer(comm, p, g.mine(rank), max_cache_depth=2)
    bad = world - 1
    ids = p.ids[rows].copy()
    if rank == bad:
        ids[2, 1] = E
    expect_raise_everywhere(lambda: layer.forward(p.x[rows], ids, p.weights[rows], save_for_backward=True),
                            moe_sft.InvalidArgumentError, bad, rank, ["expert_ids[2, 1] = " + str(E)])
    assert layer.cache_depth == 0 and layer.layer.cache_depth == 0
    # a wrong grad_output shape on rank 0 in backward: every rank raises and keeps its saved forward
    out = layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    go = p.grad_out[rows] if rank else p.grad_out[rows][:-1]
    expect_raise_everywhere(lambda: layer.backward(go), moe_sft.InvalidArgumentError, 0, rank, ["grad_output"])
    assert layer.cache_depth == 1 and layer.layer.cache_depth == 1
    check_rank(g, rank, out, layer.backward(p.grad_out[rows]), reference(g))


def case_non_finite_on_one_rank(comm, rank, world):
    """check_finite: a NaN in rank 0's x reaches the owner of its expert, whose local forward raises
    NonFiniteError: every rank raises, none keeps a saved forward. A NaN in grad_output in backward: every rank
    raises, out= is untouched, the saved forward is consumed on every rank."""
    counts = [4] * world
    E = 2 * world
    g = Global(problem(counts, E, 2, seed=41), counts, np.arange(E) % world)
    p, rows = g.p, g.rows(rank)
    layer = ep_layer(comm, p, g.mine(rank), check_finite=True)
    x = p.x[rows].copy()
    owners = set(g.placement[p.ids[0]].tolist())  # the ranks that receive rank 0's token 0
    if rank == 0:
        x[0, 3] = np.nan
    expect_raise_everywhere(lambda: layer.forward(x, p.ids[rows], p.weights[rows], save_for_backward=True),
                            moe_sft.NonFiniteError, owners, rank, ["NonFiniteError"])
    assert layer.cache_depth == 0 and layer.layer.cache_depth == 0
    layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    sentinel = {n: np.full(s, 7.0, np.float32) for n, s in layer.lora_shapes().items()}
    out = moe_sft.Grads(None, None, **{n: a.copy() for n, a in sentinel.items()})
    go = p.grad_out[rows].copy()
    if rank == 0:
        go[0, 2] = np.inf
    expect_raise_everywhere(lambda: layer.backward(go, out=out, accumulate=True), moe_sft.NonFiniteError,
                            owners, rank, ["NonFiniteError"])
    assert out.input is None and all(np.array_equal(getattr(out, n), sentinel[n]) for n in sentinel)
    assert layer.cache_depth == 0 and layer.layer.cache_depth == 0


def case_data_parallel(comm, rank, world):
    """world replicas of all experts on equal parts of one batch + allreduce_grads = one process on the whole
    batch: op="mean" with each replica's loss a mean over its tokens, op="sum" with summed losses."""
    T = 8 * world
    p = R.make_problem(6, 48, 64, 2, T, 4, seed=51)
    layer, whole = full_layer(p), full_layer(p)
    rows = slice(rank * 8, rank * 8 + 8)
    whole.forward(p.x, p.ids, p.weights, save_for_backward=True)
    want = whole.backward(p.grad_out)
    # each replica's grad_output is that of a loss summed over its tokens; op="mean" divides the sum by world
    # (with a loss averaged over each replica's tokens, the whole batch's mean comes out when the parts are equal)
    for op, scale in (("mean", 1.0 / world), ("sum", 1.0)):
        layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
        got = layer.backward(p.grad_out[rows])
        assert D.allreduce_grads(comm, got, op=op, bucket_bytes=20000) is got  # several buckets
        for n in R.LORA_NAMES:
            close_f32(f"{op} {n}", getattr(got, n), getattr(want, n) * scale, T)
    # a dict of arrays, a fused A given twice, and a bad op on the last rank (nothing written anywhere)
    a = np.full((3, 4), float(rank + 1), np.float32)
    grads = {"gate_a": a, "up_a": a, "down_b": np.ones(5, np.float32)}
    D.allreduce_grads(comm, grads, op="sum")
    assert (a == world * (world + 1) / 2).all() and (grads["down_b"] == world).all()
    before = a.copy()
    expect_raise_everywhere(lambda: D.allreduce_grads(comm, grads, op="max" if rank == world - 1 else "sum"),
                            moe_sft.InvalidArgumentError, world - 1, rank, ["op = 'max'"])
    assert np.array_equal(a, before)


def case_hybrid(comm, rank, world):
    """Expert parallel inside data-parallel replicas (world = 4: two replicas of two expert-parallel ranks): the
    replicas' LoRA grads averaged over the replica communicator equal one process on the whole batch."""
    if world != 4:
        return "skipped (needs 4 ranks)"
    replica, ep_rank = rank // 2, rank % 2
    ep = split(comm, [[0, 1], [2, 3]], replica)
    dp = split(comm, [[0, 2], [1, 3]], ep_rank)
    E, T = 6, 16
    p = R.make_problem(E, 48, 64, 2, T, 4, seed=61)
    placement = np.array([0, 1, 1, 0, 1, 1])
    mine = np.flatnonzero(placement == ep_rank)
    layer = ep_layer(ep, p, mine)
    per_rank = T // 4
    rows = slice(rank * per_rank, (rank + 1) * per_rank)  # replica r holds rows of its two ranks
    layer.forward(p.x[rows], p.ids[rows], p.weights[rows], save_for_backward=True)
    got = layer.backward((R.f64(p.grad_out[rows]) / (T // 2)).astype(R.bf16))  # mean over the replica's tokens
    D.allreduce_grads(dp, got)
    whole = full_layer(p)
    whole.forward(p.x, p.ids, p.weights, save_for_backward=True)
    want = whole.backward((R.f64(p.grad_out) / T).astype(R.bf16))
    for n in R.LORA_NAMES:
        close_f32(n, getattr(got, n), getattr(want, n)[mine], T)


def case_placement_checked_collectively(comm, rank, world):
    """An expert owned twice (or by no rank) is refused on every rank with the same message."""
    p = R.make_problem(2 * world, 48, 64, 2, 1, 4, seed=71)
    mine = [rank, (rank + 1) % world]  # expert r on ranks r and r-1; experts >= world on none
    try:
        D.ExpertParallelMoE(comm, 2 * world, mine, p.gate[mine], p.up[mine], p.down[mine], lora_rank=4)
    except moe_sft.InvalidArgumentError as err:
        assert "expert 0 is owned by 2 ranks" in str(err), str(err)
    else:
        raise AssertionError("a doubly owned expert was accepted")


def case_timeout_names_the_missing_rank(comm, rank, world):
    """The last rank never calls forward: the others raise DistributedTimeout naming it, within the timeout."""
    import time
    counts = [3] * world
    E = 2 * world
    g = Global(problem(counts, E, 2, seed=81), counts, np.arange(E) % world)
    p, rows = g.p, g.rows(rank)
    layer = D.ExpertParallelMoE(comm, E, g.mine(rank), p.gate[g.mine(rank)], p.up[g.mine(rank)],
                                p.down[g.mine(rank)], lora_rank=4, timeout=1.5)
    if rank != world - 1:
        start = time.monotonic()
        try:
            layer.forward(p.x[rows], p.ids[rows], p.weights[rows])
            raise AssertionError("no timeout")
        except D.DistributedTimeout as err:
            assert f"waited 1.5 s for rank {world - 1} " in str(err), str(err)
            assert time.monotonic() - start < 10
    if comm is not None:
        comm.Barrier()  # MPI: the waits were cancelled, the communicator goes on


def case_from_checkpoint(comm, rank, world):
    """Each rank loads only its experts from a checkpoint (its own copy of one, written here): the layer equals
    the one made from the arrays, bit for bit."""
    import tempfile
    counts = [4] * world
    E = 2 * world + 1
    placement = np.arange(E) % world
    g = Global(problem(counts, E, 2, seed=91), counts, placement)
    p, rows, mine = g.p, g.rows(rank), g.mine(rank)
    with tempfile.TemporaryDirectory() as d:
        tensors = {}
        for e in range(E):
            for name, w in (("gate_proj", p.gate), ("up_proj", p.up), ("down_proj", p.down)):
                tensors[f"model.layers.0.mlp.experts.{e}.{name}.weight"] = w[e]
        moe_sft.save_safetensors(os.path.join(d, "model.safetensors"), tensors)
        loaded = D.ExpertParallelMoE.from_checkpoint(comm, d, 0, mine, lora_rank=p.rank, lora_alpha=p.alpha)
    assert loaded.num_experts == E and loaded.layer.expert_num == len(mine)
    loaded.update_lora(**local_lora(p, mine))
    direct = ep_layer(comm, p, mine)
    a = loaded.forward(p.x[rows], p.ids[rows], p.weights[rows])
    b = direct.forward(p.x[rows], p.ids[rows], p.weights[rows])
    assert a.tobytes() == b.tobytes()


CASES = [case_uneven_with_holes, case_from_checkpoint, case_tokens_elsewhere_and_idle_ranks,
         case_saved_forwards_lifo_and_discard, case_fused_adapter_accumulates_once,
         case_bad_input_on_one_rank, case_non_finite_on_one_rank, case_placement_checked_collectively,
         case_data_parallel, case_hybrid, case_timeout_names_the_missing_rank]


def main():
    comm, rank, world = comm_of(sys.argv)
    only = os.environ.get("MOE_SFT_DIST_CASES")
    for case in CASES:
        name = case.__name__[len("case_"):]
        if only and name not in only.split(","):
            continue
        try:
            note = case(comm, rank, world)
            print(f"CASE {name} ok{' ' + note if note else ''}", flush=True)
        except Exception:  # noqa: BLE001 - reported to the test, which fails
            text = traceback.format_exc().replace("\n", " | ")
            print(f"CASE {name} FAIL {text}", flush=True)
    print("DONE", flush=True)
    if comm is None:  # torch: after the timeout case the group's connections to the last rank are closed
        os._exit(0)


if __name__ == "__main__":
    main()
