"""configs/imagenet.py end to end on a small image folder: teacher, analyzer and a MAS+CRD student (ResNet-18s at
16x16; CRD's sampler and memory read the rows' indices), streamed from the files; interrupted in the middle of the
student's epoch, the resumed run is bitwise the uninterrupted one."""
import json
import os
import shutil

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
    c.progress = False
    c.compilation_cache = False
    c.eval_batch_size = 12
    c.granularities = ((16, 2.0), (32, 8.0))
    c.checkpoint.every_steps = 2
    for stage, epochs in ((c.teacher, 1), (c.analyzer, 1), (c.student, 1)):
        stage.epochs, stage.batch_size = epochs, 8
        stage.optimizer.lr, stage.optimizer.milestones = 0.01, ()
    return c


def _restore(workdir, stage, which):
    ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
    mngr = getattr(ck, which)
    step = mngr.latest_step()
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ck.close()
    return step, out


def test_imagenet_config_trains_all_stages_from_a_folder_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    folder = _write_folder(str(tmp_path / "images"), np.random.default_rng(0), per_class=8, val_per_class=4)
    config = _config(folder)  # 28 training images: 3 steps of 8 per epoch (the rest dropped), 12 test images
    devices = jax.devices()[:1]
    ref = str(tmp_path / "ref")
    summary = pipeline.train_and_evaluate(config, ref, devices=devices)
    assert [r["stage"].split()[0] for r in summary["rows"]] == ["teacher", "analyzer", "analyzer", "student"]
    assert all(0 <= r["best_acc1"] <= 1 for r in summary["rows"])
    with open(os.path.join(ref, "teacher", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and all(np.isfinite(r["train/loss"]) for r in rows)

    # the same run interrupted in the middle of the student's epoch (after its mid-epoch checkpoint at step 2; its
    # teacher and analyzer finished: the reference's), then resumed
    work = str(tmp_path / "work")
    for stage in ("teacher", "analyzer"):
        shutil.copytree(os.path.join(ref, stage), os.path.join(work, stage))
    real_point = faults.point

    def point(stage, name):
        real_point(stage, name)
        if (stage, name) == ("student/crd_mas", "after_mid"):
            raise _Interrupted(f"{stage}:{name}")

    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(_Interrupted):
        pipeline.train_and_evaluate(config, work, devices=devices)
    monkeypatch.setattr(faults, "point", real_point)
    resumed = pipeline.train_and_evaluate(config, work, devices=devices)
    assert "resuming at epoch 1, pass 1, batch 2" in capsys.readouterr().out
    for stage in STAGES:
        for which in ("latest", "best"):
            s_ref, a = _restore(ref, stage, which)
            s_got, b = _restore(work, stage, which)
            assert s_ref == s_got, (stage, which)
            chex.assert_trees_all_equal(a, b)
    assert resumed["rows"] == summary["rows"]
