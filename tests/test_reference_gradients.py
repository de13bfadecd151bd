"""Finite-difference check of the float64 reference's analytic gradients: every other test trusts them."""
import numpy as np
import pytest

import reference as R


def loss(p, x, w):
    return float(np.sum(R.forward(p, x=x, weights=w) * R.f64(p.grad_out)))


def numeric_grad(f, a, eps=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        up = f()
        a[i] = old - eps
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("repeat_ids", [False, True])
def test_reference_gradients_match_finite_differences(repeat_ids):
    p = R.make_problem(3, 6, 5, 2, 4, 2, lora_dtype=np.float64, seed=1, lora_scale=2.0)
    p.ids[1, 1] = -1
    if repeat_ids:
        p.ids[2, 1] = p.ids[2, 0]
    x, w = R.f64(p.x).copy(), R.f64(p.weights).copy()
    analytic = R.backward(p)
    f = lambda: loss(p, x, w)  # noqa: E731
    checks = [("input", x), ("routing_weights", w)] + [(n, p.lora[n]) for n in R.LORA_NAMES]
    for name, array in checks:
        numeric = numeric_grad(f, array)
        # central differences carry ~1e-9 absolute noise at these magnitudes: judge against the array's scale
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max(),
                                   err_msg=name)
