"""Float64 numpy reference of the MoE LoRA layer (DESIGN §1), forward and backward.

Everything is computed in float64 from the values the library actually sees (bf16-rounded base weights
and activations, LoRA arrays as given), so the comparison measures the library's arithmetic only.
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np

bf16 = np.dtype(ml_dtypes.bfloat16)
LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def f64(a):
    return np.asarray(a).astype(np.float64)


def silu(g):
    return g / (1.0 + np.exp(-g))


@dataclass
class Problem:
    """One layer plus one batch: base weights [E,I,H]/[E,H,I], LoRA dict, inputs."""
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    lora: dict  # name -> array (float32 or bf16), or {} for rank 0
    alpha: float
    x: np.ndarray  # [T, H] bf16
    ids: np.ndarray  # [T, k] int64
    weights: np.ndarray  # [T, k] float32
    grad_out: np.ndarray  # [T, H] bf16

    @property
    def rank(self):
        return self.lora["gate_a"].shape[1] if self.lora else 0

    @property
    def scale(self):
        return self.alpha / self.rank if self.rank else 0.0


def make_problem(E, H, I, k, T, rank, *, lora_dtype=np.float32, seed=0, alpha=None, ids=None, lora_scale=1.0):
    """Weights ~ N(0, 1/fan_in) so activations stay O(1); LoRA B non-zero so every grad path is exercised."""
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(bf16)
    up = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(bf16)
    down = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(bf16)
    lora = {}
    if rank:
        def m(shape, fan_in):
            return (lora_scale * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(lora_dtype)
        lora = dict(gate_a=m((E, rank, H), H), gate_b=m((E, I, rank), rank), up_a=m((E, rank, H), H),
                    up_b=m((E, I, rank), rank), down_a=m((E, rank, I), I), down_b=m((E, H, rank), rank))
    x = rng.standard_normal((T, H)).astype(bf16)
    if ids is None:
        rows = [rng.permutation(E)[:k] if k <= E else rng.integers(0, E, k) for _ in range(T)]
        ids = np.array(rows, dtype=np.int64).reshape(T, k)
    weights = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    grad_out = rng.standard_normal((T, H)).astype(bf16)
    return Problem(gate, up, down, lora, alpha if alpha is not None else 2.0 * max(rank, 1), x, ids, weights, grad_out)


def _lora(p, name, e):
    return f64(p.lora[name][e]) if p.lora else None


def expert_forward(p, e, x):
    """g, u, h, y for the rows x [n, H] through expert e (float64)."""
    s = p.scale
    g = x @ f64(p.gate[e]).T
    u = x @ f64(p.up[e]).T
    if p.rank:
        g = g + s * (x @ _lora(p, "gate_a", e).T) @ _lora(p, "gate_b", e).T
        u = u + s * (x @ _lora(p, "up_a", e).T) @ _lora(p, "up_b", e).T
    h = silu(g) * u
    y = h @ f64(p.down[e]).T
    if p.rank:
        y = y + s * (h @ _lora(p, "down_a", e).T) @ _lora(p, "down_b", e).T
    return g, u, h, y


def forward(p, x=None, weights=None):
    x = f64(p.x) if x is None else x
    weights = f64(p.weights) if weights is None else weights
    T, k = p.ids.shape
    out = np.zeros((T, x.shape[1]))
    for t in range(T):
        for j in range(k):
            e = p.ids[t, j]
            if e >= 0:
                out[t] += weights[t, j] * expert_forward(p, e, x[t:t + 1])[3][0]
    return out


def backward(p):
    """Analytic grads: dict with input [T,H], routing_weights [T,k] and the six LoRA grads."""
    x, w, go = f64(p.x), f64(p.weights), f64(p.grad_out)
    T, k = p.ids.shape
    s = p.scale
    grads = {"input": np.zeros_like(x), "routing_weights": np.zeros((T, k))}
    for n in LORA_NAMES if p.rank else ():
        grads[n] = np.zeros(p.lora[n].shape)
    for t in range(T):
        for j in range(k):
            e = p.ids[t, j]
            if e < 0:
                continue
            xr = x[t:t + 1]
            g, u, h, y = expert_forward(p, e, xr)
            grads["routing_weights"][t, j] = float(go[t] @ y[0])
            dy = w[t, j] * go[t:t + 1]
            dh = dy @ f64(p.down[e])
            if p.rank:
                Ad, Bd = _lora(p, "down_a", e), _lora(p, "down_b", e)
                dh = dh + s * (dy @ Bd) @ Ad
                grads["down_b"][e] += s * dy.T @ (h @ Ad.T)
                grads["down_a"][e] += s * (dy @ Bd).T @ h
            sg = 1.0 / (1.0 + np.exp(-g))
            dg = dh * u * sg * (1.0 + g * (1.0 - sg))
            du = dh * g * sg
            dx = dg @ f64(p.gate[e]) + du @ f64(p.up[e])
            if p.rank:
                for d, a, b in ((dg, "gate_a", "gate_b"), (du, "up_a", "up_b")):
                    A, B = _lora(p, a, e), _lora(p, b, e)
                    dx = dx + s * (d @ B) @ A
                    grads[a][e] += s * (d @ B).T @ xr
                    grads[b][e] += s * d.T @ (xr @ A.T)
            grads["input"][t] += dx[0]
    return grads


def rel_err(a, b):
    """mean|a - b| / mean|b| (0 when both are exactly zero)."""
    a, b = f64(a), f64(b)
    denom = np.mean(np.abs(b))
    num = np.mean(np.abs(a - b))
    return num / denom if denom > 0 else num
