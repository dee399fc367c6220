"""The GPU check's pieces (benchmarks/gpu_check.sh), cheaply on CPU: the synthetic in-memory dataset that its
end-to-end part trains on, the device-plane summary of the profiler, the HLO counts of the per-depth teacher
table, the results file -> README table script; and (slow) the whole script's dry run, each part's rows."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from ml_collections import ConfigDict

from mgd_jax.config_validation import validate_config
from mgd_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_cifar_has_cifar100_shapes_is_deterministic_and_limits_are_prefixes():
    ds = sources.load_dataset(ConfigDict(dict(name="synthetic_cifar", train_limit=64, test_limit=16)))
    assert ds.train_images.shape == (64, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (16, 32, 32, 3) and ds.test_labels.shape == (16,)
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == 100
    assert 0 <= ds.train_labels.min() and ds.train_labels.max() < 100
    assert len(np.unique(ds.train_images)) > 200  # random pixels, not a constant image
    again = sources.load_synthetic("synthetic_cifar", 64, 16)
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    small = sources.load_synthetic("synthetic_cifar", 8, 4)  # a limit: the first images of the larger set
    np.testing.assert_array_equal(small.train_images, ds.train_images[:8])
    np.testing.assert_array_equal(small.train_labels, ds.train_labels[:8])
    np.testing.assert_array_equal(small.test_images, ds.test_images[:4])
    assert not np.array_equal(ds.train_images[:16], ds.test_images)  # the splits differ


def test_synthetic_cifar_full_size_and_config_name():
    full = sources.load_synthetic("synthetic_cifar")
    assert full.train_images.shape == (50_000, 32, 32, 3) and full.test_images.shape == (10_000, 32, 32, 3)
    from configs import cifar100
    c = cifar100.get_config()
    c.data.name = "synthetic_cifar"
    validate_config(c)  # a known dataset name
