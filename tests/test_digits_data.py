"""The bundled digits: scikit-learn's arrays read without importing scikit-learn, and the stratified split."""
import subprocess
import sys

import numpy as np
import pytest

from mgd_jax.data import sources

from conftest import ROOT


def test_the_digits_are_scikit_learns_arrays_exactly():
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels, labels = sources._digits_arrays()
    np.testing.assert_array_equal(pixels, d.images)
    np.testing.assert_array_equal(labels, d.target)
    assert labels.dtype == np.int32


def test_without_the_data_file_the_digits_come_from_scikit_learns_loader(monkeypatch):
    import importlib.util

    from sklearn.datasets import load_digits

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    pixels, labels = sources._digits_arrays()
    np.testing.assert_array_equal(pixels, load_digits().images)
    np.testing.assert_array_equal(labels, load_digits().target)


@pytest.mark.timeout(120)
def test_loading_the_digits_does_not_import_scikit_learn():
    code = ("import sys; from mgd_jax.data.sources import load_dataset; import ml_collections as m; "
            "ds = load_dataset(m.ConfigDict({'name': 'digits', 'image_size': 16, 'test_size': 360, 'split_seed': 0})); "
            "print(len(ds.train_labels), len(ds.test_labels), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1437", "360", "False"], out.stdout


@pytest.mark.parametrize("test_size,seed", [(360, 0), (10, 3), (1787, 1), (500, 7)])
def test_the_split_is_stratified_disjoint_and_complete(test_size, seed):
    _, labels = sources._digits_arrays()
    train, test = sources.stratified_split(labels, test_size, seed)
    assert len(test) == test_size and len(train) == len(labels) - test_size
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(len(labels)))
    counts = np.bincount(labels, minlength=10)
    held = np.bincount(labels[test], minlength=10)
    assert np.all(np.abs(held - test_size * counts / len(labels)) < 1), held  # each class within one image
    again = sources.stratified_split(labels, test_size, seed)
    np.testing.assert_array_equal(again[1], test)  # a function of the seed


def test_the_split_draws_each_class_uniformly_and_differs_by_seed():
    _, labels = sources._digits_arrays()
    tests = [sources.stratified_split(labels, 360, s)[1] for s in range(200)]
    assert len({t.tobytes() for t in tests}) == 200
    freq = np.zeros(len(labels))
    for t in tests:
        freq[t] += 1
    freq /= len(tests)
    # every image is held out about 360 / 1797 of the time (binomial sd over 200 seeds ~0.028): a split that
    # favoured the first members of a class, or never moved, fails this
    assert np.abs(freq - 360 / 1797).max() < 0.15, np.abs(freq - 360 / 1797).max()
    assert abs(freq[:900].mean() - freq[900:].mean()) < 0.02


def test_a_test_size_outside_the_data_is_refused():
    with pytest.raises(ValueError, match="test_size must be in"):
        sources.stratified_split(np.arange(10) % 2, 10, 0)


def test_split_sklearn_is_scikit_learns_train_test_split():
    from sklearn.model_selection import train_test_split

    ds = sources.load_digits(8, 360, 5, split="sklearn")
    _, labels = sources._digits_arrays()
    tr, te = train_test_split(np.arange(len(labels)), test_size=360, stratify=labels, random_state=5)
    np.testing.assert_array_equal(ds.test_labels, labels[np.sort(te)])
    np.testing.assert_array_equal(ds.train_labels, labels[np.sort(tr)])
    pixels, _ = sources._digits_arrays()
    np.testing.assert_array_equal(ds.test_images[..., 0], np.round(pixels[np.sort(te)] * 255 / 16).astype(np.uint8))
    new = sources.load_digits(8, 360, 5)
    assert not np.array_equal(new.test_labels, ds.test_labels) or not np.array_equal(new.test_images, ds.test_images)


def test_a_checkpoint_from_before_the_split_field_is_scikit_learns_split():
    """A stored config without ``data.split`` was split by scikit-learn: resuming it with the new default is
    refused in one line naming the field; with ``--config.data.split=sklearn`` it resumes; other datasets (no such
    field) are not affected."""
    from mgd_jax.errors import StageMismatchError
    from mgd_jax.train.checkpoint import check_meta

    old = {"stage": "teacher", "config": {"config.data.name": "digits", "config.seed": 0}}
    want = {"config.data.name": "digits", "config.seed": 0}
    with pytest.raises(StageMismatchError, match="written for config.data.split='sklearn' but the config asks for "
                                                 "config.data.split='stratified'; use another --workdir, or delete "
                                                 "w/teacher .*, or --config.data.split='sklearn' to finish it as it "
                                                 "was started$"):
        check_meta(old, {"config": {**want, "config.data.split": "stratified"}}, "w/teacher/checkpoints/latest")
    check_meta(old, {"config": {**want, "config.data.split": "sklearn"}}, "w/teacher/checkpoints/latest")
    check_meta({"config": {"config.data.name": "cifar100"}}, {"config": {"config.data.name": "cifar100"}}, "w")


def test_analysis_tools_read_an_old_digits_workdir_with_scikit_learns_split(tmp_path):
    import json

    from mgd_jax.analysis.common import load_config

    for name, split in (("digits", None), ("digits", "stratified"), ("cifar100", None)):
        data = {"name": name, **({"split": split} if split else {})}
        (tmp_path / "config.json").write_text(json.dumps({"data": data, "augment": {}}))
        got = load_config(str(tmp_path)).data.get("split", None)
        assert got == (split or ("sklearn" if name == "digits" else None)), (name, split, got)


def test_a_digits_config_without_the_field_trains_and_stores_the_stratified_split():
    """A digits config that does not set ``data.split`` (configs/default.py with data.name='digits', a user's own)
    trains on the default split, and its checkpoints and config.json say so: resuming it under a config that does
    set the field is not refused, and the analysis tools read it with the split it trained on."""
    from configs import default
    from mgd_jax.stages.common import stage_config
    from mgd_jax.data.sources import with_current_defaults

    c = default.get_config()
    c.data.name = "digits"
    filled = with_current_defaults(c)
    assert "split" not in c.data and filled.data.split == "stratified"  # a copy: the caller's config is untouched
    assert stage_config(filled, "teacher")["config.data.split"] == "stratified"
    cifar = default.get_config()
    assert with_current_defaults(cifar) is cifar and "split" not in cifar.data


def test_summarize_compares_an_old_run_with_a_new_one_on_the_old_split():
    from mgd_jax.summarize import first_difference, run_identity
    from mgd_jax.data.sources import with_old_defaults

    old = {"data": {"name": "digits", "test_size": 360}, "seed": 0}
    new_old_split = {"data": {"name": "digits", "test_size": 360, "split": "sklearn"}, "seed": 1}
    new = {"data": {"name": "digits", "test_size": 360, "split": "stratified"}, "seed": 2}
    assert first_difference(run_identity(with_old_defaults(old)), run_identity(new_old_split)) is None
    assert first_difference(run_identity(with_old_defaults(old)), run_identity(new))[0] == "data.split"
    cifar = {"data": {"name": "cifar100"}}
    assert with_old_defaults(cifar) == cifar


def test_without_scikit_learn_the_digits_are_one_line(monkeypatch):
    import importlib.util

    from mgd_jax.errors import DatasetNotFoundError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import sklearn.datasets raises ImportError
    with pytest.raises(DatasetNotFoundError, match="^the digits ship with scikit-learn, which is not installed"):
        sources._digits_arrays()


def test_an_old_digits_workdir_is_refused_before_anything_runs(tmp_path):
    """train_and_evaluate on a workdir whose teacher checkpoint was written before ``data.split`` existed, with a
    digits config that does not set the field either: refused in one line naming it, before any compilation."""
    from configs import smoke
    from mgd_jax import pipeline
    from mgd_jax.errors import StageMismatchError
    from mgd_jax.stages.common import stage_config
    from mgd_jax.train.checkpoint import StageCheckpoints

    c = smoke.get_config()
    with c.unlocked():
        del c.data["split"]
    old = {k: v for k, v in stage_config(c, "teacher").items()}
    assert "config.data.split" not in old
    ck = StageCheckpoints(str(tmp_path / "teacher" / "checkpoints"))
    try:
        ck.save_latest(1, {"w": np.zeros(2)}, {"stage": "teacher", "arch": c.teacher.arch, "epoch": 0, "best": {},
                                               "config": old})
    finally:
        ck.close()
    with pytest.raises(StageMismatchError, match="written for config.data.split='sklearn' but the config asks for "
                                                 "config.data.split='stratified'"):
        pipeline.train_and_evaluate(c, str(tmp_path))
    assert not (tmp_path / "config.json").exists()


def test_the_checkpoint_identity_and_the_loader_agree_on_the_old_split():
    from mgd_jax.train.checkpoint import ADDED_FIELDS

    assert ADDED_FIELDS["config.data.split"] == sources.DIGITS_OLD_SPLIT
    assert sources.with_old_defaults({"data": {"name": "digits"}})["data"]["split"] == sources.DIGITS_OLD_SPLIT
