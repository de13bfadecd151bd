"""The main job on a built-in problem: train LoRA adapters on a synthetic MoE layer to recover a frozen
"teacher" adapter with moe_sft.AdamW, show that the loss falls, and save the trained adapter as PEFT files.

The teacher is the same frozen base layer with its own random rank-(rank/4) LoRA adapters; the student has
rank `rank`, starts from PEFT's LoRA init (moe_sft.lora_init: A Kaiming-uniform and unrelated to the
teacher's, B zero) and sees only (input, routing, teacher output) batches. Both run through the library: the
teacher with a forward, the student with forward + backward every step, then one moe_sft.AdamW step (the
library's optimizer, updating the bound arrays in place). At the end the student's adapter is written with
moe_sft.save_adapter (adapter_model.safetensors + adapter_config.json, PEFT's per-expert layout), read back with
moe_sft.load_adapter into a fresh layer, and that layer's outputs are checked to be the trained one's.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from ._adapters import load_adapter, save_adapter
from ._layer import MoESFT, bfloat16
from ._optim import AdamW, lora_init

LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")
LAYER_IDX = 0  # the layer index the adapter is saved under


def teacher_arrays(rng, E, H, I, r, b_scale):
    """A ~ N(0, 1/fan_in); B ~ N(0, b_scale^2 / r): a random adapter the student has to find."""
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


def run(experts=8, hidden=256, intermediate=176, top_k=2, tokens=256, rank=16, alpha=32.0, steps=300, lr=1e-2,
        seed=0, num_threads=None, log_every=25, out_dir=None, out=print):
    """Trains, saves the adapter into ``out_dir`` (None: a fresh temporary directory), reloads it and checks the
    reloaded layer's outputs. Returns (first loss, final loss, the adapter directory)."""
    rng = np.random.default_rng(seed)
    E, H, I = experts, hidden, intermediate
    gate = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(bfloat16)
    up = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(bfloat16)
    down = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(bfloat16)
    teacher_rank = max(rank // 4, 1)
    teacher = MoESFT(gate, up, down, lora_rank=teacher_rank, lora_alpha=alpha * teacher_rank / rank, max_cache_depth=0,
                     num_threads=num_threads)
    student = MoESFT(gate, up, down, lora_rank=rank, lora_alpha=alpha, num_threads=num_threads)
    teacher.update_lora(**teacher_arrays(rng, E, H, I, teacher_rank, b_scale=0.25))  # outputs move ~half the base's
    lora = lora_init(student, seed=seed)  # PEFT's init: A Kaiming-uniform, B zero (student == base layer at first)
    student.update_lora(**lora)
    opt = AdamW(lora, lr=lr, num_threads=num_threads or 0)  # updates the bound arrays in place

    out(f"moe_sft demo: E={E} H={H} I={I} top_k={top_k} rank={rank} (teacher {teacher_rank}) tokens/step={tokens} steps={steps} "
        f"kernels={student.isa}")
    out(f"{'step':>6} {'loss':>12} {'grad norm':>10} {'tokens/s':>10}")
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
        opt.lr = lr * 0.5 * (1 + np.cos(np.pi * step / steps))  # cosine decay
        report = opt.step(grads)
        if report.skipped:
            out(str(report))
        if step % log_every == 0 or step == 1 or step == steps:
            now = time.perf_counter()
            done = log_every if step % log_every == 0 else 1
            out(f"{step:>6} {losses[-1]:>12.6f} {report.grad_norm:>10.4g} {done * tokens / max(now - last, 1e-9):>10.0f}")
            last = now
    elapsed = time.perf_counter() - start
    first, final = np.mean(losses[:5]), np.mean(losses[-5:])
    out(f"loss {first:.6f} -> {final:.6f} ({first / final:.1f}x lower) in {elapsed:.1f} s, "
        f"{steps * tokens / elapsed:.0f} tokens/s (teacher forward + student forward/backward + AdamW)")

    # The trained adapter as PEFT files, read back into a fresh layer that must give the trained layer's outputs.
    out_dir = tempfile.mkdtemp(prefix="moe_sft_demo_adapter_") if out_dir is None else os.fspath(out_dir)
    save_adapter(out_dir, {LAYER_IDX: lora}, lora_rank=rank, lora_alpha=alpha)
    adapter = load_adapter(out_dir)
    reloaded = adapter.bind(MoESFT(gate, up, down, num_threads=num_threads, **adapter.layer_kwargs), LAYER_IDX)
    x = rng.standard_normal((tokens, H)).astype(bfloat16)
    ids, w = route(rng, tokens, E, top_k)
    trained_out = np.asarray(student.forward(x, ids, w), np.float32)
    reloaded_out = np.asarray(reloaded.forward(x, ids, w), np.float32)
    same_arrays = all(np.array_equal(adapter.layers[LAYER_IDX][n], lora[n]) for n in LORA_NAMES)
    max_diff = float(np.max(np.abs(trained_out - reloaded_out)))
    if not same_arrays or max_diff != 0.0:
        raise RuntimeError(f"the adapter reloaded from {out_dir} differs from the trained one (arrays equal: "
                           f"{same_arrays}, max |output difference| {max_diff})")
    files = ", ".join(sorted(f for f in os.listdir(out_dir) if f.startswith("adapter_")))
    out(f"adapter saved to {out_dir} ({files}; PEFT per-expert layout, layer {LAYER_IDX}, r={rank}, "
        f"lora_alpha={alpha:g}); reloaded with moe_sft.load_adapter: same arrays, same layer outputs")
    for layer in (teacher, student, reloaded):
        layer.close()
    opt.close()
    return first, final, out_dir


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
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=176)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step")
    ap.add_argument("--rank", type=int, default=16, help="student LoRA rank (the teacher's is rank/4)")
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="directory the trained adapter is saved into as PEFT files (adapter_model.safetensors, "
                         "adapter_config.json); default: a fresh temporary directory, printed at the end")
    args = ap.parse_args(argv)
    check_args(ap, args)
    first, final, _ = run(args.experts, args.hidden, args.intermediate, args.top_k, args.tokens, args.rank, args.alpha,
                          args.steps, args.lr, args.seed, args.threads, out_dir=args.out)
    return 0 if final < first else 1
