"""Expert-parallel and data-parallel LoRA training over MPI (mpi4py) or torch.distributed (gloo).

    from mpi4py import MPI                         # or a torch.distributed ProcessGroup (None: the default group)
    layer = ExpertParallelMoE(MPI.COMM_WORLD, num_experts=64, local_experts=[0, 1, ..., 31],
                              gate_proj=g, up_proj=u, down_proj=d, lora_rank=16)   # this rank's experts only
    layer.update_lora(**local_lora)                # the local experts' six arrays
    out = layer.forward(x, expert_ids, routing_weights, save_for_backward=True)    # this rank's tokens
    grads = layer.backward(grad_out)               # grad_input, routing-weight grads: this rank's tokens;
                                                   # LoRA grads: this rank's experts
    allreduce_grads(replica_comm, grads)           # data parallel: mean of the LoRA grads over replicas

Every call of a layer is collective over its communicator: all ranks call it, in the same order. Each call
first checks its own input, then the ranks agree (every rank reports whether it failed), so a bad input on
one rank makes every rank raise (RemoteError names the failing rank and its message) before anything moves,
and the same agreement after the local compute (e.g. a NonFiniteError on one rank) comes before any output is
written. Every wait is bounded by ``timeout`` seconds (DistributedTimeout names the ranks waited for).

This module imports neither mpi4py nor torch; ``import moe_sft`` does not import this module.
"""
from __future__ import annotations

import operator

import numpy as np

from ._arrays import _as_bf16, _forward_inputs, _out_array, bfloat16
from ._errors import CacheEmptyError, CacheFullError, invalid
from ._exchange import plan_exchange
from ._layer import Grads, MoESFT
from ._transport import DistributedTimeout, RemoteError, transport

__all__ = ["ExpertParallelMoE", "allreduce_grads", "RemoteError", "DistributedTimeout"]

DEFAULT_TIMEOUT = 300.0


def _same_everywhere(comm, values, names, call):
    """Checks that every rank holds the same integers ``values`` (sums of the values and of their squares
    equal size * v and size * v^2 only when all are v); raises the same error on every rank otherwise."""
    v = np.asarray(values, np.int64)
    sums = np.concatenate([v, v * v])
    comm.allreduce_sum(sums, call)
    for i, name in enumerate(names):
        if sums[i] != comm.size * v[i] or sums[len(v) + i] != comm.size * v[i] * v[i]:
            raise invalid(f"{call}: {name} differs between ranks (rank {comm.rank} has {v[i]}); it must be the "
                          "same on every rank")


def _rows_as_bytes(*columns):
    """Rows of several arrays (each [R, ...], any dtype) side by side as one [R, bytes] uint8 array."""
    parts = [np.ascontiguousarray(c).reshape(len(c), int(np.prod(c.shape[1:]))).view(np.uint8) for c in columns]
    return np.concatenate(parts, axis=1)


def _split_bytes(rows, *specs):
    """The inverse of _rows_as_bytes: specs are (dtype, elements per row)."""
    out, at = [], 0
    for dtype, n in specs:
        width = np.dtype(dtype).itemsize * n
        out.append(np.ascontiguousarray(rows[:, at:at + width]).view(dtype).reshape(len(rows), n))
        at += width
    return out


class _Saved:
    """What a saved forward needs for its backward: the send plan and what each rank sent here."""

    def __init__(self, plan, recv_counts, T, k, dtype):
        self.plan, self.recv_counts, self.T, self.k, self.dtype = plan, recv_counts, T, k, dtype


class ExpertParallelMoE:
    """A MoESFT layer whose experts are spread over the ranks of ``comm`` (expert parallelism).

    comm: an mpi4py intra-communicator, or a torch.distributed ProcessGroup (None: torch's default group).
    num_experts: E, the same on every rank. local_experts: the global ids this rank owns (any split, uneven
    allowed, at least one per rank; every id in [0, E) owned by exactly one rank: checked collectively).
    gate_proj, up_proj [len(local_experts), I, H], down_proj [len(local_experts), H, I]: exactly those experts
    in that order. layer_kwargs: MoESFT's (lora_rank, lora_alpha, max_cache_depth, num_threads, tp_count,
    check_finite, weight_format, group_size); H, lora_rank and max_cache_depth must agree across ranks.
    timeout: seconds any rank waits for the others in one step of a call.

    Tokens go to the rank of each (token, slot)'s expert with that slot's routing weight, so the owner computes
    routing_weight * expert(x) and the routing-weight grad <grad_out, expert(x)> exactly as a single MoESFT over
    all experts would; the token's rank adds its slots' rows (in f32, in slot order) and rounds once to bf16.
    """

    def __init__(self, comm, num_experts, local_experts, gate_proj, up_proj, down_proj, *, timeout=DEFAULT_TIMEOUT,
                 **layer_kwargs):
        self._comm = transport(comm, timeout)
        self._init(num_experts, local_experts,
                   lambda: (MoESFT(gate_proj, up_proj, down_proj, **layer_kwargs), num_experts))

    @classmethod
    def from_checkpoint(cls, comm, checkpoint_dir, layer_idx, local_experts, *, timeout=DEFAULT_TIMEOUT,
                        **layer_kwargs):
        """The experts ``local_experts`` of layer ``layer_idx`` of a Hugging Face checkpoint (see
        moe_sft.load_experts): each rank reads only its own experts' bytes. num_experts is the checkpoint's."""
        from ._checkpoints import load_experts
        self = cls.__new__(cls)
        self._comm = transport(comm, timeout)

        def make():
            weights = load_experts(checkpoint_dir, layer_idx, experts=local_experts)
            return weights.create_layer(MoESFT, **layer_kwargs), weights.total_experts

        self._init(None, local_experts, make)
        return self

    def _init(self, num_experts, local_experts, make_layer):
        """Validates this rank's part, makes its layer (make_layer() -> (MoESFT, E)), and checks collectively
        that the ranks agree on the shapes and own every expert exactly once."""
        comm, call = self._comm, "ExpertParallelMoE"
        self._local = None
        error = None
        try:
            local = np.asarray(local_experts)
            if local.ndim != 1 or local.dtype.kind not in "iu" or local.size == 0:
                raise invalid(f"{call}: local_experts must be a non-empty 1-D list of expert ids, got "
                              f"{local.dtype} {local.shape}")
            ids, first = np.unique(local, return_index=True)
            if ids.size != local.size:
                dup = int(np.setdiff1d(np.arange(local.size), first)[0])
                raise invalid(f"{call}: local_experts[{dup}] = {local[dup]} is listed twice")
            self._local, E = make_layer()
            E = operator.index(E)
            bad = np.flatnonzero((local < 0) | (local >= E))
            if bad.size:
                raise invalid(f"{call}: local_experts[{bad[0]}] = {local[bad[0]]} is out of range [0, {E}) "
                              f"(num_experts = {E})")
            if self._local.expert_num != local.size:
                raise invalid(f"{call}: the weights hold {self._local.expert_num} experts but local_experts lists "
                              f"{local.size}")
        except Exception as err:  # noqa: BLE001 - every rank must hear of it
            error = err
        comm.agree(error, call)
        _same_everywhere(comm, [E, self._local.hidden_size, self._local.lora_rank, self._local.max_cache_depth],
                         ["num_experts", "hidden_size", "lora_rank", "max_cache_depth"], call)
        owned = np.zeros(2 * E, np.int64)
        owned[local] = 1
        owned[E + local] = comm.rank
        comm.allreduce_sum(owned, call)
        owners = owned[:E]
        if (owners != 1).any():
            e = int(np.flatnonzero(owners != 1)[0])
            raise invalid(f"{call}: expert {e} is owned by {owners[e]} ranks; every expert needs exactly one "
                          f"(local_experts of all ranks together must list each of 0 .. {E - 1} once)")
        self.num_experts, self.local_experts = E, local.astype(np.int64)
        self.placement = owned[E:].astype(np.int32)  # owner rank of every expert
        self._local_index = np.full(E, -1, np.int64)
        self._local_index[local] = np.arange(local.size)
        self._saved = []

    # ---- state ----

    @property
    def layer(self):
        """The MoESFT over this rank's experts (read its attributes; call it only through this object)."""
        return self._local

    rank = property(lambda self: self._comm.rank)
    world = property(lambda self: self._comm.size)
    hidden_size = property(lambda self: self._local.hidden_size)

    @property
    def cache_depth(self):
        """Saved forwards awaiting backward (the same on every rank)."""
        return len(self._saved)

    def lora_shapes(self):
        return self._local.lora_shapes()

    def update_lora(self, *arrays, **named):
        """Binds the local experts' six LoRA arrays, or none to unbind (MoESFT.update_lora; not collective)."""
        self._local.update_lora(*arrays, **named)

    @property
    def lora(self):
        return self._local.lora

    def close(self):
        if self._local is not None:
            self._local.close()

    # ---- calls ----

    def forward(self, x, expert_ids, routing_weights, save_for_backward=False):
        """out[t] = sum_j routing_weights[t, j] * expert_{expert_ids[t, j]}(x[t]) for this rank's tokens, with
        global expert ids (-1: no expert); returns x's dtype. Collective."""
        comm, call = self._comm, "ExpertParallelMoE.forward"
        error = None
        try:
            x_in, xb, ids, w = _forward_inputs(x, expert_ids, routing_weights, self.hidden_size)
            T, k = ids.shape
            if save_for_backward and len(self._saved) >= self._local.max_cache_depth:
                raise CacheFullError(CacheFullError.status_name, f"{call}: {len(self._saved)} saved forwards "
                                     f"already (max_cache_depth); backward or discard_saved first")
            plan = plan_exchange(ids, self.placement, comm.size)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it
            error = err
        comm.agree(error, call + " (input)")
        recv_counts = comm.alltoall_counts(plan.counts, call)
        H = self.hidden_size
        rows = comm.alltoallv_rows(_rows_as_bytes(xb.view(np.uint16)[plan.tokens], ids.reshape(-1)[plan.pairs],
                                                  w.reshape(-1)[plan.pairs]), plan.counts, recv_counts, call)
        rx, rid, rw = _split_bytes(rows, (np.uint16, H), (np.int64, 1), (np.float32, 1))
        y, error = None, None
        try:
            y = self._local.forward(rx.view(bfloat16), self._local_index[rid], rw, save_for_backward)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it
            error = err
        try:
            comm.agree(error, call + " (local experts)")
        except Exception:
            if error is None and save_for_backward:
                self._local.discard_saved(1)  # this rank's part succeeded: the call as a whole did not
            raise
        back = comm.alltoallv_rows(_rows_as_bytes(y.view(np.uint16)), recv_counts, plan.counts, call)
        out = self._combine(back.view(np.uint16).view(bfloat16).reshape(-1, H), plan, T, k).astype(bfloat16)
        if save_for_backward:
            self._saved.append(_Saved(plan, recv_counts, T, k, x_in.dtype if x_in.dtype.kind == "f" else bfloat16))
        return out if x_in.dtype.kind != "f" or x_in.dtype == bfloat16 else out.astype(x_in.dtype)

    __call__ = forward

    @staticmethod
    def _combine(rows, plan, T, k):
        """sum over slots j of the rows of pairs (t, j), in f32, in slot order; -1 slots add nothing."""
        per_pair = np.zeros((T * k, rows.shape[1]), np.float32)
        per_pair[plan.pairs] = rows
        return per_pair.reshape(T, k, rows.shape[1]).sum(axis=1, dtype=np.float32)

    def backward(self, grad_output, out=None, accumulate=False):
        """Backward of the most recent saving forward (LIFO), which it consumes. Returns Grads: ``input`` and
        ``routing_weights`` for this rank's tokens, the LoRA grads of this rank's experts (f32, the local
        experts' shapes). ``out``/``accumulate`` as MoESFT.backward (LoRA grads added into ``out``'s). Collective.
        A call that fails on any rank raises on every rank, writes nothing, and consumes the saved forward on
        every rank (a rank whose local backward succeeded cannot restore it)."""
        comm, call = self._comm, "ExpertParallelMoE.backward"
        error = None
        try:
            if not self._saved:
                raise CacheEmptyError(CacheEmptyError.status_name, f"{call}: no saved forward to take: call forward("
                                      "..., save_for_backward=True) first")
            saved = self._saved[-1]
            go = _as_bf16(grad_output, "grad_output", (saved.T, self.hidden_size))
            if out is not None and not isinstance(out, Grads):
                raise invalid(f"out must be a moe_sft.Grads, got {type(out).__name__}")
            if accumulate and out is None:
                raise invalid(f"{call}: accumulate=True needs out= (the grads to add into)")
            if out is not None and self._local.lora_rank > 0:
                for n, shape in self.lora_shapes().items():
                    if getattr(out, n) is not None or accumulate:
                        _out_array(getattr(out, n), f"out.{n}", shape, np.float32)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it
            error = err
        comm.agree(error, call + " (input)")
        plan, H = saved.plan, self.hidden_size
        recv_go = comm.alltoallv_rows(_rows_as_bytes(go.view(np.uint16)[plan.tokens]), plan.counts,
                                      saved.recv_counts, call).view(np.uint16).view(bfloat16).reshape(-1, H)
        g, error = None, None
        try:
            g = self._local.backward(recv_go)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it
            error = err
        try:
            comm.agree(error, call + " (local experts)")
        except Exception:
            self._saved.pop()
            if error is not None and self._local.cache_depth > len(self._saved):
                self._local.discard_saved(1)
            raise
        self._saved.pop()
        back = comm.alltoallv_rows(_rows_as_bytes(g.input.view(np.uint16), g.routing_weights), saved.recv_counts,
                                   plan.counts, call)
        gi_rows, gw_rows = _split_bytes(back, (np.uint16, H), (np.float32, 1))
        gi = self._combine(gi_rows.view(bfloat16), plan, saved.T, saved.k).astype(bfloat16)
        gw = np.zeros(saved.T * saved.k, np.float32)
        gw[plan.pairs] = gw_rows[:, 0]
        result = out if out is not None else Grads(None, None, **{n: None for n in Grads.LORA_FIELDS})
        result.input = gi if saved.dtype == bfloat16 else gi.astype(saved.dtype)
        result.routing_weights = gw.reshape(saved.T, saved.k)
        written = {}  # id of a local grad -> the array it went to (a fused adapter's A is one grad, two names)
        for n in Grads.LORA_FIELDS:
            mine, theirs = getattr(g, n), getattr(result, n)
            if mine is not None and id(mine) in written:
                setattr(result, n, written[id(mine)])
                continue
            if mine is None or theirs is None:
                setattr(result, n, mine)
            elif accumulate:
                theirs += mine
            else:
                theirs[...] = mine
            if mine is not None:
                written[id(mine)] = getattr(result, n)
        return result

    def discard_saved(self, n=1):
        """Drops the n most recent saved forwards (as MoESFT.discard_saved). Not collective, but every rank
        must do the same to keep the saved forwards paired."""
        try:
            n = operator.index(n)
        except TypeError:
            raise invalid(f"ExpertParallelMoE.discard_saved: n = {n!r} is not an integer") from None
        if n < 0:
            raise invalid(f"ExpertParallelMoE.discard_saved: n = {n} is negative")
        if n > len(self._saved):
            raise CacheEmptyError(CacheEmptyError.status_name, f"ExpertParallelMoE.discard_saved: n = {n} but "
                                  f"{len(self._saved)} forwards are saved")
        self._local.discard_saved(n)
        del self._saved[len(self._saved) - n:]


def allreduce_grads(comm, grads, op="mean", *, bucket_bytes=64 << 20, timeout=DEFAULT_TIMEOUT):
    """Data parallelism: the LoRA grads (a Grads, or a dict name -> f32 array) summed (op="sum") or averaged
    (op="mean") over the ranks of ``comm``, in place, packed into buckets of at most ``bucket_bytes``. An array
    given under two names (a fused adapter's A) is reduced once. Collective; every rank must pass the same
    names and shapes (checked). Nothing is written on any rank unless every bucket completed. Returns grads.

    With a loss that is a mean over each replica's batch, op="mean" gives the grad of the mean over all
    replicas' batches when they are of equal size; with a summed loss use op="sum"."""
    comm_t, call = transport(comm, timeout), "moe_sft.distributed.allreduce_grads"
    error, arrays = None, []
    try:
        if op not in ("mean", "sum"):
            raise invalid(f"{call}: op = {op!r} is not 'mean' or 'sum'")
        items = ({n: getattr(grads, n) for n in Grads.LORA_FIELDS} if isinstance(grads, Grads) else dict(grads))
        seen = set()
        for name, a in items.items():
            if a is None or id(a) in seen:
                continue
            seen.add(id(a))
            _out_array(a, f"grads.{name}", a.shape if isinstance(a, np.ndarray) else (), np.float32)
            arrays.append(a)
    except Exception as err:  # noqa: BLE001 - every rank must hear of it
        error = err
    comm_t.agree(error, call)
    _same_everywhere(comm_t, [len(arrays)] + [a.size for a in arrays],
                     ["the number of grads"] + [f"the size of grad {i}" for i in range(len(arrays))], call)
    reduced, bucket, size = [], [], 0
    for a in arrays + [None]:
        if a is None or (bucket and size + a.nbytes > bucket_bytes):
            if bucket:
                flat = np.concatenate([b.reshape(-1) for b in bucket])
                comm_t.allreduce_sum(flat, call)
                reduced.append((bucket, flat))
            bucket, size = [], 0
        if a is not None:
            bucket.append(a)
            size += a.nbytes
    scale = np.float32(1.0 / comm_t.size) if op == "mean" else None
    for bucket, flat in reduced:
        at = 0
        for a in bucket:
            part = flat[at:at + a.size].reshape(a.shape)
            a[...] = part * scale if scale is not None else part
            at += a.size
    return grads
