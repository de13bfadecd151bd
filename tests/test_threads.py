"""Concurrency: layers driven from several Python threads at once give the results of running them one
after the other (shared pool and arena, per-layer state), and one layer shared by threads stays consistent."""
import threading

import numpy as np

import reference as R
from conftest import make_layer, run_layer


def f32(a):
    return np.asarray(a, np.float32)


def same(a, b):
    (out_a, g_a), (out_b, g_b) = a, b
    assert np.array_equal(f32(out_a), f32(out_b))
    for n in ("input", "routing_weights") + R.LORA_NAMES:
        assert np.array_equal(f32(getattr(g_a, n)), f32(getattr(g_b, n))), n


def run_threads(targets):
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as err:  # surfaced below: a thread's failure must fail the test
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_threads_each_with_own_layer_equal_serial(isa):
    problems = [R.make_problem(3 + i, 32 + 16 * i, 48, 2, 10 + 7 * i, 4, seed=80 + i) for i in range(4)]
    steps = 6
    serial = [[run_layer(make_layer(p, tp_count=1 + i % 2), p) for _ in range(steps)] for i, p in enumerate(problems)]
    results = [None] * len(problems)

    def drive(i):
        layer = make_layer(problems[i], tp_count=1 + i % 2)
        results[i] = [run_layer(layer, problems[i]) for _ in range(steps)]

    run_threads([lambda i=i: drive(i) for i in range(len(problems))])
    for i in range(len(problems)):
        for a, b in zip(serial[i], results[i]):
            same(a, b)


def test_stress_many_small_calls(isa):
    """Many short calls from several threads: a race in the pool's hand-off or the arena would show up as
    a wrong result or a hang here."""
    problems = [R.make_problem(2, 16, 24, 1, 1 + i, 2, seed=90 + i) for i in range(3)]
    expected = [run_layer(make_layer(p), p) for p in problems]

    def drive(i):
        layer = make_layer(problems[i], num_threads=2)
        for _ in range(150):
            same(run_layer(layer, problems[i]), expected[i])

    run_threads([lambda i=i: drive(i) for i in range(len(problems))])


def test_one_layer_shared_by_threads(isa):
    """Forwards without saving from several threads on one layer: each call is atomic on the layer."""
    p = R.make_problem(4, 32, 40, 2, 12, 4, seed=95)
    layer = make_layer(p, max_cache_depth=8)
    expected = f32(layer.forward(p.x, p.ids, p.weights))
    outs = []

    def drive():
        for _ in range(30):
            outs.append(f32(layer.forward(p.x, p.ids, p.weights)))

    run_threads([drive] * 4)
    assert len(outs) == 120 and all(np.array_equal(o, expected) for o in outs)
    # saved forwards pushed from several threads all land, up to the depth limit
    run_threads([lambda: layer.forward(p.x, p.ids, p.weights, save_for_backward=True)] * 8)
    assert layer.cache_depth == 8
