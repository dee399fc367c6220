"""configs/imagenet.py end to end on a small image folder: teacher, analyzer and a MAS+CRD student (CRD's sampler and
memory read the rows' indices), streamed from the files; interrupted in the middle of each stage's epoch and resumed,
the run is bitwise the uninterrupted one.  One epoch of three steps each: what is checked is that every stage runs on
the streamed data and updates its parameters, not that it learns (its accuracy stays at chance; the methods' learning
is tested on the in-memory datasets).  The data path is the ImageNet config's (streamed folder, RandomResizedCrop,
resize + centre crop); the models are CIFAR resnet8s at 16 x 16 to keep the test short, as in
tests/test_imagenet_multihost.py (the ImageNet models' steps: traced in every mode, and a ResNet-18 teacher's and
a MobileNet student's run, in tests/test_imagenet_methods.py)."""
import json
import os

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import imagenet
from mgd_jax import pipeline
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import faults
from tests.test_imagenet_data import _write_folder

STAGES = ("teacher", "analyzer", "students/crd_mas")


class _Interrupted(Exception):
    pass


def _config(folder):
    c = imagenet.get_config("resnet18,resnet18,crd,mas")
    c.students.crd_mas.method_options.update(nce_k=8, feat_dim=16)
    c.data.dir = folder
    c.data.image_size = 16
    c.data.workers = 2
    c.precision = "float32"
    c.teacher.arch = c.student.arch = "resnet8"
    c.progress = False
    c.compilation_cache = False
    c.eval_batch_size = 12
    c.granularities = ((16, 2.0), (32, 8.0))
    c.checkpoint.every_steps = 2
    for stage, epochs in ((c.teacher, 1), (c.analyzer, 1), (c.student, 1)):
        stage.epochs, stage.batch_size = epochs, 8
        stage.optimizer.lr, stage.optimizer.milestones = 0.01, ()
    return c


def _restore(workdir, stage, which, step=None):
    ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
    mngr = getattr(ck, which)
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ck.close()
    return step, out


def _latest_steps(workdir, stage):
    ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
    try:
        return ck.latest_steps()
    finally:
        ck.close()


def test_imagenet_config_runs_every_stage_from_a_folder_and_each_resumes_exactly(tmp_path, monkeypatch, capsys):
    folder = _write_folder(str(tmp_path / "images"), np.random.default_rng(0), per_class=8, val_per_class=4)
    config = _config(folder)  # 28 training images: 3 steps of 8 per epoch (the rest dropped), 12 test images
    devices = jax.devices()[:1]
    ref = str(tmp_path / "ref")
    summary = pipeline.train_and_evaluate(config, ref, devices=devices)
    assert [r["stage"].split()[0] for r in summary["rows"]] == ["teacher", "analyzer", "analyzer", "student"]
    assert all(0 <= r["best_acc1"] <= 1 for r in summary["rows"])
    # every stage trained: one epoch each, finite losses and gradients, and its last steps moved every parameter
    # array (the two newest latest checkpoints: steps 2 and 3; the analyzer's 4 and 6, in its second granularity's
    # pass)
    for stage, steps, trained in (("teacher", [2, 3], ("params",)), ("analyzer", [4, 6], ("32d_T8", "params")),
                                  ("students/crd_mas", [2, 3], ("params",))):
        with open(os.path.join(ref, stage, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        losses = [v for k, v in rows[0].items() if k.startswith("train/loss")]
        norms = [v for k, v in rows[0].items() if k.startswith("train/grad_norm")]
        assert len(rows) == 1 and losses and np.all(np.isfinite(losses)), (stage, rows)
        assert norms and np.all(np.isfinite(norms)) and min(norms) > 0, (stage, rows)  # gradients, not weight decay
        assert _latest_steps(ref, stage) == steps, stage
        before, after = (_restore(ref, stage, "latest", step)[1] for step in steps)
        for key in trained:
            before, after = before[key], after[key]
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
        assert moved and all(moved), (stage, np.mean(moved))  # every parameter array
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(after)), stage

    # the same run interrupted in the middle of each stage's epoch, right after a mid-epoch checkpoint (every 2
    # steps): the teacher's at step 2, the analyzer's at step 4 (its second pass, the second granularity's), the
    # student's at step 2; each rerun resumes the stage it stopped in, finishes it and goes on to the next stop
    work = str(tmp_path / "work")
    real_point, stop = faults.point, []

    def point(stage, name):
        real_point(stage, name)
        if name == "after_mid" and stop and stage == stop[0][0]:
            stop[0][1] -= 1
            if stop[0][1] == 0:
                raise _Interrupted(f"{stage}:{name}")

    monkeypatch.setattr(faults, "point", point)
    capsys.readouterr()
    resumes = []
    for stage, nth in (("teacher", 1), ("analyzer", 2), ("student/crd_mas", 1), (None, 0)):
        stop[:] = [[stage, nth]] if stage else []
        if stage:
            with pytest.raises(_Interrupted, match=f"^{stage}:after_mid$"):
                pipeline.train_and_evaluate(config, work, devices=devices)
        else:
            resumed = pipeline.train_and_evaluate(config, work, devices=devices)
        resumes.append([ln for ln in capsys.readouterr().out.splitlines() if " resuming " in ln])
    assert resumes == [[], ["[teacher] resuming at epoch 1, pass 1, batch 2"],
                       ["[analyzer] resuming at epoch 1, pass 2, batch 1"],
                       ["[student/crd_mas] resuming at epoch 1, pass 1, batch 2"]], resumes
    for stage in STAGES:
        for which in ("latest", "best"):
            s_ref, a = _restore(ref, stage, which)
            s_got, b = _restore(work, stage, which)
            assert s_ref == s_got, (stage, which)
            chex.assert_trees_all_equal(a, b)
    assert resumed["rows"] == summary["rows"]
