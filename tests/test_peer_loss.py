"""A lost peer in a multi-process run (train/supervisor.py): the survivors stop in one line with exit status 75.

The supervisor's parts with stand-in workers (seconds); then two train.py processes started by SLURM's variables,
one killed (SIGKILL) mid-epoch and, in the restarted run, the other killed inside its checkpoint write: each time
the survivor stops within the heartbeat timeout in one line, nothing half-written is restored, and the restart of
both ends bitwise the uninterrupted run."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import LAUNCHER_VARS, ROOT, xla_flags
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import cpu, faults, preemption, supervisor
from test_pods import _assert_same_run, _slurm_port
import test_reliability
from test_reliability import _cmd, _committed

reference_run = test_reliability.reference_run  # the uninterrupted run, a session fixture shared with that module

# What the runtime (jaxlib 0.10) printed on the survivors, from runs like the slow test's below.
WORKER_LOST = """\
E1206 23:34:36.397474    7469 coordination_service.cc:1549] [2569266595240623339] Use error polling to propagate \
the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) \
to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1206 23:34:36.401152    7480 client.h:80] Terminating process because the JAX distributed service detected fatal \
errors. This most likely indicates that another task died; see the other task logs for more details.
*** Check failure stack trace: ***
"""
BARRIER_LOST = ("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout. This "
                "indicates that the remote task has failed, got preempted, or crashed unexpectedly.\n")
COORDINATOR_LOST = """\
W1206 23:34:52.713806    8739 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from \
coordination service: UNAVAILABLE: Socket closed
F1206 23:34:52.713902    8739 client.h:80] Terminating process because the JAX distributed service detected fatal \
errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was \
preempted/died/restarted unexpectedly or this task is experiencing network issues.
"""
GLOO_ERROR = """\
Traceback (most recent call last):
  File "train.py", line 13, in <module>
ValueError: UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error \
[127.0.0.1]:3970: Connection reset by peer
"""


def test_the_runtimes_report_names_the_lost_process():
    assert supervisor.lost_processes(WORKER_LOST) == {1}
    assert supervisor.lost_processes(BARRIER_LOST) == {3}
    assert supervisor.lost_processes(COORDINATOR_LOST) == {0}  # the coordination service's host
    assert supervisor.lost_processes("F0101 client.h:80] Terminating process because the JAX distributed service "
                                     "detected fatal errors.") == set()  # a peer, unnamed
    # a process's own failure, even a collective's error, is not a lost peer until the runtime says so
    assert supervisor.lost_processes(GLOO_ERROR) is None
    assert supervisor.lost_processes("error: config.seed: ...\n") is None


def test_the_survivors_line_names_the_lost_process_the_stage_and_the_latest_checkpoint():
    line = supervisor.message({1}, {"process": 0, "processes": 2, "stages": {"teacher": 3}}, 60)
    assert line == ("peer lost: process 0 of 2: process 1 stopped (failed, was killed or ran out of memory, or its "
                    "host went down: see its own output); [teacher] latest checkpoint at step 3; run the same "
                    "command on every process to resume from there")
    line = supervisor.message({0}, {"process": 2, "processes": 4, "stages": {"student/a": None, "student/b": 8}}, 60)
    assert "process 0 (the coordinator) stopped" in line
    assert "; [student/a] no checkpoint yet; [student/b] latest checkpoint at step 8; " in line
    assert "heard nothing from this process for 60 s" in supervisor.message({2}, {"process": 2, "processes": 4}, 60)
    assert "\n" not in line


def test_a_worker_notes_its_stages_and_the_stages_an_error_closed(tmp_path, monkeypatch):
    import json

    path = tmp_path / "status.json"
    monkeypatch.setenv(supervisor.ENV, str(path))
    monkeypatch.setattr(supervisor, "_status", {})

    def report():
        return supervisor.message({1}, json.loads(path.read_text()), 60).split("; ")[1]

    supervisor.note_stage("teacher", None)  # a stage's store opened, nothing committed
    assert report() == "[teacher] no checkpoint yet"
    supervisor.note_stage("teacher", 2)  # a save committed
    assert report() == "[teacher] latest checkpoint at step 2"
    supervisor.note_stage("teacher", None, open_=False)  # an error on its way up closes the stage: still named
    assert report() == "[teacher] latest checkpoint at step 2"
    supervisor.note_stage("student/a", 4)  # the next stage opens: only it
    supervisor.note_stage("student/b", 4)
    supervisor.note_stage("student/b", 6)
    assert report() == "[student/a] latest checkpoint at step 4"
    assert supervisor.message({1}, json.loads(path.read_text()), 60).split("; ")[2] == \
        "[student/b] latest checkpoint at step 6"
    supervisor.note_stage(None, 3)  # a store without a stage name (a tool reading a workdir): not noted
    assert "None" not in path.read_text()


# --- the supervisor with stand-in workers ----------------------------------------------------------------------

def _supervise(worker: str, *, heartbeat=5, pending=False, margin=None, **popen):
    """``supervisor.run`` in a process of its own, supervising ``python -c worker``."""
    code = textwrap.dedent(f"""
        import sys
        from mgd_jax.train import supervisor
        {'' if margin is None else f'supervisor.HOLD_MARGIN = {margin}'}
        sys.exit(supervisor.run({{"heartbeat_timeout_seconds": {heartbeat}}}, {[15] if pending else []},
                                command=[sys.executable, "-c", {worker!r}]))
    """)
    env = {k: v for k, v in os.environ.items() if k != supervisor.ENV}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


_STATUS = ("import json, os, signal, sys, time\n"
           "json.dump({'process': 0, 'processes': 2, 'stages': {'teacher': 3}}, "
           "open(os.environ['MGD_JAX_WORKER_STATUS'], 'w'))\n")


@pytest.mark.timeout(60)
def test_a_lost_peer_is_one_line_and_75_while_own_failures_keep_their_output_and_status():
    # the runtime's abort after a lost peer: the lines before it pass, its dump is replaced by the one line
    p = _supervise(_STATUS + f"print('a warning of the run', file=sys.stderr, flush=True)\n"
                             f"sys.stderr.write({GLOO_ERROR + WORKER_LOST!r}); sys.stderr.flush(); os.abort()")
    out, err = p.communicate(timeout=50)
    assert p.returncode == preemption.EXIT_CODE, err
    assert err.splitlines() == ["a warning of the run", supervisor.message({1}, {
        "process": 0, "processes": 2, "stages": {"teacher": 3}}, 5)]
    # a user error: its line and status 2
    p = _supervise("import sys; print('error: the config has no field x', file=sys.stderr); sys.exit(2)")
    assert p.communicate(timeout=50)[1] == "error: the config has no field x\n" and p.returncode == 2
    # a crash of its own: the traceback (held while it could be the runtime's end) and status 1
    p = _supervise("raise ValueError('a bug')")
    err = p.communicate(timeout=50)[1]
    assert p.returncode == 1 and err.startswith("Traceback (most recent call last):") and "ValueError: a bug" in err
    # killed (say by the kernel, out of memory): the supervisor ends by the same signal
    p = _supervise("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    p.communicate(timeout=50)
    assert p.returncode == -signal.SIGKILL
    # the runtime's error lines from a worker that lives on are passed on after the heartbeat timeout and a margin
    p = _supervise("import sys, time; sys.stderr.write('E0101 00:00:00.000 1 x.cc:1] transient\\n'); "
                   "sys.stderr.flush(); time.sleep(3); print('done', file=sys.stderr)", heartbeat=1, margin=0)
    assert p.communicate(timeout=50)[1] == "E0101 00:00:00.000 1 x.cc:1] transient\ndone\n" and p.returncode == 0


_WAIT_FOR_SIGTERM = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # as train.py, once its handler is in place
print('blocked' if blocked else 'not blocked', os.getpid(), flush=True)
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.01)
sys.exit(75 if got else 3)
"""


@pytest.mark.timeout(60)
def test_sigterm_reaches_the_worker_and_a_killed_supervisor_takes_its_worker_along():
    p = _supervise(_WAIT_FOR_SIGTERM)
    first = p.stdout.readline()
    assert first.startswith("blocked "), first  # until the worker's handler is in place: no notice is lost
    p.send_signal(signal.SIGTERM)  # to the supervisor, as Kubernetes signals a container's first process
    p.communicate(timeout=50)
    assert p.returncode == preemption.EXIT_CODE
    # a notice that the supervisor kept from its own start-up is handed on
    p = _supervise(_WAIT_FOR_SIGTERM, pending=True)
    assert p.communicate(timeout=50)[0].startswith("blocked ") and p.returncode == preemption.EXIT_CODE
    # SIGKILL to the supervisor (kill -9, its host's end as far as the others can tell): the worker goes too
    p = _supervise(_WAIT_FOR_SIGTERM)
    worker = int(p.stdout.readline().split()[1])
    p.kill()
    p.wait(timeout=10)
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended (its parent is gone)
    except FileNotFoundError:
        return False


def test_a_bad_heartbeat_timeout_is_one_config_line():
    from mgd_jax.errors import ConfigError

    assert supervisor.heartbeat_timeout({}) == supervisor.DEFAULT_HEARTBEAT_TIMEOUT
    assert supervisor.heartbeat_timeout({"heartbeat_timeout_seconds": 10}) == 10
    for bad in (0, -5, 2.5, "ten"):
        with pytest.raises(ConfigError, match=r"^config.distributed.heartbeat_timeout_seconds=.*: must be a whole "
                                              r"number of seconds, at least 1"):
            supervisor.heartbeat_timeout({"heartbeat_timeout_seconds": bad})


# --- two train.py processes ------------------------------------------------------------------------------------

HEARTBEAT = 10  # seconds; the default is 60


class _Pair:
    """train.py on the smoke config in 2 processes started by SLURM's variables, stdout and stderr logged apart;
    ``env``: extra variables per process."""

    def __init__(self, workdir, logs, env=({}, {}), devices=None):
        cmd, base = _cmd(workdir)
        cmd = cmd + [f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT}"]
        base = {k: v for k, v in base.items() if not k.startswith(LAUNCHER_VARS)}
        base.update(XLA_FLAGS=xla_flags((devices or cpu.num_cores()) // 2),  # the reference's
                    SLURM_JOB_ID=str(_slurm_port() - 61440), SLURM_NTASKS="2", SLURM_STEP_NODELIST="127.0.0.1",
                    SLURM_NODELIST="127.0.0.1")
        run = len({name.split("-")[0] for name in os.listdir(logs)})
        self.logs = [os.path.join(logs, f"{run}-{i}") for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**base, **env[i], "SLURM_PROCID": str(i),
                                                                       "SLURM_LOCALID": str(i)},
                                                   stdout=out, stderr=err))

    def out(self, i):
        with open(f"{self.logs[i]}.out") as f:
            return f.read()

    def err(self, i):
        with open(f"{self.logs[i]}.err") as f:
            return f.read()

    def show(self):
        return "\n".join(f"--- process {i}:\n{self.out(i)[-2000:]}\n{self.err(i)[-3000:]}" for i in range(2))

    def wait_for(self, text, timeout=400):
        deadline = time.time() + timeout
        while time.time() < deadline and not all(text in self.out(i) for i in range(2)):
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        else:
            if time.time() < deadline:
                return
        self.kill()
        pytest.fail(f"no {text!r} in every process's output:\n{self.show()}")

    def finish(self, timeout=600):
        """-> each process's exit status and the time it ended."""
        ended = [None, None]
        deadline = time.time() + timeout
        try:
            while None in ended and time.time() < deadline:
                for i, p in enumerate(self.procs):
                    if ended[i] is None and p.poll() is not None:
                        ended[i] = time.time()
                time.sleep(0.02)
        finally:
            self.kill()
        return [p.returncode for p in self.procs], ended

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _latest_dir(work):
    return os.path.join(work, "teacher", "checkpoints", "latest")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_peer_killed_mid_epoch_or_mid_save_stops_the_other_in_one_line_and_both_resume_bitwise(request,
                                                                                                 tmp_path):
    """Smoke config: 3 steps per epoch, the latest checkpoint every 2 steps and at each epoch's end.  The two
    processes split the shared reference's devices (one per core) where their count is even; else one more device,
    forced (XLA_FLAGS), and a reference of its own with that count."""
    devices = None
    if cpu.num_cores() % 2 == 0:
        reference_run = request.getfixturevalue("reference_run")
    else:
        devices, reference_run = cpu.num_cores() + 1, str(tmp_path / "reference")
        cmd, env = _cmd(reference_run)
        env["XLA_FLAGS"] = xla_flags(devices)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and f"mesh: {devices} x cpu" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    work, logs = str(tmp_path / "w"), str(tmp_path / "logs")
    os.makedirs(logs)

    # 1. Both held after teacher step 4 (epoch 2, batch 1 of 3; before that step's checkpoint); process 1 is killed
    # (SIGKILL to the process that SLURM started: its worker goes with it).  Process 0 stops within the heartbeat
    # timeout with one line: the latest checkpoint is step 3, the end of epoch 1.
    run = _Pair(work, logs, env=[{faults.HOLD_ENV: "teacher:4"}] * 2, devices=devices)
    run.wait_for("hold: teacher step 4")
    committed = _committed(work)
    run.procs[1].kill()
    killed = time.time()
    codes, ended = run.finish(timeout=HEARTBEAT + 120)
    assert codes == [preemption.EXIT_CODE, -signal.SIGKILL], run.show()
    assert ended[0] - killed < HEARTBEAT + 15, (ended[0] - killed, run.show())
    assert run.err(0).splitlines() == [
        "peer lost: process 0 of 2: process 1 stopped (failed, was killed or ran out of memory, or its host went "
        "down: see its own output); [teacher] latest checkpoint at step 3; run the same command on every process to "
        "resume from there"], run.show()
    assert _committed(work) == committed and "teacher/checkpoints/latest/3" in committed

    # 2. Restarted: both resume after epoch 1; process 0 (the coordinator, which commits orbax's writes) is killed
    # inside its write of step 4.  Process 1 stops in one line; step 4 stays half-written.
    run = _Pair(work, logs, env=[{faults.ENV: "teacher:mid_write"}, {}], devices=devices)
    codes, ended = run.finish()
    assert codes == [-signal.SIGKILL, preemption.EXIT_CODE], run.show()
    assert ended[1] - ended[0] < HEARTBEAT + 15, (ended[1] - ended[0], run.show())
    for i in range(2):
        assert "[teacher] resuming after epoch 1/2" in run.out(i), run.show()
    assert run.err(1).splitlines() == [
        "peer lost: process 1 of 2: process 0 (the coordinator) stopped (failed, was killed or ran out of memory, or "
        "its host went down: see its own output); [teacher] latest checkpoint at step 3; run the same command on "
        "every process to resume from there"], run.show()
    assert _committed(work) == committed
    half = [n for n in os.listdir(_latest_dir(work)) if n.startswith("4") and ckpt_lib.TMP_MARK in n]
    assert half, os.listdir(_latest_dir(work))  # the write was under way

    # 3. Restarted again: the half-written step is removed, not restored (the run resumes after epoch 1 once more);
    # every stage's checkpoints and the summary are bitwise the uninterrupted run's.
    run = _Pair(work, logs, devices=devices)
    codes, _ = run.finish()
    assert codes == [0, 0], run.show()
    assert "[teacher] resuming after epoch 1/2" in run.out(0) and run.err(0) == run.err(1) == "", run.show()
    _assert_same_run(reference_run, work)
