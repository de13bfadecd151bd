"""Process faults: fork while another thread is inside a call (the child uses the library), Ctrl-C during a
long forward, and a Python thread killed by an exception between forward and backward."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import moe_sft
import reference as R
from conftest import make_layer, run_layer
from test_threads import same


def _wait(pid, timeout):
    """The child's wait status; a child still running after timeout seconds (hung in the library) is killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child did not finish in {timeout} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_fork_while_another_thread_computes():
    """The pool's threads do not survive fork: the library waits for the call in flight (pthread_atfork on its
    runtime lock) and the child builds a pool of its own on first use. The child computes exactly what the
    parent does, on a layer made before the fork and on a new one."""
    p = R.make_problem(4, 64, 96, 2, 200, 4, seed=31)
    busy, idle = make_layer(p, num_threads=2), make_layer(p, num_threads=2)
    expected = run_layer(idle, p)
    stop = threading.Event()
    errors = []

    def compute():
        try:
            while not stop.is_set():
                same(run_layer(busy, p), expected)
        except BaseException as err:  # reported by the parent below
            errors.append(err)

    worker = threading.Thread(target=compute)
    worker.start()
    try:
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:  # the child: only this thread exists
                status = 1
                try:
                    same(run_layer(idle, p), expected)
                    same(run_layer(make_layer(p, num_threads=2), p), expected)
                    status = 0
                finally:
                    os._exit(status)
            pids.append(pid)
        for pid in pids:
            status = _wait(pid, timeout=60)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child exited with {status}"
    finally:
        stop.set()
        worker.join()
    assert not errors, errors


CTRL_C = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import reference as R
    from conftest import make_layer
    p = R.make_problem(8, 512, 1024, 2, {tokens}, 8, seed=5)
    layer = make_layer(p, num_threads=1)
    print("ready", flush=True)
    start = time.monotonic()
    try:
        while True:
            layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
            layer.discard_saved(1)
    except KeyboardInterrupt:
        waited = time.monotonic() - start
    # the layer is consistent: at most the interrupted loop's forward is saved; drop it and train a step
    layer.discard_saved(layer.cache_depth)
    layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    layer.backward(p.grad_out)
    assert layer.cache_depth == 0
    print(f"interrupted after {{waited:.2f}} s", flush=True)
""")


def test_ctrl_c_between_calls_and_layer_consistent(tmp_path):
    """Ctrl-C during a loop of forwards: KeyboardInterrupt reaches Python when the forward in flight returns
    (a call releases the GIL and runs to completion: README "Reliability" says why it is not cancelled), and the
    layer is then consistent (what was saved can be discarded; a training step works)."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C.format(tests=os.path.dirname(os.path.abspath(__file__)), tokens=64))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(f"the child did not start: {proc.communicate()[1]}")
    threading.Event().wait(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted" in out


def test_thread_killed_between_forward_and_backward():
    """A thread whose forward(save) succeeds and which then dies of an exception leaves one saved forward;
    discard_saved drops it and the layer trains exactly as a fresh one."""
    p = R.make_problem(3, 32, 48, 2, 9, 4, seed=41)
    layer = make_layer(p)
    expected = run_layer(make_layer(p), p)

    def dies():
        layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
        raise RuntimeError("the training step failed between forward and backward")

    failures = []
    t = threading.Thread(target=lambda: failures.append(pytest.raises(RuntimeError, dies)))
    t.start()
    t.join()
    assert len(failures) == 1 and layer.cache_depth == 1
    with pytest.raises(moe_sft.CacheFullError):  # max_cache_depth 1: the dead thread's forward is in the way
        layer.forward(p.x, p.ids, p.weights, save_for_backward=True)
    layer.discard_saved(1)
    assert layer.cache_depth == 0
    same(run_layer(layer, p), expected)
