"""The communication moe_sft.distributed needs, over an mpi4py communicator or a torch.distributed process group:
all-to-all of counts and of byte rows, sum-allreduce of f32 arrays, and the agreement on errors. Chosen by the
type of the communicator; neither mpi4py nor torch is imported unless the caller passed one of its objects.

Every wait is bounded: operations are started non-blocking and polled until ``timeout`` seconds have passed,
then DistributedTimeout names this rank and, for the agreement, the ranks that never reported. After a timeout
the communicator is in an unknown state (messages may still be in flight): abort the job.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from ._errors import MoESFTError

_AGREE_TAG = 0x5EF7
_MESSAGE_BYTES = 1024  # an agreement message: int32 error flag, then the error text (utf-8, NUL-padded)


class DistributedTimeout(TimeoutError):
    """A collective step did not complete in time; the message names the rank waiting and whom it waited for."""


class RemoteError(MoESFTError):
    """Another rank failed in the same collective call; ``ranks`` lists the failing ranks, the message gives
    each one's error. Every rank raises (the failing ones their own error), so none is left waiting."""

    def __init__(self, ranks, message):
        super().__init__("MOE_SFT_REMOTE_ERROR", message)
        self.ranks = ranks


def _wait(done, timeout, what):
    """Polls done() (True when complete) with a short back-off until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    pause = 0.0
    while not done():
        if time.monotonic() > deadline:
            raise DistributedTimeout(what(timeout))
        time.sleep(pause)
        pause = min(pause * 2 or 1e-5, 1e-3)


def _encode(error):
    buf = np.zeros(_MESSAGE_BYTES, np.uint8)
    if error is not None:
        text = f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES - 4]
        buf[:4] = np.frombuffer(np.int32(1).tobytes(), np.uint8)
        buf[4:4 + len(text)] = np.frombuffer(text, np.uint8)
    return buf


def _decode(buf):
    if buf[:4].view(np.int32)[0] == 0:
        return None
    return bytes(buf[4:]).rstrip(b"\0").decode("utf-8", "replace")


class Transport:
    """The agreement on errors, over what each backend provides: ``rank``, ``size``, ``timeout`` and
      alltoall_counts(counts, what)   counts [size] int64, counts[r] to rank r -> what each rank sent here
      alltoallv_rows(rows, send_counts, recv_counts, what)
                                      rows [sum(send_counts), row_bytes] uint8, block r to rank r
                                      -> [sum(recv_counts), row_bytes], the blocks of ranks 0, 1, ... in order
      allreduce_sum(a, what)          a C-contiguous f32 or int64 array, summed over the ranks in place
      _exchange_status(message, call) this rank's status message to every other rank -> {rank: their text}
    ``what`` / ``call`` name the call for the timeout's message."""

    rank: int
    size: int

    def __init__(self, timeout):
        self.timeout = float(timeout)

    def agree(self, error, call):
        """Every rank reports whether ``call`` failed here (``error``, an exception or None). When any failed,
        every rank raises: the failing ranks their own error, the others RemoteError naming them and theirs."""
        messages = self._exchange_status(_encode(error), call)
        failed = {r: m for r, m in messages.items() if m is not None}
        if error is not None:
            raise error
        if failed:
            text = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
            raise RemoteError(sorted(failed), f"{call} failed on rank {', '.join(map(str, sorted(failed)))} of "
                                              f"{self.size} (this is rank {self.rank}): {text}")

    def _status_timeout(self, call, missing):
        return lambda timeout: (f"{call}: rank {self.rank} of {self.size} waited {timeout:g} s for rank "
                                f"{', '.join(map(str, missing()))} to report (did it stop, raise outside this call, "
                                f"or call something else?)")

    def _collective_timeout(self, what):
        return lambda timeout: (f"{what}: rank {self.rank} of {self.size} waited {timeout:g} s for the collective "
                                f"to complete (a peer rank stopped)")


class _MPI(Transport):
    def __init__(self, comm, timeout):
        super().__init__(timeout)
        from mpi4py import MPI
        self._MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def _complete(self, request, what):
        _wait(request.Test, self.timeout, self._collective_timeout(what))

    def _exchange_status(self, mine, call):
        others = [r for r in range(self.size) if r != self.rank]
        inbox = {r: np.empty(_MESSAGE_BYTES, np.uint8) for r in others}
        recvs = {r: self.comm.Irecv(inbox[r], source=r, tag=_AGREE_TAG) for r in others}
        sends = [self.comm.Isend(mine, dest=r, tag=_AGREE_TAG) for r in others]

        def done():
            for r in list(recvs):
                if recvs[r].Test():
                    del recvs[r]
            return not recvs

        try:
            _wait(done, self.timeout, self._status_timeout(call, lambda: sorted(recvs)))
        except DistributedTimeout:
            for request in recvs.values():  # the missing ranks' messages would otherwise match a later call
                request.Cancel()
                request.Wait()
            raise
        _wait(lambda: self._MPI.Request.Testall(sends), self.timeout, self._status_timeout(call, lambda: others))
        return {r: _decode(inbox[r]) for r in others}

    def alltoall_counts(self, counts, what):
        out = np.empty(self.size, np.int64)
        self._complete(self.comm.Ialltoall(counts, out), what)
        return out

    def alltoallv_rows(self, rows, send_counts, recv_counts, what):
        row_bytes = rows.shape[1]
        out = np.empty((int(recv_counts.sum()), row_bytes), np.uint8)
        if row_bytes == 0:
            return out
        # one derived datatype per row keeps the counts in rows (MPI counts are C ints)
        row = self._MPI.BYTE.Create_contiguous(row_bytes).Commit()
        try:
            displs = lambda c: np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)  # noqa: E731
            self._complete(self.comm.Ialltoallv([rows, (send_counts, displs(send_counts)), row],
                                                [out, (recv_counts, displs(recv_counts)), row]), what)
        finally:
            row.Free()
        return out

    def allreduce_sum(self, a, what):
        self._complete(self.comm.Iallreduce(self._MPI.IN_PLACE, a, op=self._MPI.SUM), what)


class _Torch(Transport):
    def __init__(self, group, timeout):
        super().__init__(timeout)
        import torch
        import torch.distributed as dist
        self._torch, self._dist, self.group = torch, dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def _complete(self, work, what):
        _wait(work.is_completed, self.timeout, self._collective_timeout(what))
        work.wait()  # raises the backend's own error, if it had one

    def _exchange_status(self, mine, call):
        # gloo's point-to-point works report completion only through wait(), which takes a timeout: each
        # peer's receive is waited for until the one deadline, and the peers that never reported are named.
        import datetime
        t, dist = self._torch, self._dist
        others = [r for r in range(self.size) if r != self.rank]
        inbox = {r: t.empty(_MESSAGE_BYTES, dtype=t.uint8) for r in others}
        recvs = {r: dist.irecv(inbox[r], group=self.group, group_src=r, tag=_AGREE_TAG) for r in others}
        sends = {r: dist.isend(t.from_numpy(mine), group=self.group, group_dst=r, tag=_AGREE_TAG) for r in others}
        deadline = time.monotonic() + self.timeout
        missing = []
        for r, work in list(recvs.items()) + list(sends.items()):
            if r in missing:
                continue
            try:
                work.wait(timeout=datetime.timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
            except RuntimeError:
                missing.append(r)
        if missing:
            raise DistributedTimeout(self._status_timeout(call, lambda: sorted(missing))(self.timeout))
        return {r: _decode(inbox[r].numpy()) for r in others}

    def alltoall_counts(self, counts, what):
        out = self._torch.empty(self.size, dtype=self._torch.int64)
        self._complete(self._dist.all_to_all_single(out, self._torch.from_numpy(counts), group=self.group,
                                                    async_op=True), what)
        return out.numpy()

    def alltoallv_rows(self, rows, send_counts, recv_counts, what):
        out = np.empty((int(recv_counts.sum()), rows.shape[1]), np.uint8)
        if rows.shape[1] == 0:
            return out
        self._complete(self._dist.all_to_all_single(self._torch.from_numpy(out), self._torch.from_numpy(rows),
                                                    output_split_sizes=[int(c) for c in recv_counts],
                                                    input_split_sizes=[int(c) for c in send_counts],
                                                    group=self.group, async_op=True), what)
        return out

    def allreduce_sum(self, a, what):
        self._complete(self._dist.all_reduce(self._torch.from_numpy(a), group=self.group, async_op=True), what)


def transport(comm, timeout):
    """The backend for ``comm``: an mpi4py communicator, a torch.distributed ProcessGroup, or None for torch's
    default group (torch.distributed must then be initialized)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(comm, mpi.Comm):
        if isinstance(comm, mpi.Intercomm):
            raise TypeError("moe_sft.distributed needs an intra-communicator, not an mpi4py Intercomm")
        return _MPI(comm, timeout)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and (comm is None or isinstance(comm, dist.ProcessGroup)):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        return _Torch(comm if comm is not None else dist.group.WORLD, timeout)
    raise TypeError(f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD) or a torch.distributed ProcessGroup "
                    f"(None: torch's default group), got {type(comm).__module__}.{type(comm).__name__}")
