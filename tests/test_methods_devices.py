"""Every baseline method trains with the accelerator defaults, on CPU: the default multi-device mesh (one device
per core here), the training set resident on the devices (``data.on_device``, the GPU/TPU default: the loop
feeds row indices) and bfloat16 compute, through the real stage runner (``pipeline.run_student``: init stage,
CRD sampler, loop, checkpoints)."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import default, smoke
from mgd_jax import pipeline
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.data.sources import ArrayDataset
from mgd_jax.train import mesh as mesh_lib

# The methods whose data path differs through the loop: CRD (sampler indices beside the device-resident rows)
# and an init-stage method (a second StageSpec and state hand-off).  Every method's step runs with these
# defaults in tests/test_methods_train.py (mode mas).
METHODS = ["crd", "abound"]
N_TRAIN, SIZE, CLASSES = 64, 8, 10


@pytest.fixture(scope="module")
def setup():
    """2 devices (the default mesh on a 2-core machine), a random resnet8 teacher and its tubes."""
    if jax.device_count() < 2:
        pytest.fail("needs >= 2 devices (conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    rng = np.random.default_rng(0)
    ds = ArrayDataset("random", rng.integers(0, 256, (N_TRAIN, SIZE, SIZE, 1), dtype=np.uint8),
                      rng.integers(0, CLASSES, N_TRAIN).astype(np.int32),
                      rng.integers(0, 256, (16, SIZE, SIZE, 1), dtype=np.uint8),
                      rng.integers(0, CLASSES, 16).astype(np.int32), CLASSES)
    c = smoke.get_config()
    c.precision = "bfloat16"
    c.data.on_device = True
    c.student.epochs = 1
    c.student.batch_size = N_TRAIN  # one step: 32 images per device (the KDSVD deadlock needed no more)
    c.student.optimizer.milestones = ()
    c.eval_batch_size = 16
    t_model = pipeline._model(c, c.teacher.arch, CLASSES)
    x = np.zeros((2, SIZE, SIZE, 1), np.float32)
    t_vars = jax.device_get(t_model.init(jax.random.key(0), x))
    an = GranularityAnalyzer(parse_granularities(c.granularities), CLASSES)
    d = t_model.apply(t_vars, x)[1][-1].shape[-1]
    tubes = jax.device_get(an.init(jax.random.key(1), np.zeros((1, d), np.float32))["params"])
    return c, ds, mesh, t_model, mesh_lib.replicate(t_vars, mesh), an, mesh_lib.replicate(tubes, mesh)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_with_accelerator_defaults_on_the_multi_device_mesh(setup, method, tmp_path):
    c, ds, mesh, t_model, t_vars, an, tubes = setup
    scfg = default.student_run(method, "mas", student_arch=c.student.arch)
    if method == "crd":
        scfg.method_options = ml_collections.ConfigDict({**scfg.method_options.to_dict(), "nce_k": 16,
                                                         "feat_dim": 16})
    if "init" in scfg:
        scfg.init.epochs = 1
    c = c.copy_and_resolve_references()
    c.students = ml_collections.ConfigDict({method: scfg})
    assert pipeline._data_on_device(c) and mesh.devices.size == 2
    export, result = pipeline.run_student(c, method, scfg, str(tmp_path), ds, mesh, t_model, t_vars, an, tubes)
    rows = [json.loads(r) for r in open(os.path.join(tmp_path, "students", method, "metrics.jsonl"))]
    assert len(rows) == 1
    losses = {k: v for k, v in rows[0].items() if k.startswith("train/loss")}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    assert np.isfinite(rows[0]["train/grad_norm"]) and rows[0]["train/grad_norm"] > 0
    assert ("train/loss/method" in losses) == (method not in ("kd", "abound", "fsp")), losses
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(export))
    assert 0 <= result["best"]["test/acc1"] <= 1
