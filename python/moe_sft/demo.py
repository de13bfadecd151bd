"""The main job on a built-in problem: train LoRA adapters on a synthetic MoE layer to recover a frozen
"teacher" adapter, with Adam, and show that the loss falls.

The teacher is the same frozen base layer with its own random rank-(rank/4) LoRA adapters; the student has
rank `rank`, starts from the usual LoRA init (A random and unrelated to the teacher's, B zero) and sees only
(input, routing, teacher output) batches. Both run through the library: the teacher with a forward, the
student with forward + backward every step.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from ._layer import MoESFT, bfloat16

LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


class Adam:
    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}
        self.t = 0

    def step(self, grads, lr_factor=1.0):
        """Updates the parameter arrays in place: the layer reads them by reference, no re-binding."""
        self.t += 1
        b1, b2 = self.betas
        lr = lr_factor * self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for n, p in self.params.items():
            g = getattr(grads, n)
            self.m[n] *= b1
            self.m[n] += (1 - b1) * g
            self.v[n] *= b2
            self.v[n] += (1 - b2) * g * g
            p -= lr * self.m[n] / (np.sqrt(self.v[n]) + self.eps)


def lora_arrays(rng, E, H, I, r, b_scale):
    """A ~ N(0, 1/fan_in); B ~ N(0, b_scale^2 / r) (b_scale 0 is the standard LoRA init)."""
    def normal(shape, fan_in, scale=1.0):
        return (scale * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return dict(gate_a=normal((E, r, H), H), gate_b=normal((E, I, r), r, b_scale),
                up_a=normal((E, r, H), H), up_b=normal((E, I, r), r, b_scale),
                down_a=normal((E, r, I), I), down_b=normal((E, H, r), r, b_scale))


def route(rng, T, E, k):
    """Random top-k routing with softmax weights over the chosen experts' logits."""
    logits = rng.standard_normal((T, E)).astype(np.float32)
    ids = np.argsort(-logits, axis=1)[:, :k]
    top = np.take_along_axis(logits, ids, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return ids.astype(np.int64), (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def run(experts=8, hidden=1024, intermediate=704, top_k=2, tokens=512, rank=16, alpha=32.0, steps=300, lr=1e-2,
        seed=0, num_threads=None, log_every=25, out=print):
    rng = np.random.default_rng(seed)
    E, H, I = experts, hidden, intermediate
    gate = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(bfloat16)
    up = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(bfloat16)
    down = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(bfloat16)
    teacher_rank = max(rank // 4, 1)
    teacher = MoESFT(gate, up, down, lora_rank=teacher_rank, lora_alpha=alpha * teacher_rank / rank, max_cache_depth=0,
                     num_threads=num_threads)
    student = MoESFT(gate, up, down, lora_rank=rank, lora_alpha=alpha, num_threads=num_threads)
    teacher_lora = lora_arrays(rng, E, H, I, teacher_rank, b_scale=0.25)  # changes outputs by ~half the base's
    student_lora = lora_arrays(rng, E, H, I, rank, b_scale=0.0)
    teacher.update_lora(*(teacher_lora[n] for n in LORA_NAMES))
    student.update_lora(*(student_lora[n] for n in LORA_NAMES))
    opt = Adam(student_lora, lr)

    out(f"moe_sft demo: E={E} H={H} I={I} top_k={top_k} rank={rank} (teacher {teacher_rank}) tokens/step={tokens} steps={steps} "
        f"kernels={student.isa}")
    out(f"{'step':>6} {'loss':>12} {'tokens/s':>10}")
    grads, losses = None, []
    start = last = time.perf_counter()
    for step in range(1, steps + 1):
        x = rng.standard_normal((tokens, H)).astype(bfloat16)
        ids, w = route(rng, tokens, E, top_k)
        target = np.asarray(teacher.forward(x, ids, w), np.float32)
        y = np.asarray(student.forward(x, ids, w, save_for_backward=True), np.float32)
        diff = y - target
        losses.append(float(np.mean(diff * diff)))
        grads = student.backward((2.0 / diff.size) * diff, out=grads)
        opt.step(grads, lr_factor=0.5 * (1 + np.cos(np.pi * step / steps)))  # cosine decay
        if step % log_every == 0 or step == 1 or step == steps:
            now = time.perf_counter()
            done = log_every if step % log_every == 0 else 1
            out(f"{step:>6} {losses[-1]:>12.6f} {done * tokens / max(now - last, 1e-9):>10.0f}")
            last = now
    elapsed = time.perf_counter() - start
    first, final = np.mean(losses[:5]), np.mean(losses[-5:])
    out(f"loss {first:.6f} -> {final:.6f} ({first / final:.1f}x lower) in {elapsed:.1f} s, "
        f"{steps * tokens / elapsed:.0f} tokens/s (teacher forward + student forward/backward + Adam)")
    return first, final


def check_args(ap, args):
    """Refuses impossible options the way argparse refuses malformed ones: usage, a message, exit status 2."""
    for name in ("experts", "hidden", "intermediate", "top_k", "tokens", "rank", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
                     + (" (the demo trains LoRA adapters: rank 0 has none)" if name == "rank" else ""))
    if args.top_k > args.experts:
        ap.error(f"--top-k {args.top_k} is more than --experts {args.experts}: each token picks top_k distinct experts")
    if args.threads is not None and args.threads < 0:
        ap.error(f"--threads must be at least 0 (0: all cores), got {args.threads}")
    for name in ("alpha", "lr"):
        value = getattr(args, name)
        if not (np.isfinite(value) and value > 0):
            ap.error(f"--{name} must be a positive finite number, got {value}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m moe_sft demo", description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step")
    ap.add_argument("--rank", type=int, default=16, help="student LoRA rank (the teacher's is rank/4)")
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    check_args(ap, args)
    first, final = run(args.experts, args.hidden, args.intermediate, args.top_k, args.tokens, args.rank, args.alpha,
                       args.steps, args.lr, args.seed, args.threads)
    return 0 if final < first else 1
