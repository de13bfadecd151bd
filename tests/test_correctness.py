"""Forward, grad_input, grad of routing weights and all six LoRA grads vs the float64 reference."""
import numpy as np
import pytest

import reference as R
from conftest import assert_matches_reference, make_layer, run_layer

# (E, H, I, k, T, rank): odd sizes (H, I not multiples of 16 or of the kernel blocks), E=1, k=1, T=1, T >> E
SHAPES = [
    (4, 64, 48, 2, 10, 4),
    (3, 37, 29, 2, 9, 3),
    (1, 40, 24, 1, 5, 2),
    (6, 32, 80, 4, 1, 4),
    (4, 96, 72, 3, 200, 8),
    (8, 130, 70, 4, 33, 16),
    (2, 17, 131, 2, 64, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-H{}-I{}-k{}-T{}-r{}".format(*s))
@pytest.mark.parametrize("lora_dtype", [np.float32, R.bf16], ids=["f32", "bf16"])
def test_matches_reference(isa, shape, lora_dtype):
    E, H, I, k, T, r = shape
    p = R.make_problem(E, H, I, k, T, r, lora_dtype=lora_dtype, seed=sum(shape))
    out, grads = run_layer(make_layer(p), p)
    assert_matches_reference(p, out, grads)


def test_single_token_single_expert(isa):
    p = R.make_problem(6, 32, 80, 1, 1, 4, seed=3)
    assert_matches_reference(p, *run_layer(make_layer(p), p), conditioned_routing=True)


def test_rank_zero(isa):
    p = R.make_problem(4, 48, 40, 2, 12, 0, seed=3)
    out, grads = run_layer(make_layer(p), p)
    assert grads.gate_a is None
    assert_matches_reference(p, out, grads)


def test_no_expert_slots_contribute_nothing(isa):
    p = R.make_problem(4, 48, 40, 3, 16, 4, seed=4)
    p.ids[::2, 1] = -1
    p.ids[5, :] = -1  # a token with no expert at all
    out, grads = run_layer(make_layer(p), p)
    assert_matches_reference(p, out, grads)
    assert np.all(np.asarray(out[5], np.float32) == 0)
    assert np.all(np.asarray(grads.input[5], np.float32) == 0)
    assert np.all(grads.routing_weights[p.ids == -1] == 0)


def test_all_slots_empty_gives_zeros(isa):
    p = R.make_problem(3, 32, 24, 2, 4, 2, seed=5)
    p.ids[:] = -1
    layer = make_layer(p)
    out, grads = run_layer(layer, p)
    assert np.all(np.asarray(out, np.float32) == 0)
    assert np.all(np.asarray(grads.input, np.float32) == 0)
    for n in R.LORA_NAMES:
        assert np.all(getattr(grads, n) == 0)


def test_repeated_ids_are_two_contributions(isa):
    p = R.make_problem(4, 48, 40, 3, 12, 4, seed=6)
    p.ids[:, 1] = p.ids[:, 0]
    out, grads = run_layer(make_layer(p), p)
    assert_matches_reference(p, out, grads)


def test_one_expert_takes_every_token(isa):
    p = R.make_problem(8, 64, 56, 2, 300, 4, seed=7)
    p.ids[:, 0] = 3
    p.ids[:, 1] = -1
    out, grads = run_layer(make_layer(p), p)
    assert_matches_reference(p, out, grads)


def test_empty_batch(isa):
    p = R.make_problem(2, 16, 16, 2, 0, 2, seed=8)
    layer = make_layer(p)
    out, grads = run_layer(layer, p)
    assert out.shape == (0, 16) and grads.input.shape == (0, 16)
    for n in R.LORA_NAMES:  # no token reached any expert: grads are zero, not garbage
        assert np.all(getattr(grads, n) == 0)


def test_int32_ids_and_float32_activations(isa):
    p = R.make_problem(4, 32, 40, 2, 7, 4, seed=9)
    layer = make_layer(p)
    out = layer.forward(np.asarray(p.x, np.float32), p.ids.astype(np.int32), p.weights, save_for_backward=True)
    assert out.dtype == np.float32
    grads = layer.backward(np.asarray(p.grad_out, np.float32))
    assert grads.input.dtype == np.float32
    assert_matches_reference(p, out, grads)


def test_forward_without_save_matches_and_leaves_cache_empty(isa):
    p = R.make_problem(4, 48, 40, 2, 10, 4, seed=10)
    layer = make_layer(p)
    a = layer.forward(p.x, p.ids, p.weights)
    assert layer.cache_depth == 0
    b = layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    assert layer.cache_depth == 1
    assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_threads_do_not_change_results(isa):
    p = R.make_problem(6, 96, 80, 2, 64, 4, seed=11)
    runs = [run_layer(make_layer(p, num_threads=n), p) for n in (1, 2, 3)]
    for out, grads in runs[1:]:
        assert np.array_equal(np.asarray(out, np.float32), np.asarray(runs[0][0], np.float32))
        for n in ("input", "routing_weights") + R.LORA_NAMES:
            assert np.array_equal(np.asarray(getattr(grads, n), np.float32),
                                  np.asarray(getattr(runs[0][1], n), np.float32)), n
