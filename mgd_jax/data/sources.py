"""Datasets as in-memory uint8 arrays: scikit-learn's bundled digits (offline quickstart), tfds CIFAR, and
random images of CIFAR's shapes made on the fly (``synthetic_cifar``: for timing, nothing to learn).

CIFAR is read with ``tfds.data_source`` (ArrayRecord random access, decoded with PIL: no TensorFlow at train
time).  TensorFlow is only needed once, to *build* the dataset from its archive (docs/cifar100.md).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from mgd_jax.errors import DatasetNotFoundError  # noqa: F401 - raised here


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self):
        return self.train_images.shape[1:]


# config ``data.split`` of the digits: 'stratified' (``stratified_split``), or 'sklearn' (scikit-learn's
# ``train_test_split``, stratified: the split of mgd-jax before it had this field, 2 s more to start a command)
DIGITS_SPLITS = ("stratified", "sklearn")
DIGITS_SPLIT, DIGITS_OLD_SPLIT = DIGITS_SPLITS  # the default; what a config without the field was split with


def _digits_without_split(data) -> bool:
    return data is not None and data.get("name") == "digits" and "split" not in data and not data.get("dir")


def with_current_defaults(config):
    """``config`` (a ConfigDict) with ``data.split`` at its default where it is a digits config without it (so
    its checkpoints and config.json carry it; ``train.checkpoint.ADDED_FIELDS``): a copy then, else ``config``."""
    if not _digits_without_split(config.get("data", None)):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.split = DIGITS_SPLIT
    return config


def with_old_defaults(config: dict) -> dict:
    """A stored ``config.json`` (a plain dict) of the digits without ``data.split``: written before the field
    existed, so with the split it was made with."""
    data = config.get("data")
    if isinstance(data, dict) and _digits_without_split(data):
        config = {**config, "data": {**data, "split": DIGITS_OLD_SPLIT}}
    return config


def load_digits(image_size: int = 16, test_size: int = 360, split_seed: int = 0,
                split: str = DIGITS_SPLIT) -> ArrayDataset:
    """scikit-learn's 1797 8x8 handwritten digits (ships inside scikit-learn: no download).

    Split: stratified, ``test_size`` images held out with ``split_seed`` (default 1437 train / 360 test), by
    ``split`` (``DIGITS_SPLITS``).  Pixels 0..16 are scaled to 0..255 uint8, one channel, nearest-neighbour
    upsampled to ``image_size``.
    """
    if image_size % 8:
        raise ValueError(f"digits image_size must be a multiple of 8, got {image_size}")
    if split not in DIGITS_SPLITS:
        raise ValueError(f"digits split must be one of {', '.join(DIGITS_SPLITS)}, got {split!r}")
    pixels, labels = _digits_arrays()
    imgs = np.clip(np.round(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    r = image_size // 8
    imgs = imgs.repeat(r, axis=1).repeat(r, axis=2)[..., None]
    if split == DIGITS_OLD_SPLIT:
        from sklearn.model_selection import train_test_split

        tr, te = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels,
                                  random_state=split_seed)
        tr, te = np.sort(tr), np.sort(te)
    else:
        tr, te = stratified_split(labels, test_size, split_seed)
    return ArrayDataset("digits", imgs[tr], labels[tr], imgs[te], labels[te], 10)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """-> (pixels float64 [1797, 8, 8] in 0..16, labels int32 [1797]): the digits as scikit-learn's
    ``load_digits`` gives them, read from the file scikit-learn ships without importing scikit-learn (whose import
    takes 2 s, most of a command's start); where that file is not found, through ``load_digits``."""
    import gzip
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):  # a module without a spec in sys.modules
        spec = None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") \
        if spec is not None and spec.origin else None
    if path is None or not os.path.isfile(path):
        try:
            from sklearn.datasets import load_digits as _load  # another layout of the package: its own reader
        except ImportError:
            raise DatasetNotFoundError("the digits ship with scikit-learn, which is not installed: pip install "
                                       "scikit-learn") from None
        d = _load()
        return d.images, d.target.astype(np.int32)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # one row per image: 64 pixels, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (train indices, test indices), each sorted: ``test_size`` of ``len(labels)`` indices held out, each
    class's share of them its proportion of the data rounded by largest remainder (ties to the smaller label), its
    members drawn uniformly at random (numpy's default generator seeded with ``seed``, one permutation per class in
    label order)."""
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in [1, {n - 1}] for {n} examples, got {test_size}")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = test_size * counts / n
    quota = np.floor(exact).astype(np.int64)
    extra = test_size - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(inverse == k))[:quota[k]] for k in range(len(classes))]
    test = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


_TFDS = {"cifar100": 100, "cifar10": 10, "stl10": 10}
# random images made in memory with a dataset's shapes: (training images, test images, image shape, classes)
SYNTHETIC = {"synthetic_cifar": (50_000, 10_000, (32, 32, 3), 100)}
# streamed, never held in memory (mgd_jax/data/streaming.py): tfds imagenet2012, or an image folder
# (``config.data.dir``; with it any name reads the folder, 'image_folder' says so)
STREAMING = ("imagenet2012", "image_folder")
DATASETS = ("digits", *_TFDS, *SYNTHETIC, *STREAMING)  # config.data.name


def load_synthetic(name: str, train_limit: int | None = None, test_limit: int | None = None) -> ArrayDataset:
    """CIFAR-100's shapes (50,000 training and 10,000 test images, 32x32x3 uint8, 100 classes) with uniformly
    random pixels and labels, made in memory: the training loop end to end (evaluation and checkpoints included)
    with no dataset on disk, for timing (benchmarks/gpu_check.sh).  Nothing to learn: accuracy stays at chance.
    Deterministic (fixed seeds); with a limit only the first ``train_limit`` / ``test_limit`` images are made,
    the same as the first images of the full set."""
    n_train, n_test, shape, classes = SYNTHETIC[name]
    n_train, n_test = min(n_train, train_limit or n_train), min(n_test, test_limit or n_test)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(0).spawn(4)]
    return ArrayDataset(name, rngs[0].integers(0, 256, (n_train, *shape), dtype=np.uint8),
                        rngs[1].integers(0, classes, n_train).astype(np.int32),
                        rngs[2].integers(0, 256, (n_test, *shape), dtype=np.uint8),
                        rngs[3].integers(0, classes, n_test).astype(np.int32), classes)


# the archives ``tfds build --manual_dir=DIR`` reads for each dataset
_ARCHIVES = {"cifar100": "cifar-100-binary.tar.gz", "cifar10": "cifar-10-binary.tar.gz",
             "stl10": "stl10_binary.tar.gz", "imagenet2012": "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"}


def build_instructions(name: str, data_dir: str | None, overwrite: bool = False) -> str:
    dd = f" --data_dir={data_dir}" if data_dir else ""
    archive = _ARCHIVES.get(name, "its archives")
    text = (f"build it once, offline: put {archive} in a folder DIR, pip install -e '.[prepare]', then "
            f"`tfds build {name} --manual_dir=DIR --file_format=array_record{dd}{' --overwrite' if overwrite else ''}`")
    if name == "imagenet2012":
        return text + " (see docs/imagenet.md), or train from an image folder with --config.data.dir=FOLDER"
    return text + " (see docs/cifar100.md)"


def _tfds_root(data_dir: str | None) -> str:
    """The folder tfds reads ``name/version`` from: ``data_dir``, else $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    if data_dir:
        return os.path.abspath(data_dir)
    from tensorflow_datasets.core import constants

    return os.path.abspath(str(constants.DATA_DIR))  # tfds reads an empty $TFDS_DATA_DIR as the working directory


def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip("\"'")
    return text.splitlines()[0].strip() if text else type(e).__name__


def _unreadable(name: str, split: str, data_dir: str | None, error: BaseException) -> str:
    """Why ``tfds.data_source(name, split)`` failed, from the dataset's folder: not built (no folder, no
    ``dataset_info.json``, only another version), built in a format ``data_source`` cannot read (tfrecord), no
    such split, or damaged files; with the command that builds it."""
    import tensorflow_datasets as tfds

    root = _tfds_root(data_dir)
    cause = f"{type(error).__name__}: {_first_line(error)}"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        where, version = os.path.abspath(str(builder.data_dir)), str(builder.version)
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 - a data_dir tfds cannot even list (a file, no permission): say so
        return (f"dataset {name!r} cannot be opened in {root} ({type(e).__name__}: {_first_line(e)}); "
                f"{build_instructions(name, data_dir)}")
    if not prepared:
        folder = os.path.join(root, name)
        others = sorted(v for v in (os.listdir(folder) if os.path.isdir(folder) else [])
                        if os.path.isfile(os.path.join(folder, v, "dataset_info.json")))
        if not os.path.isdir(root):
            why = f"{root} does not exist"
        elif others:
            why = (f"{folder} holds version {', '.join(others)} only; tensorflow-datasets {tfds.__version__} reads "
                   f"version {version}")
        else:
            why = f"no {os.path.join(where, 'dataset_info.json')}"
        return f"dataset {name!r} is not built in {where} ({why}); {build_instructions(name, data_dir)}"
    info = builder.info
    formats = [f for f in [info.file_format, *getattr(info, "alternative_file_formats", [])] if f is not None]
    values = [getattr(f, "value", str(f)) for f in formats]
    if "array_record" not in values:
        built = values[0] if values else "tfrecord (tfds' default)"
        return (f"dataset {name!r} in {where} was built as {built}: training reads it with tfds.data_source, which "
                f"needs --file_format=array_record; rebuild it: {build_instructions(name, data_dir, overwrite=True)}")
    splits = list(info.splits.keys())
    if split not in splits:
        return f"dataset {name!r} in {where} has no split {split!r} (its splits: {', '.join(splits) or 'none'})"
    return (f"dataset {name!r} in {where} cannot be read ({cause}): are its files missing or damaged? "
            f"{build_instructions(name, data_dir, overwrite=True)}")


def tfds_data_source(name: str, split: str, data_dir: str | None = None, **kwargs):
    """``tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)``, where a dataset that is
    not built, or built in a format ``data_source`` cannot read, is one DatasetNotFoundError naming the cause and
    the command that builds it (tfds' own error stays chained).  What tfds raises for those, in the versions we
    allow (4.9.9 - 4.9.10): a KeyError ("splits is empty") for a missing dataset at the default location, an
    AssertionError / OSError for a missing ``data_dir``, a NotImplementedError (a RuntimeError) for a tfrecord
    build; anything else (a bug) propagates."""
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)
    except (OSError, AssertionError, RuntimeError, ValueError, KeyError) as e:
        raise DatasetNotFoundError(_unreadable(name, split, data_dir, e)) from e
    try:  # the record files open on first access: a missing or damaged file fails here, not in the middle of a run
        source[0] if len(source) else None
    except ModuleNotFoundError:
        pass  # a decoder that needs TensorFlow (tfds' mock data): the caller decides
    except (OSError, RuntimeError, ValueError) as e:
        raise DatasetNotFoundError(_unreadable(name, split, data_dir, e)) from e
    return source


def _read_all(source) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images, labels = [], []
    chunk = 2048
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        recs = [source[i] for i in idx]
        images.extend(np.asarray(r["image"], np.uint8) for r in recs)
        labels.extend(int(r["label"]) for r in recs)
    return np.stack(images), np.asarray(labels, np.int32)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of uint8 [N, H, W, C] (torchvision Resize on the short side of square images)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    import jax
    out = []
    for start in range(0, len(images), 1000):
        chunk = images[start:start + 1000].astype(np.float32)
        r = jax.image.resize(chunk, (len(chunk), size, size, images.shape[3]), "bilinear", antialias=True)
        out.append(np.clip(np.round(np.asarray(r)), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def load_tfds(name: str, data_dir: str | None = None) -> ArrayDataset:
    if name not in _TFDS:
        raise ValueError(f"unknown tfds dataset {name!r}; supported: {', '.join(_TFDS)}")
    train = tfds_data_source(name, "train", data_dir)
    test = tfds_data_source(name, "test", data_dir)
    xtr, ytr = _read_all(train)
    xte, yte = _read_all(test)
    return ArrayDataset(name, xtr, ytr, xte, yte, _TFDS[name])


def load_dataset(cfg) -> ArrayDataset:
    """``cfg``: the config's ``data`` block (name, per-dataset options, optional ``train_limit`` /
    ``test_limit``: keep only the first N examples, for smoke runs).  ImageNet (``imagenet2012``) and image folders
    (``dir``) give a ``streaming.StreamingDataset``: nothing is read before a batch needs it."""
    if cfg.get("dir", None) or cfg.name in STREAMING:
        from mgd_jax.data import streaming
        if cfg.get("dir", None):
            return streaming.load_image_folder(cfg)
        if cfg.name == "image_folder":
            raise DatasetNotFoundError("config.data.name='image_folder' needs config.data.dir=FOLDER (FOLDER/train/"
                                       "<class>/*.jpg, FOLDER/val/<class>/*.jpg)")
        return streaming.load_tfds_streaming(cfg)
    if cfg.name == "digits":
        ds = load_digits(cfg.get("image_size", 16), cfg.get("test_size", 360), cfg.get("split_seed", 0),
                         cfg.get("split", DIGITS_SPLIT))
    elif cfg.name in SYNTHETIC:
        ds = load_synthetic(cfg.name, cfg.get("train_limit", None), cfg.get("test_limit", None))
    elif cfg.name in _TFDS:
        ds = load_tfds(cfg.name, cfg.get("data_dir", None))
        size = cfg.get("image_size", None)
        if size:  # e.g. STL-10's 96x96 images at 32x32 for CIFAR models (the reference's Resize(32))
            ds = dataclasses.replace(ds, train_images=resize_images(ds.train_images, size),
                                     test_images=resize_images(ds.test_images, size))
    else:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    ntr, nte = cfg.get("train_limit", None), cfg.get("test_limit", None)
    if ntr or nte:
        ds = dataclasses.replace(ds, train_images=ds.train_images[:ntr], train_labels=ds.train_labels[:ntr],
                                 test_images=ds.test_images[:nte], test_labels=ds.test_labels[:nte])
    return ds
