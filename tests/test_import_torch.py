"""PyTorch checkpoints of the authors' code -> our models: outputs match the stored reference outputs."""
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from mgd_jax.analyzer import Tube
from mgd_jax.import_torch import CheckpointImportError, convert_backbone, convert_tube, load_torch_file, main
from mgd_jax.models import get_model

from _requires import need

try:
    import torch
except ImportError:
    torch = None


@pytest.fixture(autouse=True)
def _needs_torch():
    """torch (tests/_requires.py): a skip where it is not installed, a failure of each test where MGD_JAX_REQUIRE
    names it (CI's Python 3.11 venv, which has the CPU torch: the import path is tested on the authors' files)."""
    need("torch")
TORCH = FIXTURES / "torch"
SHAPES = json.loads((TORCH / "torch_state_dict_shapes.json").read_text())


def _nhwc(a):
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


@pytest.mark.parametrize("arch", ["resnet8", "resnet14x05", "wrn_16_1"])
def test_imported_model_matches_reference_outputs(arch):
    ref = np.load(TORCH / f"{arch}_expected.npz")
    v = convert_backbone(arch, load_torch_file(str(TORCH / f"{arch}_backbone.pth"))["model"], 100)
    model = get_model(arch, 100)
    x = jnp.asarray(_nhwc(ref["input_nchw"]))
    logits, feats = model.apply(v, x)
    _, pre = model.apply(v, x, preact=True)
    # README's "within 1e-5": |ours - torch| <= 1e-5 + 1e-5 |torch| elementwise.  Measured (float32, CPU): max
    # |diff| 7.6e-6 on features of magnitude <= 10 (wrn_16_1's last block), <= 7.2e-7 on logits, <= 3.3e-7 on
    # tube outputs, at most 4.8e-6 beyond the rtol part.  Running variances off by 5e-6 (a BatchNorm eps of
    # 1.5e-5 for 1e-5) fail it on all three architectures; the former 1e-4 / 1e-4 let that pass.
    tol = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, ref["logits"], **tol)
    for i in range(len(feats)):
        np.testing.assert_allclose(feats[i], _nhwc(ref[f"feat{i}_nchw"]), **tol)
        np.testing.assert_allclose(pre[i], _nhwc(ref[f"preact_feat{i}_nchw"]), **tol)
    for dim in (64, 256):
        p = convert_tube(load_torch_file(str(TORCH / f"{arch}_tube{dim}.pth")), dim, feats[-1].shape[-1], 100)
        enc, dec = Tube(dim, 100).apply({"params": p}, feats[-1])
        np.testing.assert_allclose(enc, ref[f"enc{dim}"], **tol)
        np.testing.assert_allclose(dec, ref[f"dec{dim}"], **tol)


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_every_listed_key_fills_every_parameter_once(arch):
    # distinct values per key, so a key landing in the wrong place would be seen
    sd, value_of = {}, {}
    for i, (k, s) in enumerate(SHAPES[arch].items()):
        sd[k] = torch.full(s, float(i))
        value_of[k] = float(i)
    v = convert_backbone(arch, sd, 100)
    n_torch = sum(int(np.prod(s)) for k, s in SHAPES[arch].items() if not k.endswith("num_batches_tracked"))
    assert sum(x.size for x in jax.tree.leaves(v)) == n_torch
    from mgd_jax.import_torch import map_keys
    for k, target in map_keys(sd):
        leaf = v[target[0]]
        for p in target[1:]:
            leaf = leaf[p]
        assert np.all(leaf == value_of[k]), k


def test_wrong_architecture_is_refused_naming_the_key():
    sd = load_torch_file(str(TORCH / "resnet8_backbone.pth"))["model"]
    with pytest.raises(CheckpointImportError, match=r"key 'conv1.weight' has shape \(3, 3, 3, 16\).*needs "
                                                    r"\(3, 3, 3, 32\)"):
        convert_backbone("resnet8x4", sd, 100)
    with pytest.raises(CheckpointImportError, match=r"key 'fc.weight' has shape \(64, 100\).*\(64, 10\)"):
        convert_backbone("resnet8", sd, 10)
    with pytest.raises(CheckpointImportError, match="nothing in the checkpoint for [a-z_]+/layer1_1/"):
        convert_backbone("resnet14", sd, 100)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointImportError, match="refused, it is not a weights-only PyTorch checkpoint"):
        load_torch_file(str(path))
    assert not (tmp_path / "pwned").exists()


def test_cli_imports_into_workdir_and_student_stage_uses_it(tmp_path):
    workdir = str(tmp_path / "w")
    code = main(["--arch=resnet8", f"--teacher={TORCH / 'resnet8_backbone.pth'}",
                 f"--tube64={TORCH / 'resnet8_tube64.pth'}", f"--tube256={TORCH / 'resnet8_tube256.pth'}",
                 f"--workdir={workdir}"])
    assert code == 0
    from configs import cifar100
    from mgd_jax import pipeline
    import tensorflow_datasets as tfds

    c = cifar100.get_config("resnet8,resnet8,kd,mas")
    c.progress = False
    c.student.epochs = 1
    c.student.batch_size = 16
    c.student.optimizer.milestones = ()
    with tfds.testing.mock_data(num_examples=32):
        summary = pipeline.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
    assert not os.path.exists(os.path.join(workdir, "teacher", "metrics.jsonl"))  # not retrained
    assert not os.path.exists(os.path.join(workdir, "analyzer", "metrics.jsonl"))
    assert summary["rows"][-1]["stage"] == "student kd_mas (kd / mas)"
    assert main(["--arch=resnet20", f"--teacher={TORCH / 'resnet8_backbone.pth'}",
                 f"--workdir={tmp_path / 'w2'}"]) == 2


def test_teacher_of_another_class_count_is_refused(tmp_path):
    from configs import smoke
    from mgd_jax import pipeline
    from mgd_jax.train.checkpoint import StageMismatchError

    workdir = str(tmp_path / "w")
    assert main(["--arch=resnet8", f"--teacher={TORCH / 'resnet8_backbone.pth'}", f"--workdir={workdir}"]) == 0
    with pytest.raises(StageMismatchError, match="written for num_classes=100 but the config asks for "
                                                 "num_classes=10"):
        pipeline.train_and_evaluate(smoke.get_config(), workdir, devices=jax.devices()[:1])  # digits: 10 classes
