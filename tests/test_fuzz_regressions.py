"""Inputs the fuzzers (fuzz/) found wrong, kept as tests of the installed package."""
import ml_dtypes
import numpy as np

import moe_sft


def test_awq_group_whose_range_overflows_f32():
    """fuzz_quantize: a group holding weights near +-2e38 (finite bf16) has max - min beyond f32's range; the
    scale was Inf and every such weight came back NaN. The range is now taken in double. (At +-3.39e38, bf16's
    largest, the zero point's rounding can put the dequantized extreme half a step past f32's range: that Inf
    is the format's, not the quantizer's.)"""
    big = 2e38
    w = np.zeros((2, 16), np.float32)
    w[0, :8] = np.linspace(-big, big, 8)
    w[1] = np.linspace(-1, 1, 16)  # an ordinary row: unchanged
    q = moe_sft.quantize(w.astype(ml_dtypes.bfloat16), "int4_awq", group_size=8)
    assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
    back = moe_sft.dequantize(q)
    w = w.astype(ml_dtypes.bfloat16).astype(np.float64)
    step = np.repeat(q.scale.astype(np.float64), 8, axis=-1)
    assert np.all(np.abs(back - w) <= 0.5 * step * (1 + 1e-6))
