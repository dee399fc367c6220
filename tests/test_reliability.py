"""Preemption and failure: SIGKILL at random moments, corrupted checkpoints, non-finite losses."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, once_per_test_run, xla_flags
from configs import smoke
from mgd_jax import pipeline
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import faults
from mgd_jax.train.metrics import NonFiniteLossError

STAGES = ["teacher", "analyzer", "students/mas_kd"]


def _latest(workdir, stage, which="latest"):
    ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
    mngr = getattr(ck, which)
    step = mngr.latest_step()
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ck.close()
    return step, out


def _cmd(workdir, cache=True, shared_cache=True):
    """train.py on the smoke config; ``shared_cache``: the suite's compilation cache (conftest), else its own in
    the workdir (a process killed at a random moment may be writing an entry)."""
    drop = (faults.ENV,) if shared_cache else (faults.ENV, "JAX_COMPILATION_CACHE_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["XLA_FLAGS"] = xla_flags()
    # the default mesh of train.py on this machine: one CPU device per core
    return [sys.executable, "train.py", "--config=configs/smoke.py", f"--config.compilation_cache={cache}",
            f"--workdir={workdir}"], env


def _committed(workdir) -> set:
    """Every checkpoint step of every stage that is complete (has its manifest)."""
    out = set()
    for root, _, files in os.walk(workdir):
        if ckpt_lib.MANIFEST in files:
            out.add(os.path.relpath(root, workdir))
    return out


def _assert_same_run(ref, work):
    for stage in STAGES:
        for which in ("latest", "best"):
            s_ref, a = _latest(ref, stage, which)
            s_got, b = _latest(work, stage, which)
            assert s_ref == s_got, (stage, which)
            chex.assert_trees_all_equal(a, b)
    assert json.load(open(os.path.join(ref, "summary.json"))) == json.load(open(os.path.join(work, "summary.json")))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, worker_id):
    """The smoke config trained once, uninterrupted, by train.py in its own process: once per test session,
    shared by the xdist workers (conftest.once_per_test_run)."""
    def train(folder):
        cmd, env = _cmd(str(folder))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    return str(once_per_test_run(tmp_path_factory, worker_id, "reference_run", train))


# One kill at each save boundary, in order, each in a fresh process resuming the previous one's workdir.
# Smoke config: 3 steps per epoch, a mid-epoch checkpoint every 2 steps, 2 epochs per stage.
KILL_CHAIN = [
    "teacher:after_mid",       # latest/2 written
    "teacher:before_best",     # epoch 1 trained again from step 2, killed before best/1
    "teacher:after_best",      # best/1 written, latest/3 not: the restart redoes epoch 1 and meets best/1 again
    "teacher:before_latest",   # best/1 exists (kept), killed before latest/3
    "teacher:after_latest",    # latest/3 written
    "analyzer:after_best",     # teacher finishes; the analyzer (two passes per epoch) killed after best/1
    "student/mas_kd:after_best",
]
NO_NEW_CHECKPOINT = ("teacher:before_best", "teacher:before_latest")  # these windows hold only redone work


@pytest.mark.xdist_group("reference_run")  # one worker trains the shared reference
def test_kill_at_each_save_boundary_then_resume_is_bitwise_exact(reference_run, tmp_path):
    work = str(tmp_path / "killed")
    cmd, env = _cmd(work)
    for point in KILL_CHAIN:
        before = _committed(work)
        r = subprocess.run(cmd, cwd=ROOT, env={**env, faults.ENV: point}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == -signal.SIGKILL, f"{point}: the process was not killed there\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        if point not in NO_NEW_CHECKPOINT:
            assert _committed(work) - before, f"{point}: no new checkpoint before the kill"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(reference_run, work)


@pytest.mark.xdist_group("reference_run")  # one worker trains the shared reference
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(reference_run, tmp_path):
    """Kills land only after the restarted process wrote a new checkpoint (never all in start-up), at a random
    moment after it; every kill is preceded by progress."""
    work = str(tmp_path / "killed")
    cmd, env = _cmd(work, shared_cache=False)
    rng = np.random.default_rng(0)
    progress = []
    for _ in range(2):
        before = _committed(work)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while p.poll() is None and not (_committed(work) - before) and time.time() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the run finished before it could be killed"
        time.sleep(float(rng.uniform(0.0, 0.4)))  # somewhere in the work after that checkpoint
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        progress.append(len(_committed(work) - before))
    assert all(n > 0 for n in progress), progress  # each restart got further than the one before
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    _assert_same_run(reference_run, work)


@pytest.mark.xdist_group("reference_run")  # one worker trains the shared reference
def test_a_real_full_disk_is_one_line_and_the_rerun_resumes_exactly(reference_run, tmp_path):
    """train.py on a 3 MB tmpfs runs out of space mid-run (the student's first checkpoints here): one line on
    stderr, exit status 2; after the file system grows, the same command finishes with the uninterrupted
    run's parameters."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()}); the full-disk path is also "
                    f"tested by injection in tests/test_trust.py")
    try:
        work = str(disk / "w")
        cmd, env = _cmd(work)  # the suite's compilation cache, outside the small disk (a cache in the workdir would
        # fill it first)
        assert os.environ.get("JAX_COMPILATION_CACHE_DIR") and not os.environ["JAX_COMPILATION_CACHE_DIR"].startswith(
            str(disk))
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        assert r.returncode == 2, r.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith(f"error: no space left on the device of {work}"), r.stderr
        assert "rerun the same command: it resumes" in lines[0]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        _assert_same_run(reference_run, work)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_corrupted_checkpoint_falls_back_with_a_warning(tmp_path, smoke_workdir):
    c = smoke.get_config()
    work = str(tmp_path / "w")
    shutil.copytree(smoke_workdir[0], work)  # the smoke config trained on 1 device (conftest)
    step, final = _latest(work, "students/mas_kd")
    for root, _, files in os.walk(work):  # our checkpoints hold no pickles (orbax arrays + JSON)
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                head = fh.read(2)
            assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), os.path.join(root, f)
    latest_dir = os.path.join(work, "students/mas_kd/checkpoints/latest")
    # alter one byte of the newest step's largest file
    victim = max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(latest_dir, str(step))) for f in fs
                  if not f.startswith(ckpt_lib.MANIFEST)), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(ckpt_lib.CorruptCheckpointWarning, match=f"latest/{step} is corrupted"):
        pipeline.train_and_evaluate(c, work, devices=jax.devices()[:1])  # falls back, redoes the rest
    assert any(n.startswith(f"corrupt-{step}-") for n in os.listdir(latest_dir))
    step2, again = _latest(work, "students/mas_kd")
    assert step2 == step
    chex.assert_trees_all_equal(final, again)  # redone from the previous good step: the same result


def test_half_written_checkpoint_is_removed(tmp_path):
    d = tmp_path / "latest"
    (d / "7.orbax-checkpoint-tmp-123").mkdir(parents=True)
    (d / "8").mkdir()
    (d / "8" / "state").write_text("partial")
    assert ckpt_lib.sanitize(str(d)) == []
    assert sorted(os.listdir(d)) == []


def test_non_finite_loss_stops_naming_term_and_step(tmp_path):
    c = smoke.get_config()
    c.teacher.optimizer.lr = 1e30
    c.checkpoint.every_steps = 1
    work = str(tmp_path / "w")
    # lr 1e30: the first non-finite value is a loss term or, when the loss is still finite, the gradient norm
    with pytest.raises(NonFiniteLossError, match=r"teacher: (loss term 'loss(/ce)?'|gradient norm 'grad_norm') "
                                                 r"became (nan|inf) at step (\d+)") as e:
        pipeline.train_and_evaluate(c, work)
    bad_step = int(str(e.value).split(" at step ")[1].split(" ")[0])
    step, _ = _latest(work, "teacher")
    assert step == bad_step - 1  # the last good step is the latest checkpoint
