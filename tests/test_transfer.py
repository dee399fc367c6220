"""Transfer (linear probe / fine-tuning) of a distilled student to STL-10 and CIFAR-10 through tfds mock data."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar100
from mgd_jax import pipeline
from mgd_jax import transfer as T


@pytest.fixture(scope="module")
def cifar_workdir(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("cifar"))
    c = cifar100.get_config("resnet8,vgg8,kd,mas")  # a VGG student: the reference's probe trains nothing there
    c.progress = False
    c.teacher.epochs = c.analyzer.epochs = c.student.epochs = 1
    for s in (c.teacher, c.analyzer, c.student):
        s.batch_size = 32
        s.optimizer.milestones = ()
    with tfds.testing.mock_data(num_examples=64):
        pipeline.train_and_evaluate(c, work, devices=jax.devices()[:1])
    return work


@pytest.mark.parametrize("dataset,full", [("stl10", False), ("cifar10", True)])
def test_transfer(cifar_workdir, dataset, full):
    with tfds.testing.mock_data(num_examples=64):
        out = T.transfer(cifar_workdir, "students/kd_mas", dataset, epochs=2, full_finetune=full,
                         devices=jax.devices()[:1])
    assert out["epochs"] == 2 and 0 <= out["best_top1"] <= 1 and out["best_epoch"] in (1, 2)
    d = os.path.join(cifar_workdir, "transfer", f"students_kd_mas_{dataset}" + ("_full" if full else ""))
    assert json.load(open(os.path.join(d, "result.json")))["dataset"] == dataset
    rows = [json.loads(r) for r in open(os.path.join(d, "metrics.jsonl"))]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss/ce"]) for r in rows)
    assert rows[0]["train/grad_norm"] > 0  # something is trained (the head at least)


def test_transfer_protocol_and_errors(cifar_workdir):
    c = T.transfer_config("stl10", "MobileNetV2")
    assert c.optimizer.lr == 0.01 and c.optimizer.milestones == (20, 25) and c.epochs == 50
    assert T.transfer_config("stl10", "resnet20").optimizer.lr == 0.02
    assert T.main([f"--workdir={cifar_workdir}", "--stage=analyzer", "--dataset=stl10"]) == 2


def test_transfer_from_the_digits_quickstart(smoke_workdir):
    """A grey-image (digits) student transfers to STL-10 through luma images."""
    work, _ = smoke_workdir
    with tfds.testing.mock_data(num_examples=32):
        out = T.transfer(work, "students/mas_kd", "stl10", epochs=1, devices=jax.devices()[:1])
    assert 0 <= out["best_top1"] <= 1


def test_transfer_never_returns_a_result_made_with_other_options(cifar_workdir):
    """A finished transfer run is reused only for the same options: --no_adapt_bn, --epochs or the seed (or a
    retrained source) are refused with the field's name, instead of returning the old result labelled with the
    new options."""
    from mgd_jax.train.checkpoint import StageMismatchError

    with tfds.testing.mock_data(num_examples=32):
        first = T.transfer(cifar_workdir, "students/kd_mas", "cifar10", epochs=1, devices=jax.devices()[:1])
        again = T.transfer(cifar_workdir, "students/kd_mas", "cifar10", epochs=1, devices=jax.devices()[:1])
        assert again == first  # the same options: the finished result
        for kwargs, field in [({"adapt_bn": False}, "transfer.adapt_bn"), ({"seed": 1}, "transfer.seed"),
                              ({"epochs": 2}, "transfer.epochs")]:
            with pytest.raises(StageMismatchError, match=f"was written for {field}="):
                T.transfer(cifar_workdir, "students/kd_mas", "cifar10", **{"epochs": 1, **kwargs},
                           devices=jax.devices()[:1])
        assert T.main([f"--workdir={cifar_workdir}", "--stage=students/kd_mas", "--dataset=cifar10", "--epochs=1",
                       "--no_adapt_bn"]) == 2
