"""Expert parallelism on one machine: 1 rank x 2 threads (a plain MoESFT over all experts) against 2 ranks x 1
thread (ExpertParallelMoE over MPI, each rank half the experts), the same total work, DeepSeek-V2-Lite shapes
(E=64, H=2048, I=1408, top-6, LoRA r=16), T tokens per rank. Prints per configuration the time of a forward +
backward split into local compute and exchange (everything else the distributed layer does: packing, the
all-to-alls, the error agreements, the combine), the bytes each rank sends to other ranks per token, and the
sizing model of README's "Several hosts" checked against these measurements.

    python bench/bench_distributed.py [--tokens 256] [--iters 3]      (launches mpirun itself)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

E, H, I, K, R = 64, 2048, 1408, 6, 16


def weights(rng, n, shape):
    import ml_dtypes
    out = np.empty((n,) + shape, ml_dtypes.bfloat16)
    for e in range(n):
        out[e] = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])
    return out


def lora(rng, n):
    shapes = dict(gate_a=(R, H), gate_b=(I, R), up_a=(R, H), up_b=(I, R), down_a=(R, I), down_b=(H, R))
    return {name: (rng.standard_normal((n,) + s, dtype=np.float32) / np.float32(np.sqrt(s[1])))
            for name, s in shapes.items()}


def batch(rng, T):
    import ml_dtypes
    x = rng.standard_normal((T, H), dtype=np.float32).astype(ml_dtypes.bfloat16)
    ids = np.array([rng.permutation(E)[:K] for _ in range(T)], np.int64)
    w = rng.uniform(0.05, 0.3, (T, K)).astype(np.float32)
    go = (rng.standard_normal((T, H), dtype=np.float32) * 1e-2).astype(ml_dtypes.bfloat16)
    return x, ids, w, go


def worker(args):
    """One rank: times iters forward + backward passes; prints one JSON line."""
    import moe_sft
    if args.single:
        rank, world, comm = 0, 1, None
    else:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
    mine = np.arange(rank, E, world)  # experts round-robin over the ranks
    rng = np.random.default_rng(rank)
    g, u, d = weights(rng, len(mine), (I, H)), weights(rng, len(mine), (I, H)), weights(rng, len(mine), (H, I))
    adapters = lora(rng, len(mine))
    x, ids, w, go = batch(np.random.default_rng(100 + rank), args.tokens)
    timer = {"compute": 0.0, "sent": 0}
    if args.single:
        layer = moe_sft.MoESFT(g, u, d, lora_rank=R, num_threads=args.threads)
        local = layer
    else:
        from moe_sft import distributed
        layer = distributed.ExpertParallelMoE(comm, E, mine, g, u, d, lora_rank=R, num_threads=args.threads)
        local = layer.layer
        send = layer._comm.alltoallv_rows

        def counted(rows, send_counts, recv_counts, what):  # bytes to other ranks
            timer["sent"] += int((send_counts.sum() - send_counts[rank]) * rows.shape[1])
            return send(rows, send_counts, recv_counts, what)

        layer._comm.alltoallv_rows = counted
    layer.update_lora(**adapters)
    for name in ("forward", "backward"):  # time the local layer's calls: the rest of a pass is the exchange
        call = getattr(local, name)

        def timed(*a, _call=call, **kw):
            start = time.perf_counter()
            try:
                return _call(*a, **kw)
            finally:
                timer["compute"] += time.perf_counter() - start

        setattr(local, name, timed)
    total = 0.0
    for it in range(args.iters + 1):  # the first pass warms up (pool, scratch, page faults)
        if it == 1:
            timer.update(compute=0.0, sent=0)
            total = 0.0
        if comm is not None:
            comm.Barrier()
        start = time.perf_counter()
        layer.forward(x, ids, w, save_for_backward=True)
        layer.backward(go)
        total += time.perf_counter() - start
    flops = flops_per_token(H, I, K, R) * args.tokens * args.iters
    loopback = None
    if comm is not None:  # the transport's own rate: one large all-to-all of the same kind
        rows = np.zeros((world * 4096, 2 * H), np.uint8)
        counts = np.full(world, 4096, np.int64)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(3):
            send(rows, counts, counts, "bench")
        loopback = 3 * rows.nbytes * (world - 1) / world / (time.perf_counter() - start)
    print(json.dumps(dict(rank=rank, world=world, threads=args.threads, tokens=args.tokens, iters=args.iters,
                          total=total / args.iters, compute=timer["compute"] / args.iters,
                          sent_per_token=timer["sent"] / args.iters / args.tokens,
                          gflops=flops / timer["compute"] / 1e9, loopback=loopback)), flush=True)


def flops_per_token(hidden, inter, top_k, rank):
    """Forward + backward FLOPs of one token (README's count): per (token, slot) 6HI + 6r(H+I) forward and
    6HI + 12r(H+I) backward (grad_input through the frozen weights, the LoRA grads)."""
    return top_k * (12.0 * hidden * inter + 18.0 * rank * (hidden + inter))


def bytes_per_token(hidden, top_k, world):
    """Bytes one rank sends to others per token per layer, forward + backward: each (token, slot) pair whose
    expert is elsewhere (a fraction 1 - 1/world under uniform routing) sends its x row (2H bf16 + 8 id + 4
    weight) and gets y back (2H), then sends its grad_output row (2H) and gets grad_input and the routing-weight
    grad back (2H + 4). Counted on the sending side, each direction once: 8H + 16 per remote pair."""
    return top_k * (1 - 1 / world) * (8 * hidden + 16)


def launch(args):
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--tokens"]
    single = subprocess.run(me + [str(2 * args.tokens), "--threads", "2", "--iters", str(args.iters), "--single"],
                            capture_output=True, text=True, env=env, check=True).stdout
    multi = subprocess.run([mpirun, "-n", "2"] + me + [str(args.tokens), "--threads", "1", "--iters",
                                                       str(args.iters)],
                           capture_output=True, text=True, env=env, check=True).stdout
    rows = [json.loads(line) for line in (single + multi).splitlines() if line.startswith("{")]
    print(f"DeepSeek-V2-Lite shapes E={E} H={H} I={I} k={K} r={R}; forward + backward per pass, mean of "
          f"{args.iters}")
    print(f"{'config':<24}{'tokens':>8}{'pass s':>9}{'compute s':>11}{'exchange s':>12}{'GFLOP/s':>9}"
          f"{'sent B/token':>14}")
    for r in rows:
        name = "1 rank x 2 threads" if r["world"] == 1 else f"rank {r['rank']} of 2 x 1 thread"
        print(f"{name:<24}{r['tokens']:>8}{r['total']:>9.3f}{r['compute']:>11.3f}{r['total'] - r['compute']:>12.3f}"
              f"{r['gflops']:>9.1f}{r['sent_per_token']:>14.0f}")
    ranks = [r for r in rows if r["world"] == 2]
    one = next(r for r in rows if r["world"] == 1)
    model = bytes_per_token(H, K, 2)
    sent = ", ".join(f"{r['sent_per_token']:.0f}" for r in ranks)
    print(f"model: bytes per token {model:.0f} (uniform routing; measured {sent})")
    rate = one["gflops"] / 2  # per core, from the 2-thread run
    predicted = flops_per_token(H, I, K, R) * args.tokens / (rate * 1e9)
    measured = ", ".join(f"{r['compute']:.3f}" for r in ranks)
    print(f"model: compute of one 1-thread rank on {args.tokens} tokens from the 2-thread rate: {predicted:.3f} s "
          f"(measured {measured})")
    for r in ranks:
        wire = r["sent_per_token"] * args.tokens / r["loopback"]
        print(f"model: rank {r['rank']} exchange at the measured all-to-all rate {r['loopback'] / 1e9:.2f} GB/s: "
              f"{wire:.3f} s on the wire (measured exchange incl. packing and waiting: "
              f"{r['total'] - r['compute']:.3f} s)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank (the single rank gets twice as many)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())
