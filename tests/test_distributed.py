"""moe_sft.distributed in real multi-process jobs on this machine: mpirun -n 2, 3 (and 4 for the hybrid case) over
mpi4py, and 2 and 3 processes over torch.distributed's gloo backend on loopback. Each job runs every case of
tests/distributed_job.py on every rank (one launch per world size: a launch costs seconds) under a bounded
time, killed on expiry; a case passes when every rank reports it ok. Skipped with the reason when mpirun,
mpi4py or torch is missing."""
import os
import re
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
CASES = ("uneven_with_holes", "from_checkpoint", "tokens_elsewhere_and_idle_ranks", "saved_forwards_lifo_and_discard",
         "fused_adapter_accumulates_once", "bad_input_on_one_rank", "non_finite_on_one_rank", "placement_checked_collectively", "data_parallel",
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
    """Every rank reported every case ok. mpirun forwards the ranks' output as it comes, so two ranks' lines may
    share a line of the merged text: results are counted as substrings, not lines."""
    failures = re.findall(r"CASE \S+ FAIL .*", output)
    assert not failures, "\n".join(f.replace(" | ", "\n    ") for f in failures)
    for case in cases:
        ok = output.count(f"CASE {case} ok")
        assert ok == ranks, f"case {case}: {ok} of {ranks} ranks reported ok\n{output[-4000:]}"
    assert output.count("DONE") == ranks, output[-4000:]


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


# README's C snippet (the ```c mpi block) with a main around it: each rank routes its tokens (some -1), sends
# them to their owners, checks what it received, sends the rows back unchanged (an identity "expert") and
# checks that each token's combined row is its x times its number of real slots.
C_MAIN = r"""
int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, world;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  enum { T = 7, K = 2, H = 8, E = 5 };
  int32_t placement[E];
  int64_t ids[T * K], pairs[T * K], valid = 0, received_all = 0;
  float w[T * K], xf[T * H], out[T * H];
  uint16_t x[T * H], *rx, *y;
  int64_t *rid;
  float *rw;
  int counts[16], offsets[16], rcounts[16], roffsets[16];
  for (int e = 0; e < E; ++e) placement[e] = (e * 3 + 1) % world;
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) {
      ids[t * K + j] = (t * 3 + j * 2 + rank) % (E + 1) - 1;
      w[t * K + j] = 0.5f;
      valid += ids[t * K + j] >= 0;
    }
  for (int i = 0; i < T * H; ++i) xf[i] = (float)(rank * 16 + i / H + 1), out[i] = 0.0f;
  moe_sft_bf16_from_f32(xf, x, T * H);
  int64_t received = send_to_owners(MPI_COMM_WORLD, T, K, H, E, x, ids, w, placement, pairs, counts, offsets,
                                    rcounts, roffsets, &rx, &rid, &rw);
  for (int64_t i = 0; i < received; ++i)
    if (rid[i] < 0 || rid[i] >= E || placement[rid[i]] != rank || rw[i] != 0.5f) {
      printf("rank %d: received row %ld has expert %ld, weight %g\n", rank, (long)i, (long)rid[i], rw[i]);
      return 1;
    }
  MPI_Allreduce(&received, &received_all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &valid, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  if (received_all != valid) {
    printf("rank %d: %ld rows received of %ld\n", rank, (long)received_all, (long)valid);
    return 1;
  }
  y = rx;
  int64_t rows = 0;
  for (int r = 0; r < world; ++r) rows += counts[r];
  return_and_combine(MPI_COMM_WORLD, rows, K, H, pairs, counts, offsets, rcounts, roffsets, y, out);
  for (int t = 0; t < T; ++t) {
    int slots = (ids[t * K] >= 0) + (ids[t * K + 1] >= 0);
    for (int h = 0; h < H; ++h)
      if (out[t * H + h] != slots * xf[t * H + h]) {
        printf("rank %d: out[%d, %d] = %g, expected %g\n", rank, t, h, out[t * H + h], slots * xf[t * H + h]);
        return 1;
      }
  }
  printf("rank %d ok: %ld rows received\n", rank, (long)received);
  free(rx), free(rid), free(rw);
  MPI_Finalize();
  return 0;
}
"""


def test_readme_c_host_snippet_under_mpirun(tmp_path):
    args, env = _mpirun()
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        pytest.skip("no mpicc (apt-get install libopenmpi-dev)")
    readme = open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8").read()
    [snippet] = re.findall(r"^```c mpi\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    source = tmp_path / "exchange.c"
    source.write_text(snippet + C_MAIN)
    flags = subprocess.run([sys.executable, "-m", "moe_sft", "--cflags", "--libs"], capture_output=True, text=True,
                           check=True).stdout.split()
    subprocess.run([mpicc, "-std=c11", "-Wall", "-Wextra", "-Werror", str(source), "-o", str(tmp_path / "exchange")]
                   + flags, check=True, timeout=120)
    output = _run([args + ["-n", "2", str(tmp_path / "exchange")]], env)
    assert output.count(" ok: ") == 2, output
