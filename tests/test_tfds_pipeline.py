"""The real CIFAR path (tfds.data_source, no TensorFlow) driven through tfds.testing.mock_data."""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar100, default
from conftest import one_epoch_cifar100
from mgd_jax import pipeline
from mgd_jax.config_validation import validate_config
from mgd_jax.data import load_tfds


def test_load_tfds_reads_uint8_arrays():
    with tfds.testing.mock_data(num_examples=24):
        ds = load_tfds("cifar10")
    assert ds.train_images.shape == (24, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == 10
    assert ds.train_labels.max() < 10


def test_cifar100_config_runs_all_stages_on_mock_data(tmp_path):
    c = one_epoch_cifar100("resnet8,resnet8,kd,mag")
    with tfds.testing.mock_data(num_examples=64):
        summary = pipeline.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:2])
    assert [r["stage"] for r in summary["rows"]] == ["teacher", "analyzer 64d_T2", "analyzer 256d_T8",
                                                      "student kd_mag (kd / mag)"]


def test_cifar100_config_parses_pairs():
    c = cifar100.get_config("resnet32x4,resnet8x4,kd,all")
    assert (c.teacher.arch, c.student.arch) == ("resnet32x4", "resnet8x4")
    assert sorted(c.students) == ["kd_mag", "kd_mas", "kd_none"]
    assert c.students.kd_mas.weights.to_dict() == {"ce": 0.2, "logit_kd": 0.8, "method": 1.0, "granularity": 1.0}
    assert c.student.optimizer.milestones == (150, 180, 210) and c.student.optimizer.lr == 0.05
    assert c.teacher.optimizer.milestones == (60, 120, 180)
    assert c.analyzer.optimizer.lr == 0.01 and c.analyzer.optimizer.milestones == (30, 45)
    with pytest.raises(ValueError, match="teacher,student,method,mode"):
        cifar100.get_config("resnet56,resnet20")


@pytest.mark.parametrize("pair", default.SCRIPT_PAIRS)
def test_every_script_pair_has_a_config(pair):
    c = cifar100.get_config(f"{pair[0]},{pair[1]},kd,mas")
    validate_config(c)
    assert (c.teacher.arch, c.student.arch) == pair
    assert c.student.optimizer.lr == (0.01 if pair[1] in default.LOW_LR_STUDENTS else 0.05)
    assert c.teacher.optimizer.lr == 0.05
