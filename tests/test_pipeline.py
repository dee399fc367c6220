"""End to end: the three stages on the bundled digits (tiny settings), exact resume, no redone stages."""
import json
import os
import shutil

import chex
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default, smoke
from mgd_jax import pipeline
from mgd_jax.train import checkpoint as ckpt_lib


def tiny_config():
    c = smoke.get_config()
    c.checkpoint.every_steps = 0
    return c


def _final(workdir, c):
    """The product of every stage, read back from the workdir's checkpoints."""
    out = {}
    for stage in ["teacher", "analyzer"] + [f"students/{n}" for n in c.students]:
        ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
        step = ck.latest.latest_step()
        out[stage] = ck.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        ck.close()
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    c = tiny_config()
    summary = pipeline.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
    return workdir, c, summary


def test_three_stages_write_results(full_run):
    workdir, c, summary = full_run
    stages = [r["stage"] for r in summary["rows"]]
    assert stages == ["teacher", "analyzer 16d_T2", "analyzer 32d_T8", "student mas_kd (kd / mas)"]
    for r in summary["rows"]:
        assert 0.0 <= r["best_acc1"] <= 1.0 and r["best_acc1"] >= r["last_acc1"] - 1e-9
    md = open(os.path.join(workdir, "summary.md")).read()
    assert "| student mas_kd (kd / mas) | resnet8 |" in md
    rows = [json.loads(line) for line in open(os.path.join(workdir, "students/mas_kd/metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train/loss/ce", "train/loss/stable_excitation", "train/loss/granularity/16d_T2",
                "train/loss/granularity/32d_T8", "train/grad_norm", "test/acc1", "test/acc5"):
        assert all(np.isfinite(r[key]) for r in rows), key
    arows = [json.loads(line) for line in open(os.path.join(workdir, "analyzer/metrics.jsonl"))]
    assert {"test/acc1/16d_T2", "test/acc1/32d_T8", "train/loss/16d_T2", "train/loss/32d_T8"} <= set(arows[0])
    assert os.listdir(os.path.join(workdir, "teacher/tensorboard"))


def test_crd_and_init_stage_methods_through_the_pipeline_with_accelerator_defaults(tmp_path):
    c = tiny_config()
    c.teacher.epochs = 1
    c.analyzer.epochs = 1
    c.teacher.optimizer.milestones = c.analyzer.optimizer.milestones = ()
    crd = default.student_run("crd", "mag")
    crd.method_options.nce_k = 16
    crd.method_options.feat_dim = 16
    ab = default.student_run("abound", "mas", student_arch="resnet8")
    ab.init.epochs = 1
    c.students = ml_collections.ConfigDict({"crd_mag": crd, "abound_mas": ab})
    # the GPU / TPU defaults, on CPU: 2 devices (the default mesh on 2 cores), the training set resident on the
    # devices (the loop feeds row indices; CRD's sampler indices ride along), bfloat16 compute, donated state
    c.data.on_device = True
    c.precision = "bfloat16"
    workdir = str(tmp_path)
    summary = pipeline.train_and_evaluate(c, workdir, devices=jax.devices()[:2])
    assert [r["stage"] for r in summary["rows"]][-2:] == ["student abound_mas (abound / mas)",
                                                          "student crd_mag (crd / mag)"]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "students/crd_mag/metrics.jsonl"))]
    assert all(np.isfinite(r["train/loss/method"]) for r in rows)
    init_rows = [json.loads(line) for line in open(os.path.join(workdir, "students/abound_mas/init/metrics.jsonl"))]
    assert len(init_rows) == 1 and np.isfinite(init_rows[0]["train/loss/init"])
    final = _final(workdir, c)
    assert final["students/crd_mag"]["method_state"]["memory_v1"].shape == (192, 16)
    # once the main stage has a checkpoint, the init stage is not needed (nor read) again: the rerun gives the same
    # summary without it
    shutil.rmtree(os.path.join(workdir, "students/abound_mas/init"))
    again = pipeline.train_and_evaluate(c, workdir, devices=jax.devices()[:2])
    assert again["rows"] == summary["rows"]
    assert not os.path.exists(os.path.join(workdir, "students/abound_mas/init"))


def test_a_rerun_initialises_no_stage_that_it_resumes_or_reuses(smoke_workdir, tmp_path, monkeypatch, capsys):
    """The smoke run with its student's newest checkpoint removed (the student resumes mid-epoch 2), run again: the
    finished teacher and analyzer and the resumed student are not initialised (``loop.Fresh``: a resumed stage is
    restored onto its shapes), and the student ends bitwise as the uninterrupted run."""
    from mgd_jax.stages import analyzer as analyzer_stage
    from mgd_jax.stages import student as student_stage
    from mgd_jax.stages import teacher as teacher_stage

    src, _ = smoke_workdir
    work = str(tmp_path / "w")
    shutil.copytree(src, work)
    latest = os.path.join(work, "students", "mas_kd", "checkpoints", "latest")
    steps = sorted(int(n) for n in os.listdir(latest) if n.isdigit())
    shutil.rmtree(os.path.join(latest, str(steps[-1])))

    def traced_only(init):  # run for its shapes (jax.eval_shape: tracers), never for values
        def wrapped(*args, **kwargs):
            out = init(*args, **kwargs)
            assert all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out)), \
                f"{init.__module__}.{init.__name__}: a stage that resumes or is finished was initialised"
            return out
        return wrapped

    for module, name in ((teacher_stage, "init_state"), (analyzer_stage, "init_states"),
                         (student_stage, "init_state")):
        monkeypatch.setattr(module, name, traced_only(getattr(module, name)))
    c = smoke.get_config()
    pipeline.train_and_evaluate(c, work, devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert "[teacher] finished earlier (2 epochs)" in out and "[analyzer] finished earlier (2 epochs)" in out, out
    assert f"[student/mas_kd] resuming at epoch 2, pass 1, batch {steps[-2] - 3}" in out, (steps, out)
    want, got = _final(src, c), _final(work, c)
    chex.assert_trees_all_equal(want, got)
