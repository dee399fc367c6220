"""Bad input stops `train.py` before training with one line naming the problem (exit code 2, no traceback)."""
import os
import re
import subprocess
import sys

import jax
import pytest

from conftest import ROOT, xla_flags
from configs import quickstart
from mgd_jax import pipeline
from mgd_jax.config_validation import ConfigError, validate_config


def _train(*args, workdir):
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    r = subprocess.run([sys.executable, "train.py", f"--workdir={workdir}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("args,expected", [
    (["--config.teacher.arch=resnet9"], "config.teacher.arch='resnet9': unknown architecture"),
    (["--config=configs/cifar100.py:resnet56,resnet20,fitnet3,mas"],
     "--config=configs/cifar100.py: unknown method 'fitnet3'"),
])
def test_train_py_one_line_errors(args, expected, tmp_path):
    """The process itself: one line on stderr, exit status 2 (every other mistake: tests/test_cli_mistakes.py,
    in-process)."""
    code, out, err = _train(*args, workdir=tmp_path / "w")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_missing_cifar_message_says_how_to_build(tmp_path):
    code, _, err = _train("--config=configs/cifar100.py:resnet56,resnet20,kd,mas",
                          f"--config.data.data_dir={tmp_path}", workdir=tmp_path / "w")
    assert code == 2
    assert "tfds build cifar100 --manual_dir=DIR --file_format=array_record" in err
    assert not (tmp_path / "w").exists()  # created before the data was read, removed with the refusal


def test_workdir_of_another_teacher_architecture(smoke_workdir):
    workdir, _ = smoke_workdir
    code, _, err = _train("--config=configs/smoke.py", "--config.teacher.arch=resnet14", workdir=workdir)
    assert code == 2, err
    assert "teacher/checkpoints/latest was written for arch='resnet8' but the config asks for arch='resnet14'" in err


@pytest.mark.parametrize("field,value,match", [
    ("teacher.arch", "resnet9", "unknown architecture"),
    ("student.arch", "vgg7", "unknown architecture"),
    ("students.kd.method", "fitnet2", "unknown method"),
    ("students.kd.granularity", "mgs", "unknown granularity mode"),
    ("students.kd.temperature", -1.0, "temperature must be > 0"),
    ("students.kd.weights.ce", -0.5, "weights must be >= 0"),
    ("students.kd.method_options", {"nce_k": 5}, "method 'kd' has no option 'nce_k'"),
    ("granularities", ((64, 2.0), (0, 8.0)), "encoding dim must be a positive integer"),
    ("granularities", ((64, 0.0),), "temperature must be > 0"),
    ("granularities", ((64, 2.0), (64, 2.0)), "distinct"),
    ("teacher.optimizer.lr", 0.0, "learning rate must be > 0"),
    ("analyzer.optimizer.lr", -0.01, "learning rate must be > 0"),
    ("teacher.optimizer.momentum", 1.5, "momentum must be in"),
    ("student.optimizer.weight_decay", -1e-4, "weight decay must be >= 0"),
    ("analyzer.optimizer.gamma", 0.0, "gamma must be in"),
    ("student.epochs", -3, "must be an integer >= 1"),
    ("eval_batch_size", 0, "must be >= 1"),
    ("augment.std", (0.0,), "positive value per channel"),
    ("student.optimizer.milestones", (150, 180, 300), "beyond the last epoch"),
    ("student.optimizer.milestones", (180, 150), "increasing"),
    ("analyzer.epochs", 0, "must be an integer >= 1"),
    ("teacher.batch_size", 0, "must be an integer >= 1"),
    ("data.name", "imagenet21k", "unknown dataset"),
    ("augment.pad", -1, "must be >= 0"),
    ("precision", "fp8", "unknown precision"),
    ("cpu_devices", -2, "must be None"),
    ("student.optimizer.milestones", (6, 12), "e.g. --config.student.optimizer.milestones='(6,)'"),
    ("teacher.optimizer.milestones", (20,), "--config.teacher.optimizer.milestones='()' (a constant learning rate)"),
    ("augment.mean", ("a",), "one number per image channel"),
    ("data.train_limit", 0, "must be None (all examples) or an integer >= 1"),
    ("data.test_limit", -5, "must be None (all examples) or an integer >= 1"),
    ("data.image_size", 12, "use a multiple of 8"),
    ("data.test_size", 5, "must be an integer in [10, 1787]"),
    ("checkpoint.every_steps", -1, "must be an integer >= 0"),
    ("checkpoint.keep", 0, "must be an integer >= 1"),
])
def test_validate_config_table(field, value, match):
    c = quickstart.get_config()
    node = c
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        validate_config(c)
    assert f"config.{field}" in str(e.value) and "\n" not in str(e.value)


def test_global_batch_not_divisible_by_devices_and_unwritable_workdir(tmp_path, monkeypatch):
    from configs import smoke

    c = smoke.get_config()
    c.student.batch_size = 66
    with pytest.raises(ConfigError, match=r"config.student.batch_size=66: the global batch must be divisible by the "
                                          r"4 devices"):
        pipeline.train_and_evaluate(c, str(tmp_path / "w"), devices=jax.devices()[:4])
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a file instead
        (tmp_path / "afile").write_text("x")
        ro = tmp_path / "afile"
    with pytest.raises(ConfigError, match="--workdir=.*not writable"):
        pipeline.train_and_evaluate(smoke.get_config(), str(ro / "w"), devices=jax.devices()[:1])
