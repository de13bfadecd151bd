"""Float64 numpy reference of the MoE LoRA layer (DESIGN §1), forward and backward.

Everything is computed in float64 from the values the library actually sees (bf16-rounded base weights
and activations, LoRA arrays as given), so the comparison measures the library's arithmetic only.
"""
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

bf16 = np.dtype(ml_dtypes.bfloat16)
LORA_NAMES = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def f64(a):
    return np.asarray(a).astype(np.float64)


def silu(g):
    return g / (1.0 + np.exp(-g))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class Activation:
    """The gated activation h = act(g, u) from its definition (moe_sft_activation): "silu" (silu(g)·u) or
    "swiglu_clamped" (gpt-oss: gate = min(g, limit), up = clip(u, -limit, limit), h = (up + 1)·gate·sigmoid(alpha·
    gate); the derivative through an active clamp is 0, at equality it passes, as torch.clamp's)."""
    name: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def terms(self, g, u):
        """h and its partial derivatives h_g, h_u, h_gg, h_gu (h_uu is 0 for both), elementwise in float64."""
        if self.name == "silu":
            s = sigmoid(g)
            act, d1 = g * s, s * (1.0 + g * (1.0 - s))
            d2 = s * (1.0 - s) * (2.0 + g * (1.0 - 2.0 * s))
            return act * u, d1 * u, act, d2 * u, d1
        a, L = self.alpha, self.limit
        gate_free, up_free = (g <= L).astype(np.float64), (np.abs(u) <= L).astype(np.float64)
        gate, up1 = np.minimum(g, L), np.clip(u, -L, L) + 1.0
        s = sigmoid(a * gate)
        glu, d1 = gate * s, s * (1.0 + a * gate * (1.0 - s))
        d2 = a * s * (1.0 - s) * (2.0 + a * gate * (1.0 - 2.0 * s))
        return up1 * glu, gate_free * up1 * d1, up_free * glu, gate_free * up1 * d2, gate_free * up_free * d1


SILU = Activation()


@dataclass
class Problem:
    """One layer plus one batch: base weights [E,I,H]/[E,H,I], LoRA dict, inputs; the activation and the
    optional biases (float32 gate_bias, up_bias [E, I], down_bias [E, H], by name)."""
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    lora: dict  # name -> array (float32 or bf16), or {} for rank 0
    alpha: float
    x: np.ndarray  # [T, H] bf16
    ids: np.ndarray  # [T, k] int64
    weights: np.ndarray  # [T, k] float32
    grad_out: np.ndarray  # [T, H] bf16
    activation: Activation = SILU
    biases: dict = field(default_factory=dict)

    @property
    def rank(self):
        return self.lora["gate_a"].shape[1] if self.lora else 0

    @property
    def scale(self):
        return self.alpha / self.rank if self.rank else 0.0

    def bias(self, name, e):
        """Expert e's bias ``name`` in float64, or 0."""
        b = self.biases.get(name)
        return 0.0 if b is None else f64(b[e])

    def layer_kwargs(self):
        """MoESFT's activation and bias arguments for this problem."""
        act = self.activation
        kwargs = dict(self.biases)
        if act.name != "silu":
            kwargs.update(activation=act.name, swiglu_alpha=act.alpha, swiglu_limit=act.limit)
        return kwargs


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


def make_gpt_oss_problem(E, H, I, k, T, rank, *, seed=0, lora_dtype=np.float32, alpha=1.702, limit=7.0, ids=None):
    """make_problem with gpt-oss's clamped SwiGLU and all three biases. Each gate/up column's bias is drawn from
    {-2 limit, 0, 2 limit} (plus a little noise), so that the clamps are active on about a third of the elements
    while g and u stay many standard deviations away from the clamps' edges: where an element sits within
    rounding of an edge, the library and the float64 reference could take different sides (see clamp_margin)."""
    p = make_problem(E, H, I, k, T, rank, lora_dtype=lora_dtype, seed=seed, lora_scale=0.5, ids=ids)
    rng = np.random.default_rng(seed + 1)

    def clustered():
        return (rng.choice([-2 * limit, 0.0, 2 * limit], (E, I)) + 0.3 * rng.standard_normal((E, I))).astype(np.float32)

    p.activation = Activation("swiglu_clamped", alpha, limit)
    p.biases = {"gate_bias": clustered(), "up_bias": clustered(),
                "down_bias": rng.standard_normal((E, H)).astype(np.float32)}
    return p


def clamp_stats(p):
    """For the routed rows of p (float64): the fraction of gate elements above the limit, of up elements outside
    [-limit, limit], and the smallest distance of any g from limit or u from +-limit."""
    L = p.activation.limit
    g_all, u_all = [], []
    for e in np.unique(p.ids[p.ids >= 0]):
        tok = np.nonzero(p.ids == e)[0]
        g, u, _, _ = expert_forward(p, e, f64(p.x[tok]))
        g_all.append(g.ravel())
        u_all.append(u.ravel())
    g, u = np.concatenate(g_all), np.concatenate(u_all)
    margin = min(np.abs(g - L).min(), np.abs(np.abs(u) - L).min())
    return float(np.mean(g > L)), float(np.mean(np.abs(u) > L)), float(margin)


def _lora(p, name, e):
    return f64(p.lora[name][e]) if p.lora else None


def expert_forward(p, e, x):
    """g, u, h, y for the rows x [n, H] through expert e (float64)."""
    s = p.scale
    g = x @ f64(p.gate[e]).T + p.bias("gate_bias", e)
    u = x @ f64(p.up[e]).T + p.bias("up_bias", e)
    if p.rank:
        g = g + s * (x @ _lora(p, "gate_a", e).T) @ _lora(p, "gate_b", e).T
        u = u + s * (x @ _lora(p, "up_a", e).T) @ _lora(p, "up_b", e).T
    h = p.activation.terms(g, u)[0]
    y = h @ f64(p.down[e]).T + p.bias("down_bias", e)
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
            _, h_g, h_u, _, _ = p.activation.terms(g, u)
            dg, du = dh * h_g, dh * h_u
            dx = dg @ f64(p.gate[e]) + du @ f64(p.up[e])
            if p.rank:
                for d, a, b in ((dg, "gate_a", "gate_b"), (du, "up_a", "up_b")):
                    A, B = _lora(p, a, e), _lora(p, b, e)
                    dx = dx + s * (d @ B) @ A
                    grads[a][e] += s * (d @ B).T @ xr
                    grads[b][e] += s * d.T @ (xr @ A.T)
            grads["input"][t] += dx[0]
    return grads


def _mm(a, b):
    """(a @ b, the first-order variance of a @ b): ``a`` and ``b`` are (value, variance) pairs; the product adds
    each factor's variance times the other's square, and its own rounding (its square)."""
    value = a[0] @ b[0]
    return value, a[1] @ np.square(b[0]) + np.square(a[0]) @ b[1] + np.square(value)


def _plus(a, b):
    return a[0] + b[0], a[1] + b[1]


def _scaled(c, a):
    return c * a[0], c * c * a[1]


def _exact(a):
    """An input as a (value, variance) pair: its square, as if it were rounded once."""
    return a, np.square(a)


def magnitudes(p):
    """Per-element error scale M of the output and every grad, in float64: the root-sum-square of the terms each
    element is made of, carried through the layer as a first-order error analysis with independent roundings
    does. Every input, product and intermediate is taken as rounded once (a relative error of up to 2^-8): a
    product's variance is each factor's variance times the other's square plus its own square; silu and its
    derivatives pass an input's variance on scaled by their derivative squared. Roundings of a sum's terms add
    like a random walk, so an implementation's error is a small multiple of 2^-8 M in every element, however
    much the element cancels, and a column, row or element gone wrong is many times that (test_error_bounds);
    an element with M = 0 (a token with no expert) must be exact. Experts are vectorized over their rows."""
    x, w, go = f64(p.x), f64(p.weights), f64(p.grad_out)
    T, k = p.ids.shape
    s = p.scale
    sq = np.square
    v = {"output": np.zeros_like(x), "input": np.zeros_like(x), "routing_weights": np.zeros((T, k))}
    out, grad_input = np.zeros_like(x), np.zeros_like(x)
    for n in LORA_NAMES if p.rank else ():
        v[n] = np.zeros(p.lora[n].shape)
    for e in np.unique(p.ids[p.ids >= 0]):
        tok, slot = np.nonzero(p.ids == e)
        X, wr, gr = _exact(x[tok]), w[tok, slot][:, None], go[tok]
        Wg, Wu, Wd = (_exact(f64(a[e])) for a in (p.gate, p.up, p.down))
        transposed = lambda a: (a[0].T, a[1].T)  # noqa: E731
        g, u = _mm(X, transposed(Wg)), _mm(X, transposed(Wu))
        g, u = _plus(g, _exact(p.bias("gate_bias", e))), _plus(u, _exact(p.bias("up_bias", e)))
        if p.rank:
            L = {n: _exact(_lora(p, n, e)) for n in LORA_NAMES}

            def low_rank(a, A, B):  # s (a A^T) B^T
                return _scaled(s, _mm(_mm(a, transposed(L[A])), transposed(L[B])))

            g = _plus(g, low_rank(X, "gate_a", "gate_b"))
            u = _plus(u, low_rank(X, "up_a", "up_b"))
        hv, h_g, h_u, h_gg, h_gu = p.activation.terms(g[0], u[0])
        h = (hv, sq(h_g) * g[1] + sq(h_u) * u[1] + sq(hv))
        y = _plus(_mm(h, transposed(Wd)), _exact(p.bias("down_bias", e)))
        if p.rank:
            y = _plus(y, low_rank(h, "down_a", "down_b"))
        np.add.at(v["output"], tok, sq(wr) * (y[1] + sq(y[0])))
        np.add.at(out, tok, wr * y[0])
        rw = np.sum(gr * y[0], axis=1)
        v["routing_weights"][tok, slot] = np.sum(sq(gr) * (y[1] + sq(y[0])), axis=1) + sq(rw)
        dyv = wr * gr
        dy = (dyv, 2 * sq(dyv))
        dh = _mm(dy, Wd)
        if p.rank:
            dyB = _mm(dy, L["down_b"])
            dh = _plus(dh, _scaled(s, _mm(dyB, L["down_a"])))
            v["down_b"][e] += s * s * _mm(transposed(dy), _mm(h, transposed(L["down_a"])))[1]
            v["down_a"][e] += s * s * _mm(transposed(dyB), h)[1]
        dgv, duv = dh[0] * h_g, dh[0] * h_u
        dg = (dgv, sq(h_g) * dh[1] + sq(dh[0] * h_gu) * u[1] + sq(dh[0] * h_gg) * g[1] + sq(dgv))
        du = (duv, sq(h_u) * dh[1] + sq(dh[0] * h_gu) * g[1] + sq(duv))
        dx = _plus(_mm(dg, Wg), _mm(du, Wu))
        if p.rank:
            for d, a, b in ((dg, "gate_a", "gate_b"), (du, "up_a", "up_b")):
                dB = _mm(d, L[b])
                dx = _plus(dx, _scaled(s, _mm(dB, L[a])))
                v[a][e] += s * s * _mm(transposed(dB), X)[1]
                v[b][e] += s * s * _mm(transposed(d), _mm(X, transposed(L[a])))[1]
        np.add.at(v["input"], tok, dx[1])
        np.add.at(grad_input, tok, dx[0])
    v["output"] += sq(out)  # the sums over a token's experts, rounded to bf16
    v["input"] += sq(grad_input)
    return {name: np.sqrt(var) for name, var in v.items()}


def rel_err(a, b):
    """mean|a - b| / mean|b| (0 when both are exactly zero)."""
    a, b = f64(a), f64(b)
    denom = np.mean(np.abs(b))
    num = np.mean(np.abs(a - b))
    return num / denom if denom > 0 else num


# ---- quantized base weights (moe_sft_weight_format in moe_sft.h), each format in numpy ----
# quantize: the arithmetic moe_sft_quantize documents, every op in float32 and round half to even (np.rint),
# so that the library's arrays can be compared byte for byte. dequantize: the weights the reference uses.

def _f32(w):
    """bf16 w as the float32 values the library quantizes."""
    return np.asarray(w, bf16).astype(np.float32)


def _grouped(w, group_size):
    """bf16 w [.., N, K] as float32 [.., N, K / group_size, group_size]."""
    w = _f32(w)
    return w.reshape(w.shape[:-1] + (w.shape[-1] // group_size, group_size))


def _pack_nibbles(codes, per_word):
    """Codes in [0, 15] along the last axis, value j of each run of per_word in bits 4j .. 4j + 3 of a word."""
    runs = codes.astype(np.uint32).reshape(codes.shape[:-1] + (-1, per_word))
    return np.bitwise_or.reduce(runs << (4 * np.arange(per_word, dtype=np.uint32)), axis=-1)


def _unpack_nibbles(words, per_word):
    shifts = 4 * np.arange(per_word, dtype=np.uint32)
    codes = (words.astype(np.uint32)[..., None] >> shifts) & 0xF
    return codes.reshape(words.shape[:-1] + (-1,)).astype(np.int64)


def quantize_int8(w):
    """int8 q [.., N, K], f32 scale [.., N]: scale = max|w| / 127 per row (1 for a zero row), q = rint(w / scale)."""
    w = _f32(w)
    max_abs = np.max(np.abs(w), axis=-1)
    scale = np.where(max_abs > 0, max_abs / np.float32(127), np.float32(1)).astype(np.float32)
    return np.rint(w / scale[..., None]).astype(np.int8), scale


def quantize_awq(w, group_size):
    """uint8 [.., N, K/2] (even k in the low nibble), f32 scale and uint8 zero [.., N, K/g]: per group
    lo = min(0, min w), hi = max(0, max w), scale = (hi - lo) / 15 (1 for a zero group), zero = rint(-lo / scale),
    q = clip(rint(w / scale) + zero, 0, 15)."""
    g = _grouped(w, group_size)
    lo = np.minimum(np.float32(0), g.min(axis=-1))
    hi = np.maximum(np.float32(0), g.max(axis=-1))
    scale = np.where(hi > lo, (hi - lo) / np.float32(15), np.float32(1)).astype(np.float32)
    zero = np.rint(-lo / scale)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 15)
    return _pack_nibbles(q.reshape(q.shape[:-2] + (-1,)), 2).astype(np.uint8), scale, zero.astype(np.uint8)


def quantize_k2(w, group_size):
    """What a Kimi-K2 checkpoint holds (the library never makes it): symmetric int4 per group, scale =
    bf16(max|w| / 7) (1 for a zero group), q = clip(rint(w / scale), -8, 7), in the compressed-tensors
    pack-quantized layout: int32 weight_packed [.., N, K/8] with q + 8 in bits 4 (k % 8) of word k / 8, and
    weight_scale as bf16 bits (uint16) [.., N, K/g]."""
    g = _grouped(w, group_size)
    max_abs = np.max(np.abs(g), axis=-1)
    scale = np.where(max_abs > 0, max_abs / np.float32(7), np.float32(1)).astype(bf16)
    q = np.clip(np.rint(g / scale.astype(np.float32)[..., None]), -8, 7)
    packed = _pack_nibbles(q.reshape(q.shape[:-2] + (-1,)) + 8, 8).view(np.int32)
    return packed, scale.view(np.uint16)


def quantize(weight_format, w, group_size):
    """(weights, scale, zero or None) of bf16 w [.., N, K] in weight_format's layout."""
    if weight_format == "int8":
        return quantize_int8(w) + (None,)
    if weight_format == "int4_awq":
        return quantize_awq(w, group_size)
    return quantize_k2(w, group_size) + (None,)


def dequantize(weight_format, weights, scale, zero=None):
    """The float64 weights [.., N, K] that weight_format's arrays encode (moe_sft_weight_format)."""
    if weight_format == "int8":
        return f64(weights) * f64(scale)[..., None]
    if weight_format == "int4_awq":
        q, offset = _unpack_nibbles(weights, 2), f64(zero)
    else:
        q, offset = _unpack_nibbles(np.asarray(weights).view(np.uint32), 8), 8.0
        scale = np.asarray(scale).view(bf16)
    group_size = q.shape[-1] // np.shape(scale)[-1]
    grouped = q.reshape(q.shape[:-1] + (-1, group_size))
    return ((grouped - f64(offset)[..., None]) * f64(scale)[..., None]).reshape(q.shape)


# ---- the block-scaled formats (fp8_e4m3_block, mxfp4), from their definitions in moe_sft.h ----
# Decoding from the bit fields (independent of ml_dtypes); quantizing with ml_dtypes' round-to-nearest-even casts
# after the saturation the header documents, every op in float32.

def e4m3_values():
    """float64 [256]: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 NaN; subnormals 2^-6 m/8."""
    c = np.arange(256)
    e, m = (c >> 3) & 0xF, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag[(c & 0x7F) == 0x7F] = np.nan
    return np.where(c & 0x80, -mag, mag)


def e2m1_values():
    """float64 [16]: sign in bit 3, 2 exponent bits (bias 1), 1 mantissa bit."""
    c = np.arange(16)
    e, m = (c >> 1) & 3, (c & 1).astype(np.float64)
    mag = np.where(e == 0, m * 0.5, (1 + m / 2) * 2.0 ** (e - 1))
    return np.where(c & 8, -mag, mag)


def e8m0_values(s):
    """2^(s - 127) for scale bytes s, NaN for 255."""
    s = np.asarray(s).astype(np.int64)
    return np.where(s == 255, np.nan, np.ldexp(1.0, s - 127))


def dequantize_fp8(weights, scale, block):
    """W [.., N, K] = e4m3(q) * scale_inv[.., n / bn, k / bk] (partial edge blocks allowed)."""
    bn, bk = block
    scale = np.asarray(scale)
    s = f64(scale.view(bf16) if scale.dtype == np.uint16 else scale)
    N, K = np.shape(weights)[-2:]
    return e4m3_values()[np.asarray(weights)] * np.repeat(np.repeat(s, bn, axis=-2), bk, axis=-1)[..., :N, :K]


def dequantize_mxfp4(blocks, scales):
    """W [.., N, K] = e2m1(nibble) * 2^(s - 127), blocks uint8 [.., N, K/2] (low nibble = even k) or
    [.., N, K/32, 16]."""
    scales = np.asarray(scales)
    blocks = np.asarray(blocks).reshape(scales.shape[:-1] + (-1,))
    nibbles = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(blocks.shape[:-1] + (-1,))
    return e2m1_values()[nibbles] * np.repeat(e8m0_values(scales), 32, axis=-1)


def quantize_fp8(w, block, scale_dtype=np.float32):
    """uint8 e4m3 [.., N, K] and scale_inv [.., ceil(N/bn), ceil(K/bk)] in scale_dtype: scale_inv = amax / 448
    (1 for a zero block), q = e4m3(clip(w / stored scale_inv, -448, 448))."""
    w = _f32(w)
    bn, bk = block
    N, K = w.shape[-2:]
    rows, cols = -(-N // bn), -(-K // bk)
    padded = np.zeros(w.shape[:-2] + (rows * bn, cols * bk), np.float32)
    padded[..., :N, :K] = np.abs(w)
    amax = padded.reshape(w.shape[:-2] + (rows, bn, cols, bk)).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / np.float32(448), np.float32(1)).astype(np.float32).astype(scale_dtype)
    full = np.repeat(np.repeat(scale.astype(np.float32), bn, axis=-2), bk, axis=-1)[..., :N, :K]
    q = np.clip(w / full, np.float32(-448), np.float32(448)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return q, scale


def quantize_mxfp4(w):
    """uint8 [.., N, K/2] (low nibble first) and e8m0 scale bytes [.., N, K/32]: e = clip(floor(log2 amax) - 2,
    -127, 127) (0 for a zero group), q = e2m1(clip(w / 2^e, -6, 6))."""
    g = _grouped(w, 32)
    amax = np.abs(g).max(axis=-1)
    _, exponent = np.frexp(amax)  # amax in [2^(exponent-1), 2^exponent)
    e = np.where(amax > 0, np.clip(exponent - 1 - 2, -127, 127), 0)
    q = np.clip(g / np.ldexp(np.float32(1), e)[..., None].astype(np.float32), np.float32(-6), np.float32(6))
    nibbles = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(q.shape[:-2] + (-1,)) & 0xF
    return (_pack_nibbles(nibbles, 2).astype(np.uint8), (e + 127).astype(np.uint8))
