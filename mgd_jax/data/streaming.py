"""Streaming image datasets (ImageNet): files are read, decoded and augmented on host threads, batch by batch.

Nothing holds the images in memory: a source keeps only its file names (or a tfds ``data_source``) and labels.
The design is index-based, like the in-memory path: the loop derives each step's global row indices from
(seed, epoch, pass) (``mesh.epoch_batches``); ``StreamingDataset.train_batches`` turns them into decoded,
augmented uint8 batches on a pool of threads (Pillow decodes without the GIL), ``prefetch`` batches ahead.  Each
image's augmentation is drawn from its own generator, a function of (seed, epoch, pass, row index) only, so a
batch does not depend on the worker count or on where a run was resumed.  Each process of a multi-host run
decodes only its own contiguous slice of the global batch (the slice ``mesh.shard_batch`` would give it).

Transforms (torchvision's ImageNet recipe, on the host, in uint8):
* train: RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) (torchvision's sampling: 10 tries,
  then a centre crop), bilinear (antialiased) resize, horizontal flip with p = 0.5;
* eval: resize the short side to ``image_size * 256 / 224`` (256 at 224), centre crop ``image_size``.
Normalisation (and nothing else: ImageNet configs set ``augment.pad = 0``, ``augment.flip = False``) runs on the
device inside the jitted step.  Grayscale, palette, CMYK and RGBA images are converted to RGB (alpha dropped).
An unreadable file raises ``UnreadableImageError`` naming it; ``skip_unreadable=True`` gives a black image in its
place instead, and counts and names it (``StreamingDataset.skipped``).

Sources: an image folder (``DIR/train/<class>/*``, ``DIR/val/<class>/*``; class index = sorted folder names, as
torchvision's ``ImageFolder``) and tfds ``imagenet2012`` through ``tfds.data_source`` (ArrayRecord; the JPEG
bytes are decoded here, with Pillow).
"""
from __future__ import annotations

import collections
import io
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from mgd_jax.errors import ConfigError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
EVAL_RESIZE_RATIO = 256 / 224  # the short side before the centre crop (torchvision's Resize(256), CenterCrop(224))
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults (torchvision; the ImageNet recipe of every KD paper)
CROP_RATIO = (3 / 4, 4 / 3)
FOLDER_SPLITS = {"train": "train", "test": "val"}
LOADERS = ("threads", "grain")  # config.data.loader: who decodes the training batches (the same batches either way)
TFDS_SPLITS = {"train": "train", "test": "validation"}


class UnreadableImageError(DatasetNotFoundError):
    """An image file of the dataset that cannot be read or decoded (the message names it)."""


# --- sources: len(), labels, read(i) -> PIL image ------------------------------------------------------------------
class FolderSource:
    """One split of an image folder: ``root/<class>/<file>``, classes = sorted sub-folder names (``classes`` may
    impose the training split's list on the validation split)."""

    def __init__(self, root: str, classes: list[str] | None = None):
        if not os.path.isdir(root):
            raise DatasetNotFoundError(f"image folder {root!r} does not exist (expected DIR/train/<class>/*.jpg and "
                                       f"DIR/val/<class>/*.jpg)")
        found = sorted(d.name for d in os.scandir(root) if d.is_dir())
        classes = found if classes is None else list(classes)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DatasetNotFoundError(f"image folder {root!r}: class folders not in the training split: {unknown[:5]}")
        if not classes:
            raise DatasetNotFoundError(f"image folder {root!r} has no class sub-folders")
        names, labels = [], []
        for label, cls in enumerate(classes):
            d = os.path.join(root, cls)
            if not os.path.isdir(d):
                continue
            files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files and cls in found:  # torchvision's ImageFolder refuses it too: a class no image can teach
                raise DatasetNotFoundError(f"image folder {root!r}: class folder {cls!r} holds no image files "
                                           f"({', '.join(IMAGE_EXTENSIONS)})")
            names.extend(os.path.join(cls, f) for f in files)
            labels.extend([label] * len(files))
        if not names:
            raise DatasetNotFoundError(f"image folder {root!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.root, self.classes = root, classes
        # fixed-width bytes: ~60 bytes per file instead of a Python string object each (1.28 M files: ~80 MB)
        self.names = np.asarray([n.encode() for n in names])
        self.labels = np.asarray(labels, np.int32)

    def __len__(self):
        return len(self.labels)

    def describe(self, i: int) -> str:
        return os.path.join(self.root, self.names[i].decode())

    def read(self, i: int) -> Image.Image:
        return Image.open(self.describe(i))


class TfdsSource:
    """One split of a tfds dataset built as ArrayRecord (``tfds.data_source``), images kept as encoded bytes."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        from mgd_jax.data.sources import tfds_data_source

        data_dir = os.path.expanduser(data_dir) if data_dir else None
        # a dataset that is not built (or built as tfrecord) is one DatasetNotFoundError naming the cause and the fix
        self.source = tfds_data_source(name, split, data_dir, decoders={"image": tfds.decode.SkipDecoding()})
        try:  # the encoded bytes, decoded here (draft mode); tfds' mock_data needs TensorFlow to hand out bytes
            self.source[0] if len(self.source) else None
        except ModuleNotFoundError:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)  # decoded by tfds
        self.name, self.split = name, split
        self.classes = None
        self.labels = self._labels(data_dir)

    def _labels(self, data_dir) -> np.ndarray:
        """Every record's label: one read of the split (threads), cached as ``labels_<split>.npy`` beside the
        dataset's files when that folder is writable (a record holds its image too: ImageNet's pass reads 140 GB)."""
        import tensorflow_datasets as tfds

        n = len(self.source)
        cache = None
        try:
            cache = os.path.join(str(tfds.builder(self.name, data_dir=data_dir).data_dir), f"labels_{self.split}.npy")
            labels = np.load(cache)
            if len(labels) == n:
                return labels.astype(np.int32)
        except (OSError, ValueError):
            pass
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            labels = np.asarray(list(pool.map(lambda i: int(self.source[i]["label"]), range(n), chunksize=256)),
                                np.int32)
        if cache is not None:
            try:
                tmp = f"{cache}.{os.getpid()}.tmp.npy"
                np.save(tmp, labels)
                os.replace(tmp, cache)
            except OSError:
                pass
        return labels

    def __len__(self):
        return len(self.labels)

    def describe(self, i: int) -> str:
        return f"tfds {self.name} {self.split}[{i}]"

    def read(self, i: int) -> Image.Image:
        image = self.source[i]["image"]
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
            return Image.fromarray(image if image.shape[-1] != 1 else image[..., 0])  # decoded already
        if isinstance(image, np.ndarray):
            image = image.item()
        return Image.open(io.BytesIO(image))


# --- transforms: PIL image + generator -> uint8 [size, size, 3] ----------------------------------------------------
def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").convert("RGB")  # alpha dropped (torchvision's .convert('RGB'))
    return img.convert("RGB")  # L, I;16, P, CMYK (Pillow inverts Adobe CMYK JPEGs), YCbCr ...


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=CROP_SCALE,
                            ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: -> (left, top, crop width, crop height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: a centre crop of the closest allowed ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _resize_box(img: Image.Image, box, out_size: tuple[int, int]) -> np.ndarray:
    """Crop ``box`` (left, top, right, bottom, in the image's full-size pixels) and resize to ``out_size`` (w, h),
    bilinear, antialiased.  A JPEG is decoded at the smallest DCT scale that keeps the crop at least ``out_size``
    (libjpeg's draft mode: 2-8x less decoding for a small crop of a large image)."""
    width, height = img.size
    if img.format == "JPEG":
        cw, ch = box[2] - box[0], box[3] - box[1]
        img.draft(img.mode, (max(1, math.ceil(width * out_size[0] / cw)), max(1, math.ceil(height * out_size[1] / ch))))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    img = _rgb(img)
    return np.asarray(img.resize(out_size, Image.BILINEAR, box=box), np.uint8)


def train_image(img: Image.Image, size: int, rng: np.random.Generator, flip: bool = True,
                scale=CROP_SCALE) -> np.ndarray:
    left, top, w, h = random_resized_crop_box(*img.size, rng, scale)
    out = _resize_box(img, (left, top, left + w, top + h), (size, size))
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_image(img: Image.Image, size: int, resize_ratio: float = EVAL_RESIZE_RATIO) -> np.ndarray:
    """Resize the short side to round(size * ratio), centre crop size x size (torchvision's integer offsets)."""
    width, height = img.size
    short = int(round(size * resize_ratio))
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    # the centre crop of the resized image, as a box in the original's pixels: one resample
    sx, sy = width / rw, height / rh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return _resize_box(img, box, (size, size))


def decode(source, i: int, transform, skip_unreadable: bool, shape) -> tuple[np.ndarray, tuple | None]:
    """``transform(source.read(i))`` -> (uint8 image, None); an unreadable file raises ``UnreadableImageError``
    naming it, or with ``skip_unreadable`` gives (a black image, (the file's name, why))."""
    try:
        img = source.read(int(i))
        with img:
            return transform(img), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decode errors
        where = source.describe(int(i))
        if not skip_unreadable:
            raise UnreadableImageError(f"cannot read image {where}: {type(e).__name__}: {e} (set "
                                       f"--config.data.skip_unreadable=True to skip such files)") from e
        return np.zeros(shape, np.uint8), (where, f"{type(e).__name__}: {e}")


class TrainDecoder:
    """Training row -> uint8 image as (seed, epoch, pass) augment it: a small picklable callable (what a grain
    worker process receives), the same arithmetic as ``StreamingDataset.train_example``."""

    def __init__(self, source, size: int, flip: bool, crop_scale, skip_unreadable: bool, seed: int, epoch: int,
                 pass_id: int):
        self.source, self.size, self.flip, self.crop_scale = source, int(size), bool(flip), tuple(crop_scale)
        self.skip_unreadable, self.key = bool(skip_unreadable), (int(seed), int(epoch), int(pass_id))

    def __call__(self, row) -> tuple[np.ndarray, tuple | None]:
        rng = np.random.default_rng([*self.key, int(row)])
        return decode(self.source, int(row), lambda im: train_image(im, self.size, rng, self.flip, self.crop_scale),
                      self.skip_unreadable, (self.size, self.size, 3))


# --- the dataset the loop reads ------------------------------------------------------------------------------------
class StreamingDataset:
    """What the stages read (the same fields as ``ArrayDataset``): ``train_labels`` / ``test_labels`` are arrays,
    ``train_images`` / ``test_images`` are views whose ``[rows]`` decodes those rows with the evaluation transform;
    training batches come from ``train_batches`` (the random transform, prefetched)."""

    streaming = True

    def __init__(self, name: str, train, test, num_classes: int, image_size: int, *, flip: bool = True,
                 crop_scale=CROP_SCALE, eval_resize_ratio: float = EVAL_RESIZE_RATIO, workers: int | None = None,
                 prefetch: int = 2, skip_unreadable: bool = False, train_limit: int | None = None,
                 test_limit: int | None = None, loader: str = "threads", processes: int = 0):
        self.name, self.num_classes, self.image_size = name, int(num_classes), int(image_size)
        self.flip, self.crop_scale, self.eval_resize_ratio = bool(flip), tuple(crop_scale), float(eval_resize_ratio)
        self.workers = int(workers or os.cpu_count() or 1)
        self.prefetch = max(1, int(prefetch))
        if loader not in LOADERS:
            raise ConfigError(f"data.loader must be one of {', '.join(LOADERS)}, got {loader!r}")
        self.loader = loader
        self.processes = int(processes or 0)
        if self.processes and loader != "grain":
            raise ConfigError(f"data.processes={self.processes} (decoding worker processes) needs "
                              f"data.loader='grain'")
        self.skip_unreadable = bool(skip_unreadable)
        self._train, self._test = train, test
        self.train_labels = train.labels[:train_limit] if train_limit else train.labels
        self.test_labels = test.labels[:test_limit] if test_limit else test.labels
        self.train_images = _ImageView(self, train, len(self.train_labels))
        self.test_images = _ImageView(self, test, len(self.test_labels))
        self.skipped: set[str] = set()
        self.decoded = {"train": 0, "test": 0}  # images this process has read, per split (for the logs and tests)
        self._lock = threading.Lock()
        self._pool = None

    @property
    def image_shape(self):
        return (self.image_size, self.image_size, 3)

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mgd-data")
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _load(self, source, i: int, transform) -> np.ndarray:
        with self._lock:
            self.decoded["train" if source is self._train else "test"] += 1
        image, skipped = decode(source, i, transform, self.skip_unreadable, self.image_shape)
        if skipped:
            self._record_skip(skipped)
        return image

    def _record_skip(self, skipped: tuple):
        where, why = skipped
        with self._lock:
            if where not in self.skipped:
                print(f"warning: skipping unreadable image {where} ({why})", flush=True)
            self.skipped.add(where)

    def decoder(self, seed: int, epoch: int, pass_id: int) -> TrainDecoder:
        return TrainDecoder(self._train, self.image_size, self.flip, self.crop_scale, self.skip_unreadable, seed,
                            epoch, pass_id)

    def train_example(self, row: int, seed: int, epoch: int, pass_id: int) -> np.ndarray:
        """Training row ``row`` as (seed, epoch, pass) augment it: uint8 [size, size, 3]."""
        with self._lock:
            self.decoded["train"] += 1
        image, skipped = self.decoder(seed, epoch, pass_id)(row)
        if skipped:
            self._record_skip(skipped)
        return image

    def eval_example(self, source, row: int) -> np.ndarray:
        return self._load(source, row, lambda im: eval_image(im, self.image_size, self.eval_resize_ratio))

    def train_batches(self, batches, seed: int, epoch: int, pass_id: int, process_index: int = 0,
                      process_count: int = 1):
        """``batches``: global row-index arrays in order -> iterator of this process's uint8 image rows of each
        (its contiguous slice of the global batch), decoded ``prefetch`` batches ahead on the pool's threads
        (``loader='threads'``) or by a grain ``MapDataset`` with as many read threads (``loader='grain'``): the same
        batches either way, each image a function of (seed, epoch, pass, row)."""
        if self.loader == "grain":
            yield from self._grain_batches(batches, seed, epoch, pass_id, process_index, process_count)
            return
        pool = self.pool
        pending = collections.deque()

        def submit(idx):
            per = len(idx) // process_count
            mine = idx[process_index * per:(process_index + 1) * per]
            pending.append([pool.submit(self.train_example, r, seed, epoch, pass_id) for r in mine])

        it = iter(batches)
        try:
            for idx in itertools.islice(it, self.prefetch + 1):
                submit(idx)
            while pending:
                futures = pending.popleft()
                nxt = next(it, None)  # keep `prefetch` batches in flight behind the one being waited for
                if nxt is not None:
                    submit(nxt)
                yield np.stack([f.result() for f in futures]) if futures else \
                    np.zeros((0, *self.image_shape), np.uint8)
        finally:
            for futures in pending:
                for f in futures:
                    f.cancel()


    def _grain_batches(self, batches, seed, epoch, pass_id, process_index, process_count):
        try:
            import grain
        except ImportError:
            raise DatasetNotFoundError("data.loader='grain' needs grain: pip install -e '.[imagenet]' (or use "
                                       "data.loader='threads')") from None

        mine = []
        for idx in batches:
            per = len(idx) // process_count
            mine.append(np.asarray(idx[process_index * per:(process_index + 1) * per]))
        if not mine:
            return
        decoder = self.decoder(seed, epoch, pass_id)
        if self.processes:  # worker processes, each decoding whole batches (one IPC transfer per batch)
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (train.py parses them; a library
                flags.FLAGS.mark_as_parsed()  # caller may not have)
            ds = grain.MapDataset.source(mine).map(_BatchDecoder(decoder, self.image_shape))
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.processes,
                                                                  per_worker_buffer_size=self.prefetch)))
            try:
                for images, skipped in it:
                    for sk in skipped:
                        self._record_skip(sk)
                    with self._lock:
                        self.decoded["train"] += len(images)
                    yield images
            finally:
                close = getattr(it, "close", None)  # stops grain's worker processes early (an interrupted epoch)
                if close is not None:
                    close()
            return
        ds = grain.MapDataset.source(np.concatenate(mine)).map(decoder)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.workers,
                                                  prefetch_buffer_size=self.prefetch * max(len(m) for m in mine)))
        it = iter(ds)
        try:
            for m in mine:
                images = []
                for _ in range(len(m)):
                    image, skipped = next(it)
                    if skipped:
                        self._record_skip(skipped)
                    images.append(image)
                with self._lock:
                    self.decoded["train"] += len(m)
                yield np.stack(images) if images else np.zeros((0, *self.image_shape), np.uint8)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


class _BatchDecoder:
    """A batch's rows -> (uint8 images [n, size, size, 3], skipped files): one grain element per batch."""

    def __init__(self, decoder: TrainDecoder, shape):
        self.decoder, self.shape = decoder, tuple(shape)

    def __call__(self, rows):
        out = [self.decoder(r) for r in rows]
        images = np.stack([o[0] for o in out]) if out else np.zeros((0, *self.shape), np.uint8)
        return images, [o[1] for o in out if o[1]]


class _ImageView:
    """``view[rows]`` -> uint8 [len(rows), size, size, 3], the evaluation transform of those rows (threads)."""

    def __init__(self, dataset: StreamingDataset, source, n: int):
        self.dataset, self.source, self.n = dataset, source, n

    @property
    def shape(self):
        return (self.n, *self.dataset.image_shape)

    dtype = np.dtype(np.uint8)

    def __len__(self):
        return self.n

    def __getitem__(self, rows):
        rows = np.arange(self.n)[rows] if isinstance(rows, slice) else np.asarray(rows)
        if rows.ndim == 0:
            return self.dataset.eval_example(self.source, int(rows))
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows out of range 0..{self.n - 1}")
        out = list(self.dataset.pool.map(lambda r: self.dataset.eval_example(self.source, r), rows))
        return np.stack(out) if out else np.zeros((0, *self.dataset.image_shape), np.uint8)


def _options(cfg) -> dict:
    return dict(flip=cfg.get("flip", True), crop_scale=cfg.get("crop_scale", CROP_SCALE),
                eval_resize_ratio=cfg.get("eval_resize_ratio", EVAL_RESIZE_RATIO), workers=cfg.get("workers", None),
                prefetch=cfg.get("prefetch", 2), skip_unreadable=cfg.get("skip_unreadable", False),
                train_limit=cfg.get("train_limit", None), test_limit=cfg.get("test_limit", None),
                loader=cfg.get("loader", "threads"), processes=cfg.get("processes", 0))


def load_image_folder(cfg) -> StreamingDataset:
    """``cfg.dir``: a folder with ``train/`` and ``val/``, one sub-folder of images per class."""
    root = os.path.expanduser(cfg.dir)
    train = FolderSource(os.path.join(root, FOLDER_SPLITS["train"]))
    test = FolderSource(os.path.join(root, FOLDER_SPLITS["test"]), classes=train.classes)
    num_classes = cfg.get("num_classes", None) or len(train.classes)
    if num_classes < len(train.classes):
        raise DatasetNotFoundError(f"image folder {root!r} has {len(train.classes)} classes, more than "
                                   f"config.data.num_classes={num_classes}")
    return StreamingDataset(f"folder:{root}", train, test, num_classes, cfg.get("image_size", 224), **_options(cfg))


def load_tfds_streaming(cfg) -> StreamingDataset:
    """tfds ``cfg.name`` (``imagenet2012``) read randomly from its ArrayRecord files."""
    import tensorflow_datasets as tfds

    train = TfdsSource(cfg.name, TFDS_SPLITS["train"], cfg.get("data_dir", None))
    test = TfdsSource(cfg.name, TFDS_SPLITS["test"], cfg.get("data_dir", None))
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.get("data_dir", None) else None
    num_classes = tfds.builder(cfg.name, data_dir=data_dir).info.features["label"].num_classes
    return StreamingDataset(cfg.name, train, test, num_classes, cfg.get("image_size", 224), **_options(cfg))
