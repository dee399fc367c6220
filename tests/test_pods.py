"""Pods and clusters: the distributed runtime starts from a launcher's environment (SLURM's here), an incomplete one
is one line; a preemption notice (SIGTERM) saves the latest checkpoint at the current step on every process and
exits with status 75, and the restart redoes no step: bitwise the uninterrupted run."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import types

import chex
import jax
import orbax.checkpoint as ocp
import numpy as np
import pytest

from conftest import LAUNCHER_VARS, ROOT, xla_flags
from mgd_jax.errors import ConfigError
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import cpu, distributed, faults, loop, preemption
from mgd_jax.train import mesh as mesh_lib
from test_multihost import STAGES
import test_reliability
from test_reliability import _cmd

reference_run = test_reliability.reference_run  # the uninterrupted run, a session fixture shared with that module


def _slurm(ntasks=2, procid=1, **extra):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
           "SLURM_LOCALID": str(procid), "SLURM_STEP_NODELIST": "node[007-008]", "SLURM_NODELIST": "node[007-008]"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def test_a_launchers_environment_starts_the_processes_it_names(no_launcher):
    for k, v in _slurm().items():
        no_launcher.setenv(k, v)
    p = distributed.plan({})
    assert (p.source, p.num_processes, p.process_id) == ("SLURM", 2, 1)
    assert p.kwargs == dict(coordinator_address=None, cluster_detection_method="slurm", initialization_timeout=300)
    # JAX itself reads the same environment: the job's first node, a port from the job id, this task's id
    from jax._src import clusters
    addr, n, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, "slurm", 10)
    assert (addr, n, pid) == (f"node007:{4242 % 4096 + 61440}", 2, 1)
    # the config / JAX_* environment wins: a coordinator of one's own, or one process whatever the launcher says
    assert distributed.plan({"coordinator_address": "h:1"}).kwargs["coordinator_address"] == "h:1"
    assert distributed.plan({"num_processes": 1}) is None
    no_launcher.setenv("JAX_NUM_PROCESSES", "1")
    assert distributed.settings({}) is None
    no_launcher.delenv("JAX_NUM_PROCESSES")
    no_launcher.setenv("SLURM_NTASKS", "1")  # one task: one process, nothing initialised
    assert distributed.plan({}) is None
    # a launcher's job of one process is one process, even with a coordinator or a process id set (outside any
    # launcher they are refused: tests/test_multihost.py)
    assert distributed.plan({"coordinator_address": "h:1", "process_id": 0}) is None
    assert distributed.plan({"coordinator_address": "h:1"}, {"OMPI_COMM_WORLD_SIZE": "1"}) is None
    # Open MPI (mpirun): JAX finds the coordinator from the launcher's URI; Open MPI 5 has none, so it is given
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    p = distributed.plan({}, {**ompi, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"})
    assert (p.source, p.num_processes, p.process_id, p.kwargs["cluster_detection_method"]) == ("Open MPI", 4, 3, "ompi")
    p = distributed.plan({"coordinator_address": "10.0.0.1:1234"}, ompi)
    assert p.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                            local_device_ids=[1], initialization_timeout=300)  # one accelerator per rank, as JAX's
    with pytest.raises(ConfigError, match=r"^distributed: JAX_NUM_PROCESSES \(config.distributed.num_processes\)="
                                          r"'two' is not an integer$"):
        distributed.plan({}, {"JAX_NUM_PROCESSES": "two"})


def test_a_cloud_tpu_pod_slice_on_gke_starts_the_processes_it_names(no_launcher):
    from jax._src.clusters import cloud_tpu_cluster

    no_launcher.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    no_launcher.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    no_launcher.setenv("TPU_WORKER_ID", "2")
    no_launcher.setenv("MEGASCALE_NUM_SLICES", "1")  # else read from the VM's metadata (JobSets set it)
    no_launcher.setenv("MEGASCALE_SLICE_ID", "0")
    p = distributed.plan({})
    assert (p.source, p.num_processes, p.process_id, p.kwargs["cluster_detection_method"]) == \
        ("Cloud TPU (GKE)", 4, 2, "gketpu")
    no_launcher.delenv("TPU_WORKER_ID")
    with pytest.raises(ConfigError, match="^Cloud TPU \\(GKE\\): TPU_WORKER_HOSTNAMES is set but TPU_WORKER_ID is "
                                          "not set"):
        distributed.plan({})


@pytest.mark.parametrize("env, message", [
    (_slurm(SLURM_STEP_NODELIST=None), "SLURM: SLURM_NTASKS=2 but SLURM_STEP_NODELIST is not set; start every "
                                       "task with `srun python train.py ...`, or set JAX_NUM_PROCESSES=1"),
    (_slurm(SLURM_PROCID=None, SLURM_LOCALID=None), "SLURM: SLURM_NTASKS=2 but SLURM_PROCID is not set"),
    (_slurm(procid=2), r"SLURM: SLURM_PROCID=2 is outside \[0, 2\)"),
    (_slurm(SLURM_NTASKS="two"), "SLURM: SLURM_NTASKS='two' is not an integer"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     "Open MPI: OMPI_COMM_WORLD_SIZE=2 but OMPI_MCA_orte_hnp_uri .* is not set; give the coordinator: "
     "JAX_COORDINATOR_ADDRESS="),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI: OMPI_COMM_WORLD_SIZE=2 but OMPI_COMM_WORLD_RANK is not set"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "1"},
     r"Kubernetes: an indexed Job \(JOB_COMPLETION_INDEX=1\) needs the kubernetes package"),
])
def test_an_incomplete_launcher_environment_is_one_line_naming_the_variable(env, message):
    if "KUBERNETES_SERVICE_HOST" in env and importlib.util.find_spec("kubernetes") is not None:
        pytest.skip("the kubernetes package is installed here")
    with pytest.raises(ConfigError, match=f"^{message}") as e:
        distributed.plan({}, env)
    assert "\n" not in str(e.value)


@pytest.mark.timeout(60)
def test_train_py_reports_an_incomplete_launcher_environment_in_one_line(tmp_path):
    cmd, env = _cmd(str(tmp_path / "w"))
    env = {k: v for k, v in env.items() if not k.startswith(LAUNCHER_VARS)}
    r = subprocess.run(cmd, cwd=ROOT, env={**env, **_slurm(SLURM_PROCID=None)}, capture_output=True, text=True,
                       timeout=50)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: SLURM: SLURM_NTASKS=2 but SLURM_PROCID is not set"), lines


def test_any_stages_global_batch_that_does_not_divide_over_the_devices_is_one_config_line(tmp_path):
    """The pipeline refuses the main stages' batches up front (tests/test_bad_inputs.py); the loop refuses any
    stage's (mutual learning, an init stage) in one line too: here 64 rows over 3 devices."""
    spec = loop.StageSpec(name="mutual", directory=str(tmp_path), num_epochs=1, batch_size=64, seed=0, meta={},
                          passes=[], evaluate=None, improve=None, export=None)
    data = types.SimpleNamespace(train_labels=np.zeros(192, np.int32))
    with pytest.raises(ConfigError, match=r"^mutual: batch_size=64: the global batch must be divisible by the 3 "
                                          r"devices of the mesh$"):
        loop.fit_group([spec], [], {"mutual": {}}, None, data, mesh_lib.make_mesh(jax.devices()[:3]), {"mutual": None})


def test_without_a_notice_or_a_watch_nothing_stops():
    assert jax.process_count() == 1
    assert not preemption.requested()  # not watching: SIGTERM keeps its action
    before = signal.getsignal(signal.SIGTERM)
    with preemption.watch():
        assert signal.getsignal(signal.SIGTERM) is preemption._on_sigterm
        assert not preemption.requested()
    assert signal.getsignal(signal.SIGTERM) is before  # restored


# --- processes --------------------------------------------------------------------------------------------------

def _slurm_port() -> int:
    """A free port that JAX's SlurmCluster derives from a job id (61440 + job id % 4096)."""
    for port in range(61440 + os.getpid() % 2048, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 61440-65535")


class _Run:
    """train.py on the smoke config in ``n`` processes (SLURM's environment when n > 1), each logging to a file;
    ``devices`` CPU devices in all (train.py's default: one per core)."""

    def __init__(self, workdir, logs, n, hold=None, devices=None):
        cmd, env = _cmd(workdir)
        cmd = cmd + ["--config.checkpoint.every_steps=1000"]  # only the preemption saves inside an epoch
        env = {k: v for k, v in env.items() if not k.startswith(LAUNCHER_VARS)}
        if hold:
            env[faults.HOLD_ENV] = hold
        if devices or n > 1:  # the reference's devices, split over the processes
            env["XLA_FLAGS"] = xla_flags((devices or cpu.num_cores()) // n)
        if n > 1:
            env.update(SLURM_JOB_ID=str(_slurm_port() - 61440), SLURM_NTASKS=str(n), SLURM_STEP_NODELIST="127.0.0.1",
                       SLURM_NODELIST="127.0.0.1")
        run = len({name.split("-")[0] for name in os.listdir(logs)})
        self.logs = [os.path.join(logs, f"{run}-{i}.log") for i in range(n)]
        self.procs = []
        for i, log in enumerate(self.logs):
            task = {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} if n > 1 else {}
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, **task}, stdout=f,
                                                   stderr=subprocess.STDOUT))

    def text(self, i):
        with open(self.logs[i]) as f:
            return f.read()

    def wait_for(self, line, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(line in self.text(i) for i in range(len(self.procs))):
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"no {line!r} in every process's output:\n" + "\n".join(self.text(i)[-3000:]
                                                                           for i in range(len(self.procs))))

    def finish(self, timeout=240):
        try:
            codes = [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.kill()
        return codes

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _assert_same_run(ref, work):
    """Every stage's latest and best checkpoints (step and arrays) and the summary: bitwise the reference's.  Read
    onto this process's devices (the workdir was written by 1 and by 2 processes)."""
    for stage in STAGES:
        a, b = (ckpt_lib.StageCheckpoints(os.path.join(w, stage, "checkpoints")) for w in (ref, work))
        try:
            for which in ("latest", "best"):
                assert getattr(a, which).latest_step() == getattr(b, which).latest_step(), (stage, which)
                expected = _plain(a, which)  # written by one process
                chex.assert_trees_all_equal(expected, getattr(b, f"restore_{which}")(expected)[0])
        finally:
            a.close()
            b.close()
    assert json.load(open(os.path.join(ref, "summary.json"))) == json.load(open(os.path.join(work, "summary.json")))


def _plain(ck, which):
    mngr = getattr(ck, which)
    return mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def _preempt(run, at, signalled):
    """Hold ``run`` at ``at``, SIGTERM the processes ``signalled``; every process exits 75 and says where it saved."""
    run.wait_for(f"hold: {at}")
    for i in signalled:
        run.procs[i].send_signal(signal.SIGTERM)
    codes = run.finish()
    outs = [run.text(i) for i in range(len(run.procs))]
    assert codes == [preemption.EXIT_CODE] * len(codes), "\n".join(o[-3000:] for o in outs)
    saved = {o.split("saved the latest checkpoint at step ")[1].split(";")[0] for o in outs}
    assert len(saved) == 1, outs  # the same step on every process
    return saved.pop(), outs


@pytest.mark.timeout(600)
def test_preempted_on_one_then_on_two_slurm_processes_resumes_bitwise(request, tmp_path):
    """One workdir preempted mid-epoch on 1 process, then on 2 processes that SLURM's variables alone started, resumed
    each time; every stage ends bitwise the uninterrupted run's.  The 2 processes: SIGTERM to one of them, the notice
    reaches the other through JAX's preemption sync (the harder case; SIGTERM to both takes the same path and was
    tried by hand: a 2-process launch more costs ~50 s of CI's time).  Every run has the same device count: the
    shared reference's (one per core) where that is even; else the largest even count up to the cores (2 on one
    core), forced (XLA_FLAGS), and a reference of its own with that count."""
    work, logs = str(tmp_path / "w"), str(tmp_path / "logs")
    os.makedirs(logs)
    devices = None  # train.py's default, one per core: the shared reference's
    if cpu.num_cores() % 2 == 0:
        reference = request.getfixturevalue("reference_run")
    else:  # two processes need an even count
        devices, reference = max(2, cpu.num_cores() - 1), str(tmp_path / "reference")
        run = _Run(reference, logs, 1, devices=devices)
        assert run.finish() == [0], run.text(0)[-3000:]
        assert f"mesh: {devices} x cpu" in run.text(0), run.text(0)[-3000:]

    saved, _ = _preempt(_Run(work, logs, 1, hold="teacher:4", devices=devices), "teacher step 4", [0])
    assert saved == "4 (epoch 2, batch 1 of 3)"  # held after step 4: saved there

    run = _Run(work, logs, 2, hold="teacher:5", devices=devices)
    run.wait_for("[teacher] resuming at epoch 2, pass 1, batch 1")
    for i in range(2):
        assert f"distributed (SLURM): process {i} of 2, coordinator 127.0.0.1:" in run.text(i)
    saved, outs = _preempt(run, "teacher step 5", [1])
    assert "SIGTERM caught" not in outs[0] and "released by a preemption notice" in outs[0], outs[0]
    assert saved == "5 (epoch 2, batch 2 of 3)", outs  # JAX's sync point: the first check after the notice

    run = _Run(work, logs, 1, devices=devices)
    assert run.finish() == [0], run.text(0)[-3000:]
    _assert_same_run(reference, work)


@pytest.mark.timeout(200)
def test_a_notice_during_start_up_is_kept_and_saves_at_the_first_step(tmp_path):
    """SIGTERM during train.py's start-up (held at its start-up point ``main``: the config loaded, only train.py's
    early handler in place, not the run's) is not a dead process: the early handler keeps the notice, the teacher
    saves at its first step and the run exits 75 (a requeueing script requeues)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    run = _Run(str(tmp_path / "w"), str(logs), 1, hold="start-up:main")
    run.wait_for("hold: start-up main\n")
    run.procs[0].send_signal(signal.SIGTERM)
    assert run.finish(timeout=180) == [preemption.EXIT_CODE], run.text(0)[-3000:]
    out = run.text(0)
    # the notice arrived at the start-up point, and was kept by the early handler (the hold ends on it alone)
    assert "hold: start-up main released by a preemption notice" in out, out[-3000:]
    assert "preempted: [teacher] saved the latest checkpoint at step 1 " in out, out[-3000:]
