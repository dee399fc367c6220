"""Fused students (issue #13): the students of a run share one teacher pass per batch; each ends as if it ran
alone (float32 noise at most), and a kill between two members' saves resumes bitwise exactly."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import smoke
from mgd_jax import pipeline
from mgd_jax.stages import student as student_stage
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG = "resnet8,resnet8,kd,all"  # three students: kd with none / mag / mas


def _students(workdir, names, which="latest"):
    out = {}
    for name in names:
        ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, "students", name, "checkpoints"))
        try:
            mngr = getattr(ck, which)
            out[name] = mngr.restore(mngr.latest_step(),
                                     args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        finally:
            ck.close()
    return out


def _crd_config(group_size):
    c = smoke.get_config(ARG)
    crd = smoke.get_config("resnet8,resnet8,crd,mas").students.crd_mas
    crd.method_options.nce_k, crd.method_options.feat_dim = 16, 16
    ab = smoke.get_config("resnet8,resnet8,abound,mag").students.abound_mag
    ab.init.epochs = 1
    c.students.crd_mas, c.students.abound_mag = crd, ab
    c.student.group_size = group_size
    return c


def test_fused_students_equal_their_separate_runs(smoke_workdir, tmp_path, monkeypatch):
    """One group of five (kd none / mag / mas, CRD with its own indices, AB with the teacher's pre-activation
    features and an init stage) against the same students one after another, from the same teacher.  The fused
    run builds one group step of the five and trains with it; the separate run builds none."""
    import shutil

    src, _ = smoke_workdir
    real_group_step, groups = student_stage.make_group_train_step, []

    def group_step(members, *args):  # -> [members, times traced]: jit traces a step the first time it runs
        fused, seen = real_group_step(members, *args), [sorted(members), 0]
        groups.append(seen)

        def step(*a):
            seen[1] += 1
            return fused(*a)
        return step

    monkeypatch.setattr(student_stage, "make_group_train_step", group_step)
    runs = {}
    for size in (0, 1):
        work = str(tmp_path / f"size{size}")
        for stage in ("teacher", "analyzer"):
            shutil.copytree(os.path.join(src, stage), os.path.join(work, stage))
        c = _crd_config(size)
        groups.clear()
        summary = pipeline.train_and_evaluate(c, work, devices=jax.devices()[:2])
        runs[size] = (work, summary, list(c.students))
        if size == 0:  # one group step of the five, and it ran
            assert [g for g, _ in groups] == [sorted(f"student/{n}" for n in c.students)] and len(c.students) == 5
            assert groups[0][1] >= 1, groups
        else:  # group_size=1: each student alone, no group step
            assert groups == [], groups
    (fused, s_fused, names), (alone, s_alone, _) = runs[0], runs[1]
    a, b = _students(fused, names), _students(alone, names)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)  # float32 noise at most (bitwise on most runs here)
    assert [r["stage"] for r in s_fused["rows"]] == [r["stage"] for r in s_alone["rows"]]
    for name in names:  # each member's own metrics file, one row per epoch
        rows = [json.loads(line) for line in open(os.path.join(fused, "students", name, "metrics.jsonl"))]
        assert [r["epoch"] for r in rows] == [1, 2]


def _train(workdir, kill=None):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", faults.ENV)}
    if kill:
        env[faults.ENV] = kill
    return subprocess.run([sys.executable, "train.py", f"--config=configs/smoke.py:{ARG}", f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(600)
def test_a_kill_between_members_saves_resumes_the_group_exactly(tmp_path):
    """Killed after the first member saved a mid-epoch step and before the next one did: the restart resumes all
    three from the step they all have, and ends bitwise equal to an uninterrupted fused run."""
    ref, work = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert _train(ref).returncode == 0
    import shutil

    for stage in ("teacher", "analyzer"):  # the kills are in the students' stage: theirs are the reference's
        shutil.copytree(os.path.join(ref, stage), os.path.join(work, stage))
    names = sorted(smoke.get_config(ARG).students)
    second = f"student/{names[1]}"
    for kill in (f"{second}:before_mid:2", f"{second}:before_latest"):  # the 2nd mid save; then the last epoch end
        r = _train(work, kill)
        assert r.returncode == -9, (kill, r.stderr[-2000:])
    r = _train(work)
    assert r.returncode == 0, r.stderr[-3000:]
    for which in ("latest", "best"):
        chex.assert_trees_all_equal(_students(ref, names, which), _students(work, names, which))
    assert json.load(open(os.path.join(ref, "summary.json"))) == json.load(open(os.path.join(work, "summary.json")))
    np.testing.assert_equal(len(open(os.path.join(work, "students", names[0], "metrics.jsonl")).readlines()), 2)


def test_lockstep_groups_never_send_a_student_with_checkpoints_back_to_the_start(tmp_path):
    """Who trains with whom after a restart: the newest step all share; a finished stage alone; a stage whose
    checkpoints share no step with the others keeps its own point (never the start)."""
    from mgd_jax.train.loop import StageSpec, lockstep_groups

    def spec(name, steps, finished=False):
        d = str(tmp_path / name)
        ck = ckpt_lib.StageCheckpoints(os.path.join(d, "checkpoints"), keep=3)
        try:
            for s in steps:
                done = finished and s == steps[-1]
                ck.save_latest(s, {"w": np.zeros(2)}, {"epoch": 2 if done else 1, "best": {},
                                                       **({} if done else {"position": {"pass": 0, "batch": s}})})
        finally:
            ck.close()
        return StageSpec(name=name, directory=d, num_epochs=2, batch_size=8, seed=0, meta={}, passes=[],
                         evaluate=None, improve=None, export=None)

    a, b, c, d = spec("a", [2, 4]), spec("b", [2]), spec("c", []), spec("d", [2, 6], finished=True)
    e, f = spec("e", [4]), spec("f", [2])  # keep=1 and a kill between their saves: nothing in common but 0
    got = [([s.name for s in group], step) for group, step in lockstep_groups([a, b, c, d])]
    assert got == [(["d"], None), (["c"], 0), (["a", "b"], 2)]
    got = [([s.name for s in group], step) for group, step in lockstep_groups([e, f])]
    assert got == [(["e"], 4), (["f"], 2)]
