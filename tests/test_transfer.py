"""Transfer (linear probe / fine-tuning) of a distilled student to STL-10 and CIFAR-10 through tfds mock data;
its recipe from configs/transfer.py."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import transfer as transfer_config
from conftest import ROOT, once_per_test_run, one_epoch_cifar100
from mgd_jax import pipeline
from mgd_jax import transfer as T
from mgd_jax.analysis.common import override
from mgd_jax.errors import ConfigError
from mgd_jax.models import LOW_LR_ARCHITECTURES

CONFIG = str(ROOT / "configs" / "transfer.py")


@pytest.fixture(scope="session")
def cifar_workdir(tmp_path_factory, worker_id):
    """A one-epoch CIFAR-100 run on tfds mock data, trained once per test run (conftest.once_per_test_run, shared by
    the xdist workers); each worker reads its own copy (the tests write their transfer results into it)."""
    def train(folder):
        c = one_epoch_cifar100("resnet8,vgg8,kd,mas")  # a VGG student: the reference's probe trains nothing there
        with tfds.testing.mock_data(num_examples=64):
            pipeline.train_and_evaluate(c, str(folder), devices=jax.devices()[:1])

    shared = once_per_test_run(tmp_path_factory, worker_id, "transfer_cifar", train)
    work = tmp_path_factory.mktemp("cifar") / "w"
    shutil.copytree(shared, work, ignore=shutil.ignore_patterns(".jax_cache"))
    return str(work)


def config(dataset="stl10", **fields):
    c = transfer_config.get_config(dataset)
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.mark.parametrize("dataset,full", [("stl10", False), ("cifar10", True)])
def test_transfer(cifar_workdir, dataset, full):
    with tfds.testing.mock_data(num_examples=64):
        out = T.transfer(cifar_workdir, "students/kd_mas", config(dataset, epochs=2, full_finetune=full),
                         devices=jax.devices()[:1])
    assert out["epochs"] == 2 and 0 <= out["best_top1"] <= 1 and out["best_epoch"] in (1, 2)
    d = os.path.join(cifar_workdir, "transfer", f"students_kd_mas_{dataset}" + ("_full" if full else ""))
    assert json.load(open(os.path.join(d, "result.json")))["dataset"] == dataset
    rows = [json.loads(r) for r in open(os.path.join(d, "metrics.jsonl"))]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss/ce"]) for r in rows)
    assert rows[0]["train/grad_norm"] > 0  # something is trained (the head at least)


def test_transfer_recipe_comes_from_the_config():
    """The reference's protocol is configs/transfer.py's defaults; the low-lr rule is the models' list."""
    c = config("stl10")
    assert (c.optimizer.lr, c.low_lr, c.optimizer.milestones, c.epochs, c.batch_size) == (0.02, 0.01, (20, 25), 50, 64)
    for arch in LOW_LR_ARCHITECTURES:
        assert T.recipe(c, arch).optimizer.lr == 0.01
    assert T.recipe(c, "resnet20").optimizer.lr == 0.02
    assert T.recipe(config(epochs=22), "resnet20").optimizer.milestones == (20,)  # milestones past the end dropped
    c.optimizer.lr, c.low_lr = 0.1, 0.03
    assert T.recipe(c, "resnet20").optimizer.lr == 0.1 and T.recipe(c, "ShuffleV2").optimizer.lr == 0.03
    assert c.optimizer.lr == 0.1 and c.optimizer.milestones == (20, 25)  # the given config is not changed
    assert config("cifar10").augment.mean != c.augment.mean
    with pytest.raises(ValueError, match="unknown transfer dataset"):
        transfer_config.get_config("svhn")


def test_config_overrides_are_typed_like_train_py():
    c = config()
    for field, text, value in [("epochs", "7", 7), ("optimizer.lr", "0.05", 0.05), ("optimizer.milestones", "(3,4)",
                               (3, 4)), ("adapt_bn", "false", False), ("data.data_dir", "/data/tfds", "/data/tfds")]:
        override(c, field, text)
        assert c[field.split(".")[0]] == value if "." not in field else eval(f"c.{field}") == value
    for field, text, why in [("epoch", "7", "the config has no field 'epoch'"),
                             ("optimizer.nesterov", "True", "the config has no field"),
                             ("epochs", "x", "'x' is not a int"), ("epochs", "0.5", "cannot be casted")]:
        with pytest.raises(ConfigError, match=why):
            override(c, field, text)


def test_transfer_command_line_errors(cifar_workdir, capsys):
    """Every refusal is one line and exit status 2."""
    base = [f"--workdir={cifar_workdir}", "--stage=students/kd_mas", f"--config={CONFIG}"]
    for argv, why in [([f"--workdir={cifar_workdir}", "--stage=analyzer", f"--config={CONFIG}"], "has no backbone"),
                      (base + ["--dataset=svhn"], "unknown transfer dataset 'svhn'"),
                      ([*base[:2], f"--config={CONFIG}:stl10", "--dataset=cifar10"], "contradicts"),
                      (base + ["--config.optimizer.lrr=0.1"], "the config has no field 'optimizer.lrr'"),
                      (base + ["--config.epochs=ten"], "--config.epochs=ten: 'ten' is not a int"),
                      (base + ["--config.data.name=svhn"], "config.data.name='svhn': unknown dataset"),
                      (base + ["--config.epochs=0"], "config.epochs=0: must be an integer >= 1"),
                      (base + ["--config.optimizer.momentum=1.5"], "config.optimizer.momentum=1.5: momentum"),
                      ([*base[:2], "--config=configs/none.py"], "config file configs/none.py does not exist")]:
        capsys.readouterr()
        assert T.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, (argv, err)


def test_transfer_from_the_digits_quickstart(smoke_workdir):
    """A grey-image (digits) student transfers to STL-10 through luma images."""
    work, _ = smoke_workdir
    with tfds.testing.mock_data(num_examples=32):
        out = T.transfer(work, "students/mas_kd", config("stl10", epochs=1), devices=jax.devices()[:1])
    assert 0 <= out["best_top1"] <= 1


def test_transfer_never_returns_a_result_made_with_other_options(cifar_workdir, capsys):
    """A finished transfer run is reused only for the same options: --no_adapt_bn, --epochs or the seed (or a
    retrained source) are refused with the field's name, instead of returning the old result labelled with the
    new options."""
    from mgd_jax.train.checkpoint import StageCheckpoints, StageMismatchError

    with tfds.testing.mock_data(num_examples=32):
        first = T.transfer(cifar_workdir, "students/kd_mas", config("cifar10", epochs=1), devices=jax.devices()[:1])
        again = T.transfer(cifar_workdir, "students/kd_mas", config("cifar10", epochs=1), devices=jax.devices()[:1])
        assert again == first  # the same options: the finished result
        for fields, field in [({"adapt_bn": False}, "transfer.adapt_bn"), ({"seed": 1}, "transfer.seed"),
                              ({"epochs": 2}, "transfer.epochs")]:
            with pytest.raises(StageMismatchError, match=f"was written for {field}="):
                T.transfer(cifar_workdir, "students/kd_mas", config("cifar10", **{"epochs": 1, **fields}),
                           devices=jax.devices()[:1])
        # the command line: the same options (the flags, or the config's fields) give the finished result
        capsys.readouterr()
        base = [f"--workdir={cifar_workdir}", "--stage=students/kd_mas", f"--config={CONFIG}"]
        for argv in (base + ["--dataset=cifar10", "--epochs=1"], [*base[:2], f"--config={CONFIG}:cifar10",
                                                                 "--config.epochs=1"]):
            assert T.main(argv) == 0
            out = capsys.readouterr().out  # the loop's line saying it uses the finished stage, then the result
            assert json.loads(out[out.index("{"):]) == first
        assert T.main(base + ["--dataset=cifar10", "--epochs=1", "--no_adapt_bn"]) == 2
        assert T.main(base + ["--dataset=cifar10", "--config.epochs=1", "--config.low_lr=0.5"]) == 0  # not vgg8's lr
    # the stored identity: the fields transfer checkpoints have always stored (older ones stay resumable)
    ck = StageCheckpoints(os.path.join(cifar_workdir, "transfer", "students_kd_mas_cifar10", "checkpoints"))
    stored = {k for k in ck.best_meta()["config"] if k.startswith("transfer.")}
    ck.close()
    assert stored == {"transfer.adapt_bn", "transfer.full_finetune", "transfer.seed", "transfer.epochs",
                      "transfer.batch_size", "transfer.data.name", "transfer.data.image_size",
                      *(f"transfer.augment.{k}" for k in ("pad", "flip", "mean", "std")),
                      *(f"transfer.optimizer.{k}" for k in ("lr", "momentum", "weight_decay", "milestones", "gamma"))}
