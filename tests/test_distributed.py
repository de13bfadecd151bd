"""moe_sft.distributed in real multi-process jobs on this machine: mpirun -n 2, 3 (and 4 for the hybrid case) over
mpi4py, and 2 and 3 processes over torch.distributed's gloo backend on loopback. Each job runs every case of
tests/distributed_job.py on every rank (one launch per world size: a launch costs seconds) under a bounded
time, killed on expiry; a case passes when every rank reports it ok. Skipped with the reason when mpirun,
mpi4py or torch is missing."""
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import moe_sft

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "distributed_job.py")
LAUNCH_TIMEOUT = 180  # seconds for one whole job (2 cores shared: interpreter + imports + every case)
CASES = ("uneven_with_holes", "tokens_elsewhere_and_idle_ranks", "saved_forwards_lifo_and_discard",
         "bad_input_on_one_rank", "non_finite_on_one_rank", "placement_checked_collectively", "data_parallel",
         "timeout_names_the_missing_rank")


def _run(commands, env):
    """Runs the processes of one job (each its own session, so a hung job is killed whole); their output."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE,
                              start_new_session=True) for c in commands]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        text = "\n".join(p.communicate()[0] for p in procs)
        pytest.fail(f"the job did not finish within {LAUNCH_TIMEOUT} s:\n{text[-4000:]}")
    return "\n".join(outputs)


def _check(output, ranks, cases):
    lines = output.splitlines()
    failures = [line for line in lines if line.startswith("CASE") and " FAIL " in line]
    assert not failures, "\n".join(line.replace(" | ", "\n    ") for line in failures)
    for case in cases:
        ok = sum(line.startswith(f"CASE {case} ok") for line in lines)
        assert ok == ranks, f"case {case}: {ok} of {ranks} ranks reported ok\n{output[-4000:]}"
    assert sum(line == "DONE" for line in lines) == ranks, output[-4000:]


def _mpirun():
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        pytest.skip("no mpirun/mpiexec on PATH (apt-get install openmpi-bin libopenmpi-dev)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpi4py)")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    env = dict(os.environ)
    args = [mpirun]
    if "Open MPI" in version or "OpenRTE" in version:
        # more ranks than cores, as root in a container, over shared memory without the cross-memory-attach
        # that container seccomp profiles often forbid
        args.append("--oversubscribe")
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_rmaps_base_oversubscribe="1")
    return args, env


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_job(ranks):
    args, env = _mpirun()
    _check(_run([args + ["-n", str(ranks), sys.executable, JOB, "mpi"]], env), ranks, CASES)


def test_mpi_hybrid_four_ranks():
    args, env = _mpirun()
    env["MOE_SFT_DIST_CASES"] = "hybrid"
    _check(_run([args + ["-n", "4", sys.executable, JOB, "mpi"]], env), 4, ["hybrid"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("ranks", [2, 3])
def test_torch_gloo_job(ranks):
    pytest.importorskip("torch.distributed", reason="torch is not installed")
    port = str(_free_port())
    env = dict(os.environ, MOE_SFT_DIST_CASES=",".join(CASES))
    _check(_run([[sys.executable, JOB, "torch", str(r), str(ranks), port] for r in range(ranks)], env), ranks,
           CASES)


def test_import_moe_sft_loads_neither_mpi4py_nor_torch():
    code = ("import sys, moe_sft; assert 'moe_sft.distributed' not in sys.modules; import moe_sft.distributed; "
            "bad = [m for m in ('mpi4py', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_communicator_is_refused_by_type():
    from moe_sft import distributed
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator .* got builtins.object"):
        distributed.allreduce_grads(object(), {})
    with pytest.raises(TypeError, match="got builtins.object"):
        distributed.ExpertParallelMoE(object(), 4, [0], None, None, None)
    assert "distributed" not in moe_sft.__all__
