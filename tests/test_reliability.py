"""Preemption and failure: SIGKILL at random moments, corrupted checkpoints, non-finite losses."""
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT
from configs import smoke
from mgd_jax import pipeline
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train.metrics import NonFiniteLossError

STAGES = ["teacher", "analyzer", "students/mas_kd"]


def _latest(workdir, stage):
    ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
    step = ck.latest.latest_step()
    out = ck.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ck.close()
    return step, out


def _cmd(workdir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # no compilation cache: restarts must take as long as the first run for the random kill times to land
    return [sys.executable, "train.py", "--config=configs/smoke.py", "--config.compilation_cache=False",
            f"--workdir={workdir}"], env


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    ref = str(tmp_path / "ref")
    cmd, env = _cmd(ref)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    full = time.time() - t0
    work = str(tmp_path / "killed")
    cmd, env = _cmd(work)
    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(4):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(0.2, 0.5)) * full)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    for stage in STAGES:
        s_ref, a = _latest(ref, stage)
        s_got, b = _latest(work, stage)
        assert s_ref == s_got
        chex.assert_trees_all_equal(a, b)


def test_corrupted_checkpoint_falls_back_with_a_warning(tmp_path):
    c = smoke.get_config()
    work = str(tmp_path / "w")
    pipeline.train_and_evaluate(c, work)
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
        pipeline.train_and_evaluate(c, work)  # falls back to the previous step, redoes the rest
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
    with pytest.raises(NonFiniteLossError, match=r"teacher: loss term 'loss(/ce)?' became (nan|inf) at step (\d+)") as e:
        pipeline.train_and_evaluate(c, work)
    bad_step = int(str(e.value).split(" at step ")[1].split(" ")[0])
    step, _ = _latest(work, "teacher")
    assert step == bad_step - 1  # the last good step is the latest checkpoint
