"""Datasets as in-memory uint8 arrays: scikit-learn's bundled digits (offline quickstart) and tfds CIFAR.

CIFAR is read with ``tfds.data_source`` (ArrayRecord random access, decoded with PIL: no TensorFlow at train
time).  TensorFlow is only needed once, to *build* the dataset from its archive (README: "CIFAR-100 recipe").
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


def load_digits(image_size: int = 16, test_size: int = 360, split_seed: int = 0) -> ArrayDataset:
    """scikit-learn's 1797 8x8 handwritten digits (ships inside scikit-learn: no download).

    Split: stratified, ``test_size`` images held out with ``split_seed`` (default 1437 train / 360 test).
    Pixels 0..16 are scaled to 0..255 uint8, one channel, nearest-neighbour upsampled to ``image_size``.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    if image_size % 8:
        raise ValueError(f"digits image_size must be a multiple of 8, got {image_size}")
    d = _load()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    r = image_size // 8
    imgs = imgs.repeat(r, axis=1).repeat(r, axis=2)[..., None]
    labels = d.target.astype(np.int32)
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=split_seed)
    tr, te = np.sort(tr), np.sort(te)
    return ArrayDataset("digits", imgs[tr], labels[tr], imgs[te], labels[te], 10)


_TFDS = {"cifar100": 100, "cifar10": 10, "stl10": 10}
# streamed, never held in memory (mgd_jax/data/streaming.py): tfds imagenet2012, or an image folder
# (``config.data.dir``; with it any name reads the folder, 'image_folder' says so)
STREAMING = ("imagenet2012", "image_folder")
DATASETS = ("digits", *_TFDS, *STREAMING)  # config.data.name


def build_instructions(name: str, data_dir: str | None) -> str:
    dd = f" --data_dir={data_dir}" if data_dir else ""
    archive = {"cifar100": "cifar-100-binary.tar.gz", "cifar10": "cifar-10-binary.tar.gz",
               "stl10": "stl10_binary.tar.gz"}[name]
    return (f"build it once, offline: put {archive} in a folder DIR, pip install -e '.[prepare]', then "
            f"`tfds build {name} --manual_dir=DIR --file_format=array_record{dd}` (see README, 'CIFAR-100 recipe')")


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
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        train = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
        test = tfds.data_source(name, split="test", data_dir=data_dir, download=False)
    except (OSError, AssertionError, RuntimeError, ValueError) as e:
        # what tfds raises for a dataset that is missing (not-found / assertion errors), or built in a format
        # data_source cannot read (a RuntimeError subclass); programming errors propagate.  The cause stays
        # chained and its first line is shown.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not builder.is_prepared():
            why = f"dataset {name!r} is not built in {builder.data_dir} ({type(e).__name__}: {first})"
        else:
            why = f"dataset {name!r} in {builder.data_dir} cannot be read randomly ({type(e).__name__}: {first}; " \
                  f"was it built without --file_format=array_record?)"
        raise DatasetNotFoundError(f"{why}; {build_instructions(name, data_dir)}") from e
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
        ds = load_digits(cfg.get("image_size", 16), cfg.get("test_size", 360), cfg.get("split_seed", 0))
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
