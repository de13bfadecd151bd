"""Side-by-side benchmark: moe_sft vs torch (eager autograd, bf16) vs numpy (f32), on named MoE shapes.

    python bench/bench_moe.py            (or: python -m moe_sft bench)  [--shapes ...] [--tokens ...] [--json PATH]

For every shape and token count T (uniform random top-k routing) it prints forward and forward+backward
times, tokens/s, GFLOP/s, % of this machine's bf16 peak (measured by bench/peak, VDPBF16PS on all threads),
the effective rate at which expert weights are streamed, and the same work in torch and numpy, run in the
same process, with ratios. FLOPs: fwd = T·k·(6·H·I + 6·r·(H+I)), bwd = T·k·(6·H·I + 12·r·(H+I)).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from . import _paths
from ._layer import MoESFT, bfloat16
from ._quantize import dequantize, quantize

SHAPES = {
    "deepseek-v2-lite": dict(E=64, H=2048, I=1408, k=6, r=16),
    "qwen3-30b-a3b": dict(E=128, H=2048, I=768, k=8, r=16),
}
TOKENS = (1, 32, 256, 1024)
LORA = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def flops(T, k, H, I, r):
    fwd = T * k * (6 * H * I + 6 * r * (H + I))
    return fwd, fwd + T * k * (6 * H * I + 12 * r * (H + I))


def machine_peaks(threads):
    """{'bf16_gflops', 'read_gbs'} from bench/peak, or None where it cannot run."""
    program = _paths.get_peak_program()
    if program is None:
        return None
    try:
        out = subprocess.run([program, str(threads)], capture_output=True, text=True, check=True, timeout=300)
        return json.loads(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError):
        return None  # e.g. a CPU without AVX-512 BF16


def read_bandwidth(threads):
    """GB/s of bench/peak's read-bandwidth mode (`moe_sft_peak THREADS read`: runs on any x86-64 with AVX2,
    where the bf16 peak needs AVX-512 BF16), or None where it cannot run."""
    program = _paths.get_peak_program()
    if program is None:
        return None
    try:
        out = subprocess.run([program, str(threads), "read"], capture_output=True, text=True, check=True, timeout=300)
        return json.loads(out.stdout)["read_gbs"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError):
        return None


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_create(shape, threads, weight_format="bf16"):
    """Resident-size growth of creating the layer (its packed weights), measured in this process. Quantizing
    from bf16 uses per-expert temporaries that are freed before create returns; they may stay mapped in the
    allocator, so the growth is measured after a trim."""
    p = Problem(**shape)
    gc.collect()
    before = rss_bytes()
    layer = MoESFT(p.gate, p.up, p.down, lora_rank=shape["r"], lora_alpha=p.alpha, num_threads=threads,
                   weight_format=weight_format)
    _trim_heap()
    grown = rss_bytes() - before
    layer.close()
    return grown


def _trim_heap():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the growth then includes whatever the allocator keeps


def resident_after_create(shape, threads, weight_format="bf16"):
    """measure_create in a fresh process: in this one, memory released by earlier shapes and contenders would
    be reused by the new layer and hide part of its growth."""
    code = (f"from moe_sft.bench import measure_create; "
            f"print(measure_create({shape!r}, {threads}, {weight_format!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def rotating(pairs):
    """(fwd, fwd_bwd) closures cycling through one pair per batch: every timed run routes to other experts,
    as consecutive training steps do, so a shape's active weights are not served from the last run's cache."""
    fwds, fwd_bwds = itertools.cycle([p[0] for p in pairs]), itertools.cycle([p[1] for p in pairs])
    return (lambda: next(fwds)()), (lambda: next(fwd_bwds)())


def timed(fn, reps, budget_s):
    """Median wall time (s) of fn over up to `reps` runs after one warm-up, stopping early past budget_s."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Problem:
    """One shape's weights (bf16 base, f32 LoRA with non-zero B) and per-T batches, shared by all contenders."""

    def __init__(self, E, H, I, k, r, seed=0):
        self.E, self.H, self.I, self.k, self.r = E, H, I, k, r
        rng = np.random.default_rng(seed)

        def normal(shape, fan_in, dtype):
            return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)

        self.gate = normal((E, I, H), H, bfloat16)
        self.up = normal((E, I, H), H, bfloat16)
        self.down = normal((E, H, I), I, bfloat16)
        self.lora = dict(gate_a=normal((E, r, H), H, np.float32), gate_b=normal((E, I, r), r, np.float32),
                         up_a=normal((E, r, H), H, np.float32), up_b=normal((E, I, r), r, np.float32),
                         down_a=normal((E, r, I), I, np.float32), down_b=normal((E, H, r), r, np.float32))
        self.alpha = 2.0 * r
        self.rng = rng

    @property
    def weight_bytes(self):
        return 3 * self.E * self.H * self.I * 2

    def batch(self, T):
        x = self.rng.standard_normal((T, self.H), dtype=np.float32).astype(bfloat16)
        ids = np.stack([self.rng.permutation(self.E)[:self.k] for _ in range(T)]).astype(np.int64)
        w = self.rng.uniform(0.1, 1.0, (T, self.k)).astype(np.float32)
        go = self.rng.standard_normal((T, self.H), dtype=np.float32).astype(bfloat16)
        return x, ids, w, go


# ---- contenders: each returns (forward(), forward_backward()) closures for one batch ----

def ours(layer, batch, grads):
    """grads: a one-element list holding the Grads all batches of one T write into, as a training loop reuses
    its gradient buffers (allocated by the warm-up run, not timed)."""
    x, ids, w, go = batch

    def fwd():
        layer.forward(x, ids, w)

    def fwd_bwd():
        layer.forward(x, ids, w, save_for_backward=True)
        grads[0] = layer.backward(go, out=grads[0])
    return fwd, fwd_bwd


def torch_contender(torch, p):
    """HF-transformers-style eager MoE: a Python loop over the hit experts, index_add of weighted outputs,
    bf16 everywhere, autograd for backward (LoRA params, input and routing weights require grad)."""
    def t(a):
        a = np.ascontiguousarray(a)
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16) if a.dtype == bfloat16 else \
            torch.from_numpy(a).to(torch.bfloat16)
    gate, up, down = t(p.gate), t(p.up), t(p.down)
    lora = {n: t(a).requires_grad_() for n, a in p.lora.items()}
    s = p.alpha / p.r

    def moe(x, ids, w):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            xe = x[tok]
            g = xe @ gate[e].T + s * (xe @ lora["gate_a"][e].T) @ lora["gate_b"][e].T
            u = xe @ up[e].T + s * (xe @ lora["up_a"][e].T) @ lora["up_b"][e].T
            h = torch.nn.functional.silu(g) * u
            y = h @ down[e].T + s * (h @ lora["down_a"][e].T) @ lora["down_b"][e].T
            out = out.index_add(0, tok, y * w[tok, slot, None])
        return out

    def make(batch):
        x, ids, w, go = batch
        xt, idt, wt, got = t(x), torch.from_numpy(ids), torch.from_numpy(w).to(torch.bfloat16), t(go)

        def fwd():
            with torch.no_grad():
                moe(xt, idt, wt)

        def fwd_bwd():
            xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()
            for a in lora.values():
                a.grad = None
            moe(xg, idt, wg).backward(got)
        return fwd, fwd_bwd
    return make


def numpy_contender(p):
    """The same layer in float32 numpy, per expert (BLAS matmuls), forward and hand-written backward."""
    gate, up, down = (np.asarray(a, np.float32) for a in (p.gate, p.up, p.down))
    L = p.lora
    s = p.alpha / p.r

    def make(batch):
        x, ids, w, go = batch
        x, go = np.asarray(x, np.float32), np.asarray(go, np.float32)

        def run(backward):
            out = np.zeros_like(x)
            gx = np.zeros_like(x) if backward else None
            for e in np.unique(ids):
                tok, slot = np.nonzero(ids == e)
                xe, we = x[tok], w[tok, slot][:, None]
                xa_g, xa_u = xe @ L["gate_a"][e].T, xe @ L["up_a"][e].T
                g = xe @ gate[e].T + s * xa_g @ L["gate_b"][e].T
                u = xe @ up[e].T + s * xa_u @ L["up_b"][e].T
                sg = 1 / (1 + np.exp(-g))
                h = g * sg * u
                ha = h @ L["down_a"][e].T
                y = h @ down[e].T + s * ha @ L["down_b"][e].T
                np.add.at(out, tok, we * y)
                if backward:
                    dy = we * go[tok]
                    dyb = dy @ L["down_b"][e]
                    dh = dy @ down[e] + s * dyb @ L["down_a"][e]
                    dg, du = dh * u * sg * (1 + g * (1 - sg)), dh * g * sg
                    dgb, dub = dg @ L["gate_b"][e], du @ L["up_b"][e]
                    dx = dg @ gate[e] + du @ up[e] + s * (dgb @ L["gate_a"][e] + dub @ L["up_a"][e])
                    np.add.at(gx, tok, dx)
                    _ = (s * dy.T @ ha, s * dyb.T @ h, s * dgb.T @ xe, s * dg.T @ xa_g, s * dub.T @ xe,
                         s * du.T @ xa_u, np.sum(go[tok] * y, axis=1))  # the LoRA and router grads
            return out
        return (lambda: run(False)), (lambda: run(True))
    return make


# ---- the table ----

def check_finite_cost(p, layer, T, reps, budget, threads):
    """Forward+backward with check_finite on vs off, same batches: the price of the NaN/Inf checks."""
    checked = MoESFT(p.gate, p.up, p.down, lora_rank=p.r, lora_alpha=p.alpha, num_threads=threads, check_finite=True)
    checked.update_lora(*(p.lora[n] for n in LORA))
    batches = [p.batch(T) for _ in range(reps + 1)]
    times = []
    for net in (layer, checked):
        grads = [None]
        times.append(timed(rotating([ours(net, b, grads) for b in batches])[1], reps, budget))
    checked.close()
    return times


def bench_shape(name, shape, tokens, reps, budget, contenders, peaks, threads, check_tokens=(), out=print):
    p = Problem(**shape)
    E, H, I, k, r = shape["E"], shape["H"], shape["I"], shape["k"], shape["r"]
    resident = resident_after_create(shape, threads)
    layer = MoESFT(p.gate, p.up, p.down, lora_rank=r, lora_alpha=p.alpha, num_threads=threads)
    layer.update_lora(*(p.lora[n] for n in LORA))
    expert_bytes = 3 * H * I * 2
    out(f"\n## {name}: E={E} H={H} I={I} k={k} r={r}, kernels={layer.isa}, threads={threads}; "
        f"resident after create {resident / 2**20:.0f} MiB = {resident / p.weight_bytes:.3f}x the bf16 weights")
    makers = {}
    if "torch" in contenders:
        makers["torch"] = torch_contender(contenders["torch"], p)
    if "numpy" in contenders:
        makers["numpy"] = numpy_contender(p)
    cols = ["T", "fwd ms", "f+b ms", "tok/s", "GFLOP/s", "%peak", "wGB/s", "xstream"]
    for c in makers:
        cols += [f"{c} fwd", f"{c} f+b", f"x{c}"]
    out("| " + " | ".join(cols) + " |")
    out("|" + "---|" * len(cols))
    rows = []
    for T in tokens:
        batches = [p.batch(T) for _ in range(reps + 1)]
        f_flops, fb_flops = flops(T, k, H, I, r)
        grads = [None]
        fwd, fwd_bwd = rotating([ours(layer, b, grads) for b in batches])
        t_f, t_fb = timed(fwd, reps, budget), timed(fwd_bwd, reps, budget)
        active = statistics.mean(len(np.unique(b[1])) for b in batches)
        row = dict(shape=name, T=T, fwd_ms=1e3 * t_f, fwd_bwd_ms=1e3 * t_fb, tokens_per_s=T / t_fb,
                   gflops=fb_flops / t_fb / 1e9, fwd_gflops=f_flops / t_f / 1e9, active_experts=active,
                   weight_gbs=2 * active * expert_bytes / t_fb / 1e9)
        cells = [str(T), f"{row['fwd_ms']:.2f}", f"{row['fwd_bwd_ms']:.2f}", f"{row['tokens_per_s']:.0f}",
                 f"{row['gflops']:.0f}"]
        if peaks:
            row["pct_peak"] = 100 * row["gflops"] / peaks["bf16_gflops"]
            # time to stream the active experts once (forward) / twice (forward + backward) at read bandwidth
            stream_f = active * expert_bytes / (peaks["read_gbs"] * 1e9)
            row["fwd_x_stream"], row["fwd_bwd_x_stream"] = t_f / stream_f, t_fb / (2 * stream_f)
            cells += [f"{row['pct_peak']:.0f}%", f"{row['weight_gbs']:.1f}",
                      f"{row['fwd_x_stream']:.2f}/{row['fwd_bwd_x_stream']:.2f}"]
        else:
            cells += ["-", f"{row['weight_gbs']:.1f}", "-"]
        for c, make in makers.items():
            cf, cfb = rotating([make(b) for b in batches])
            tc_f, tc_fb = timed(cf, reps, budget), timed(cfb, reps, budget)
            row[f"{c}_fwd_ms"], row[f"{c}_fwd_bwd_ms"] = 1e3 * tc_f, 1e3 * tc_fb
            row[f"speedup_vs_{c}"] = tc_fb / t_fb
            cells += [f"{1e3 * tc_f:.2f}", f"{1e3 * tc_fb:.2f}", f"{tc_f / t_f:.1f}/{tc_fb / t_fb:.1f}"]
        out("| " + " | ".join(cells) + " |")
        rows.append(row)
    for T in check_tokens:
        off, on = check_finite_cost(p, layer, T, reps, budget, threads)
        out(f"check_finite at T={T}: forward+backward {1e3 * on:.2f} ms vs {1e3 * off:.2f} ms unchecked "
            f"({100 * (on / off - 1):+.1f}%)")
        rows.append(dict(shape=name, T=T, check_finite_ms=1e3 * on, unchecked_ms=1e3 * off))
    layer.close()
    return dict(resident_bytes=resident, weight_bytes=p.weight_bytes, rows=rows)


def quantization_error(p, weight_format):
    """||dequantize(quantize(W)) - W|| / ||W|| over the three projections (what the format costs in accuracy)."""
    num = den = 0.0
    for w in (p.gate, p.up, p.down):
        for e in range(w.shape[0]):
            ref = w[e].astype(np.float64)
            deq = dequantize(quantize(w[e], weight_format)).astype(np.float64)
            num += float(np.sum((deq - ref) ** 2))
            den += float(np.sum(ref ** 2))
    return (num / den) ** 0.5


def bench_formats(name, shape, formats, tokens, reps, budget, threads, out=print):
    """bf16 and the quantized formats side by side in one run: resident size, quantization error, and
    forward / forward+backward time at each T with its ratio to bf16 (ratios > 1: slower than bf16)."""
    p = Problem(**shape)
    out(f"\n## {name}: base-weight formats (quantized at create from the same bf16 weights; int4_awq group 128)")
    cols = ["format", "resident MiB", "x bf16 bytes", "quant. error"]
    for T in tokens:
        cols += [f"T={T} fwd ms", "f+b ms", "x bf16"]
    out("| " + " | ".join(cols) + " |")
    out("|" + "---|" * len(cols))
    batches = {T: [p.batch(T) for _ in range(reps + 1)] for T in tokens}
    rows, base = [], {}
    for fmt in formats:
        resident = resident_after_create(shape, threads, fmt)
        layer = MoESFT(p.gate, p.up, p.down, lora_rank=p.r, lora_alpha=p.alpha, num_threads=threads,
                       weight_format=fmt)
        layer.update_lora(*(p.lora[n] for n in LORA))
        error = 0.0 if fmt == "bf16" else quantization_error(p, fmt)
        row = dict(shape=name, weight_format=fmt, resident_bytes=resident, resident_x_bf16=resident / p.weight_bytes,
                   quantization_error=error)
        cells = [fmt, f"{resident / 2**20:.0f}", f"{resident / p.weight_bytes:.3f}", f"{error:.2e}"]
        for T in tokens:
            grads = [None]
            fwd, fwd_bwd = rotating([ours(layer, b, grads) for b in batches[T]])
            t_f, t_fb = timed(fwd, reps, budget), timed(fwd_bwd, reps, budget)
            if fmt == "bf16":
                base[T] = (t_f, t_fb)
            row[f"T{T}_fwd_ms"], row[f"T{T}_fwd_bwd_ms"] = 1e3 * t_f, 1e3 * t_fb
            row[f"T{T}_x_bf16"] = (t_f / base[T][0], t_fb / base[T][1]) if T in base else None
            ratio = f"{t_f / base[T][0]:.2f}/{t_fb / base[T][1]:.2f}" if T in base else "-"
            cells += [f"{1e3 * t_f:.2f}", f"{1e3 * t_fb:.2f}", ratio]
        layer.close()
        out("| " + " | ".join(cells) + " |")
        rows.append(row)
    return rows


def lora_shapes(E, H, I, r):
    return {"gate_a": (E, r, H), "gate_b": (E, I, r), "up_a": (E, r, H), "up_b": (E, I, r), "down_a": (E, r, I),
            "down_b": (E, H, r)}


def torch_adamw_step(torch, shapes, dtype):
    """torch's fastest CPU AdamW (fused=True) plus clip_grad_norm_ (foreach) over the same tensors, as a
    closure, or None where this torch lacks it. bf16 parameters: torch keeps moments in bf16 and no master."""
    rng = np.random.default_rng(0)
    tdt = torch.float32 if dtype == "f32" else torch.bfloat16
    params = [torch.tensor(0.02 * rng.standard_normal(s, np.float32)).to(tdt).requires_grad_() for s in shapes.values()]
    for p in params:
        p.grad = torch.tensor(rng.standard_normal(p.shape, np.float32)).to(tdt)
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return None

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
    return step


def bench_adamw(name, shape, reps, budget, threads, out=print, torch=None):
    """One AdamW step (moe_sft_adamw_step: grad norm, clipping, the update) over one layer's LoRA of `shape`,
    f32 and bf16 parameters, against the time to read params, grads and both moments once at the read
    bandwidth bench/peak measures right before each row (bf16: the bf16 parameter and its f32 master). The
    step itself moves more: the grads twice (the norm and the NaN guard must see all of them before the first
    write), and params, moments (and the bf16 copy) written back. With torch: its fused CPU AdamW plus
    clip_grad_norm_ on the same tensors (xtorch = its time / ours)."""
    from ._optim import AdamW
    E, H, I, r = shape["E"], shape["H"], shape["I"], shape["r"]
    shapes = lora_shapes(E, H, I, r)
    n = sum(int(np.prod(s)) for s in shapes.values())
    out(f"\n## AdamW step, {name} LoRA (E={E} H={H} I={I} r={r}: {n / 1e6:.1f} M parameters), threads={threads}, "
        "weight_decay and clipping on")
    cols = ["params", "streamed MiB", "read GB/s", "step ms", "best ms", "GB/s", "stream ms", "xstream", "best xstream"]
    if torch is not None:
        cols += ["torch ms", "xtorch"]
    out("| " + " | ".join(cols) + " |")
    out("|" + "---|" * len(cols))
    rows = []
    for dtype, per_element in (("f32", 16), ("bf16", 18)):
        rng = np.random.default_rng(0)
        dt = np.float32 if dtype == "f32" else bfloat16
        params = {k: (0.02 * rng.standard_normal(s, np.float32)).astype(dt) for k, s in shapes.items()}
        grads = {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()}
        opt = AdamW(params, lr=1e-4, weight_decay=0.01, max_grad_norm=1.0, num_threads=threads)
        read_gbs = read_bandwidth(threads)
        times = []
        step = lambda: opt.step(grads)  # noqa: E731
        step()
        start = time.perf_counter()
        while len(times) < max(reps, 5) and (len(times) < 3 or time.perf_counter() - start < budget):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        opt.close()
        t, best = statistics.median(times), min(times)
        nbytes = n * per_element
        row = dict(shape=name, dtype=dtype, params=n, bytes=nbytes, step_ms=1e3 * t, best_ms=1e3 * best,
                   gbs=nbytes / t / 1e9, read_gbs=read_gbs)
        cells = [dtype, f"{nbytes / 2**20:.0f}", f"{read_gbs:.1f}" if read_gbs else "-", f"{1e3 * t:.2f}",
                 f"{1e3 * best:.2f}", f"{row['gbs']:.1f}"]
        if read_gbs:
            stream = nbytes / (read_gbs * 1e9)
            row.update(stream_ms=1e3 * stream, x_stream=t / stream, best_x_stream=best / stream)
            cells += [f"{1e3 * stream:.2f}", f"{t / stream:.2f}", f"{best / stream:.2f}"]
        else:
            cells += ["-", "-", "-"]
        if torch is not None:
            torch_step = torch_adamw_step(torch, shapes, dtype)
            if torch_step is None:
                cells += ["-", "-"]
            else:
                tt = timed(torch_step, reps, budget)
                row.update(torch_ms=1e3 * tt, speedup_vs_torch=tt / t)
                cells += [f"{1e3 * tt:.2f}", f"{tt / t:.1f}"]
        out("| " + " | ".join(cells) + " |")
        rows.append(row)
    return rows


def bench_torch_module(name, shape, tokens, reps, budget, threads, out=print):
    """What moe_sft.torch adds to the layer, two ways. (1) A/B: forward + backward of MoEExperts through autograd
    (bf16 hidden states and f32 routing weights requiring grad, f32 LoRA Parameters whose grads torch stores into
    fresh .grad tensors, as after optimizer.zero_grad()) against layer.forward(save_for_backward=True) +
    layer.backward into reused Grads, on one layer (the module's Parameters bound) and the same batches, runs
    alternating so that both see the same machine. (2) The module's time outside the layer's forward and
    backward calls (timed around them), which a busy machine disturbs far less than the difference of (1)."""
    import torch

    from . import torch as mt

    class TimedLayer(MoESFT):
        inside = 0.0  # seconds spent in forward and backward

        def forward(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().forward(*args, **kwargs)
            finally:
                self.inside += time.perf_counter() - t0

        def backward(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().backward(*args, **kwargs)
            finally:
                self.inside += time.perf_counter() - t0

    E, H, I, k, r = shape["E"], shape["H"], shape["I"], shape["k"], shape["r"]
    p = Problem(**shape)
    layer = TimedLayer(p.gate, p.up, p.down, lora_rank=r, lora_alpha=p.alpha, num_threads=threads)
    module = mt.MoEExperts(layer, init=None)
    with torch.no_grad():
        for n, param in module.lora_state().items():
            param.copy_(torch.from_numpy(p.lora[n]))
    out(f"\n## moe_sft.torch over the raw layer, forward + backward, {name}: E={E} H={H} I={I} k={k} r={r}, "
        f"kernels={layer.isa}, threads={threads}")
    cols = ["T", "layer ms", "module ms", "A/B overhead", "module outside the layer ms", "outside / layer"]
    out("| " + " | ".join(cols) + " |")
    out("|" + "---|" * len(cols))
    rows = []
    for T in tokens:
        grads = [None]

        def raw(batch):
            x, ids, w, go = batch
            layer.forward(x, ids, w, save_for_backward=True)
            grads[0] = layer.backward(go, out=grads[0])

        def wrapped(batch):
            x, ids, w, go = batch
            module.zero_grad(set_to_none=True)
            y = module(mt.as_tensor(x).requires_grad_(), torch.from_numpy(ids), torch.from_numpy(w).requires_grad_())
            y.backward(mt.as_tensor(go))

        times, outside = ([], []), []
        start = time.perf_counter()
        for i, batch in enumerate(p.batch(T) for _ in range(reps + 1)):  # the first run of each is a warm-up
            for fn, ts in zip((raw, wrapped), times):
                layer.inside = 0.0
                t0 = time.perf_counter()
                fn(batch)
                ts.append(time.perf_counter() - t0)
            outside.append(times[1][-1] - layer.inside)
            if i > 0 and time.perf_counter() - start > 2 * budget:
                break
        t_raw, t_mod, t_out = (statistics.median(ts[1:]) for ts in (*times, outside))
        row = dict(shape=name, T=T, layer_fwd_bwd_ms=1e3 * t_raw, module_fwd_bwd_ms=1e3 * t_mod,
                   ab_overhead=t_mod / t_raw - 1, outside_ms=1e3 * t_out, outside_fraction=t_out / t_raw)
        out(f"| {T} | {1e3 * t_raw:.1f} | {1e3 * t_mod:.1f} | {100 * row['ab_overhead']:+.1f}% | {1e3 * t_out:.2f} | "
            f"{100 * row['outside_fraction']:.2f}% |")
        rows.append(row)
    layer.close()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m moe_sft bench", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--reps", type=int, default=5, help="timed runs per cell (median), after one warm-up")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per cell before stopping early")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--check-finite-tokens", nargs="*", type=int, default=[256],
                    help="token counts at which to also time forward+backward with check_finite on")
    ap.add_argument("--formats", nargs="*", default=["bf16", "int8", "int4_awq"],
                    help="base-weight formats to compare side by side (first shape only; none to skip)")
    ap.add_argument("--format-tokens", nargs="+", type=int, default=[1, 1024])
    ap.add_argument("--adamw", choices=["yes", "no", "only"], default="yes",
                    help="time an AdamW step over the first shape's LoRA (only: nothing else)")
    ap.add_argument("--torch-module", choices=["yes", "no", "only"], default="yes",
                    help="moe_sft.torch's overhead over the raw layer on the first shape (needs torch; only: nothing "
                         "else)")
    ap.add_argument("--torch-module-tokens", nargs="+", type=int, default=[256])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-numpy", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write all results here")
    args = ap.parse_args(argv)

    contenders = {}
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
            contenders["torch"] = torch
        except ImportError:
            print("torch not installed: pip install torch==2.13.0 to compare (CPU build)")
    if not args.no_numpy:
        contenders["numpy"] = np
    peaks = machine_peaks(args.threads)
    if peaks:
        print(f"machine: {peaks['bf16_gflops']:.0f} GFLOP/s bf16 (VDPBF16PS, {peaks['threads']} threads), "
              f"{peaks['read_gbs']:.1f} GB/s read bandwidth (bench/peak)")
    else:
        print("machine peaks unavailable (bench/peak needs AVX-512 BF16): %peak and xstream columns omitted")
    print("columns: times are medians; GFLOP/s, %peak and tok/s are for forward+backward; wGB/s = active experts' "
          "weights x2 / f+b time; xstream = fwd time / time to stream the active experts once, and f+b time / "
          "twice, at the measured bandwidth; xC = C's time / ours (fwd/f+b)")
    results = dict(peaks=peaks, torch=getattr(contenders.get("torch"), "__version__", None), shapes={})
    if args.adamw != "no" and args.torch_module != "only":
        results["adamw"] = bench_adamw(args.shapes[0], SHAPES[args.shapes[0]], args.reps, args.budget, args.threads,
                                       torch=contenders.get("torch"))
    if args.torch_module != "no" and "torch" in contenders:
        results["torch_module"] = bench_torch_module(args.shapes[0], SHAPES[args.shapes[0]], args.torch_module_tokens,
                                                     args.reps, args.budget, args.threads)
    elif args.torch_module == "only":
        print("--torch-module only: torch is not installed (or --no-torch)")
    if "only" in (args.adamw, args.torch_module):
        args.shapes, args.formats = [], []
    for name in args.shapes:
        results["shapes"][name] = bench_shape(name, SHAPES[name], args.tokens, args.reps, args.budget, contenders,
                                              peaks, args.threads, args.check_finite_tokens)
    if args.formats:
        name = args.shapes[0]
        formats = ["bf16"] + [f for f in args.formats if f != "bf16"]  # the ratios' baseline first
        results["formats"] = bench_formats(name, SHAPES[name], formats, args.format_tokens, args.reps, args.budget,
                                           args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
