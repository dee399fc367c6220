"""The streaming ImageNet input path (mgd_jax/data/streaming.py): image folders and tfds imagenet2012, the host
transforms, determinism per (seed, epoch, pass, row), per-process rows, odd files; configs/imagenet.py."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mgd_jax.data import load_dataset
from mgd_jax.errors import ConfigError, DatasetNotFoundError
from mgd_jax.data import streaming
from mgd_jax.train import mesh as mesh_lib

CLASSES = ("ant", "bee", "cat")  # sorted: labels 0, 1, 2
PER_CLASS = 24
PALETTE_RGB = (230, 120, 40)  # the palette PNG's one colour (index 3): the image is this colour, not its index


def _write_folder(root, rng, per_class=PER_CLASS, val_per_class=6):
    """JPEG and PNG files of odd sizes, class c's pixels around 60 + 70 c (so a label can be read off an image),
    one grayscale JPEG, one CMYK JPEG, one RGBA PNG, one palette PNG in the training split."""
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                h, w = (int(v) for v in rng.integers(13, 61, 2))
                a = np.clip(rng.normal(60 + 70 * c, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(a)
                if k % 2:
                    img.save(os.path.join(d, f"{k:03d}.png"))
                else:
                    img.save(os.path.join(d, f"{k:03d}.jpg"), quality=95)
    d = os.path.join(root, "train", CLASSES[0])
    gray = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None] * 5, (30, 1)), "L")
    gray.save(os.path.join(d, "gray.jpg"), quality=95)
    Image.new("CMYK", (33, 29), (0, 255, 255, 0)).save(os.path.join(d, "cmyk.jpg"), quality=95)  # pure red
    rgba = np.zeros((27, 31, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 17  # green, almost transparent: alpha is dropped, the colour kept
    Image.fromarray(rgba, "RGBA").save(os.path.join(d, "rgba.png"))
    palette = Image.new("P", (25, 25), 3)  # every pixel index 3, whose palette entry is orange
    palette.putpalette([0, 0, 0] * 3 + list(PALETTE_RGB) + [0, 0, 0] * 252)
    palette.save(os.path.join(d, "palette.png"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(str(tmp_path_factory.mktemp("imagefolder")), np.random.default_rng(0))


def _cfg(root, **kw):
    return ml_collections.ConfigDict({**dict(name="imagenet2012", dir=root, image_size=24, workers=3, prefetch=2),
                                      **kw})


def test_folder_classes_labels_and_conversions_to_rgb(folder):
    ds = load_dataset(_cfg(folder))
    assert isinstance(ds, streaming.StreamingDataset) and ds.num_classes == 3
    assert ds._train.classes == list(CLASSES)
    assert len(ds.train_labels) == 3 * PER_CLASS + 4 and len(ds.test_labels) == 3 * 6
    assert np.bincount(ds.train_labels).tolist() == [PER_CLASS + 4, PER_CLASS, PER_CLASS]
    assert ds.train_images.shape == (len(ds.train_labels), 24, 24, 3) and ds.image_shape == (24, 24, 3)
    names = [n.decode() for n in ds._train.names]
    row = {os.path.basename(n): i for i, n in enumerate(names) if n.startswith(CLASSES[0])}
    images = ds.train_images[np.arange(len(ds.train_labels))]  # every file decodes, the eval transform
    assert images.dtype == np.uint8 and images.shape == (len(ds.train_labels), 24, 24, 3)
    gray = images[row["gray.jpg"]].astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert gray[..., 0].std() > 20  # the ramp survived (not a blank image)
    cmyk = images[row["cmyk.jpg"]].astype(int).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 40 and cmyk[2] < 40, cmyk  # red
    rgba = images[row["rgba.png"]].astype(int).reshape(-1, 3)
    assert np.all(np.abs(rgba - [0, 200, 0]) <= 1)
    assert np.array_equal(images[row["palette.png"]], np.broadcast_to(PALETTE_RGB, (24, 24, 3)))
    # labels follow the folders: class c's images are brighter with c
    means = images.reshape(len(images), -1).mean(1)
    ordinary = [i for i, n in enumerate(names) if os.path.basename(n)[0].isdigit()]
    for c in range(3):
        m = means[[i for i in ordinary if ds.train_labels[i] == c]]
        assert np.all(np.abs(m - (60 + 70 * c)) < 15)
    ds.close()


def test_eval_transform_is_resize_then_centre_crop():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    a[30:60, 55:85] = 255  # a bright square in the centre
    img = Image.fromarray(a)
    out = streaming.eval_image(img, 56)  # short side 64 = 56 * 256 / 224, then the centre 56 x 56
    ref = np.asarray(img.resize((int(64 * 140 / 90), 64), Image.BILINEAR))
    top, left = int(round((64 - 56) / 2)), int(round((ref.shape[1] - 56) / 2))
    ref = ref[top:top + 56, left:left + 56]
    assert out.shape == (56, 56, 3)
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) < 40, (diff.mean(), diff.max())


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(0)
    boxes = np.array([streaming.random_resized_crop_box(200, 150, rng) for _ in range(2000)])
    left, top, w, h = boxes.T
    assert np.all(left >= 0) and np.all(top >= 0) and np.all(left + w <= 200) and np.all(top + h <= 150)
    area = w * h / (200 * 150)
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.3 < np.median(area) < 0.7
    ratio = w / h
    inside = (ratio > 3 / 4 * 0.95) & (ratio < 4 / 3 * 1.05)
    assert inside.mean() > 0.99
    # a strip no crop fits in 10 tries: torchvision's fallback, the centre crop of the nearest allowed ratio
    assert streaming.random_resized_crop_box(400, 20, np.random.default_rng(0), scale=(0.99, 1.0)) == \
        ((400 - 27) // 2, 0, 27, 20)


def test_training_batches_are_a_function_of_seed_epoch_pass_row(folder):
    ds = load_dataset(_cfg(folder))
    n = len(ds.train_labels)
    batches = mesh_lib.epoch_batches(n, 16, 5, 0, 0, 2, True)
    a = list(ds.train_batches(batches, 5, 0, 0))
    assert [x.shape for x in a] == [(16, 24, 24, 3)] * len(batches)
    for idx, x in zip(batches[:2], a):  # = one image at a time, in the batch's order
        assert np.array_equal(x, np.stack([ds.train_example(r, 5, 0, 0) for r in idx]))
    assert len(batches) == n // 16 == 4  # 76 rows: 4 full batches (the rest dropped)

    def same(xs, ys):  # batch for batch, and as many of them (zip alone would pass an empty stream)
        xs, ys = list(xs), list(ys)
        return len(xs) == len(ys) > 0 and all(np.array_equal(x, y) for x, y in zip(xs, ys))

    one = load_dataset(_cfg(folder, workers=1, prefetch=1))  # worker count and prefetch change nothing
    assert same(a, one.train_batches(batches, 5, 0, 0))
    grained = load_dataset(_cfg(folder, loader="grain"))  # nor does the loader (grain's MapDataset)
    assert same(a, grained.train_batches(batches, 5, 0, 0))
    g2 = list(grained.train_batches(batches[2:], 5, 0, 0, process_index=1, process_count=2))
    assert [x.shape for x in g2] == [(8, 24, 24, 3)] * 2  # process 1 of 2: the second half of each batch
    assert same(g2, [y[8:] for y in a[2:]])
    grained.close()
    assert same(a[2:], ds.train_batches(batches[2:], 5, 0, 0))  # a resumed pass starts at its batch
    other = list(ds.train_batches(batches, 5, 1, 0))  # another epoch: other crops and flips of the same rows
    assert [x.shape for x in other] == [(16, 24, 24, 3)] * len(batches)
    assert not any(np.array_equal(x, y) for x, y in zip(a, other))
    assert not np.array_equal(ds.train_example(0, 5, 0, 0), ds.train_example(0, 6, 0, 0))
    ds.close()
    one.close()


def test_each_process_decodes_only_its_own_rows(folder):
    ds = load_dataset(_cfg(folder))
    batches = mesh_lib.epoch_batches(len(ds.train_labels), 12, 0, 0, 0, 4, True)[:3]
    full = list(ds.train_batches(batches, 0, 0, 0))
    read = []
    real_read = ds._train.read
    ds._train.read = lambda i: read.append(i) or real_read(i)
    parts = [list(ds.train_batches(batches, 0, 0, 0, pid, 3)) for pid in range(3)]
    for b, idx in enumerate(batches):  # process p: rows 4p .. 4p + 3 of each global batch, as shard_batch slices
        assert np.array_equal(np.concatenate([parts[p][b] for p in range(3)]), full[b])
    assert sorted(read) == sorted(np.concatenate(batches).tolist())  # every row read once, by its process
    ds.close()


def test_unreadable_file_is_named_or_skipped_and_counted(tmp_path):
    root = _write_folder(str(tmp_path / "f"), np.random.default_rng(2), per_class=3, val_per_class=1)
    bad = os.path.join(root, "train", CLASSES[1], "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
    ds = load_dataset(_cfg(root))
    row = [n.decode() for n in ds._train.names].index(os.path.join(CLASSES[1], "broken.jpg"))
    batches = [np.array([0, row, 2])]
    with pytest.raises(streaming.UnreadableImageError, match="broken.jpg"):
        list(ds.train_batches(batches, 0, 0, 0))
    ds.close()
    ds = load_dataset(_cfg(root, skip_unreadable=True))
    (x,) = list(ds.train_batches(batches, 0, 0, 0))
    assert np.all(x[1] == 0) and x[0].any() and x[2].any()
    assert ds.skipped == {bad}
    ds.close()
    os.makedirs(os.path.join(root, "train", "dog"))  # an empty class folder: refused, as torchvision does
    with pytest.raises(DatasetNotFoundError, match="class folder 'dog' holds no image files"):
        load_dataset(_cfg(root))


@pytest.mark.timeout(120)
def test_grain_worker_processes_give_the_same_batches_and_report_skipped_files(tmp_path):
    """data.processes=2 (grain worker processes, one batch per element): the thread pool's batches, per process
    too; an unreadable file is skipped in a worker and named in the parent; an unreadable file without
    skip_unreadable stops the run with the one-line error naming it."""
    root = _write_folder(str(tmp_path / "f"), np.random.default_rng(3), per_class=4, val_per_class=1)
    bad = os.path.join(root, "train", CLASSES[2], "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    threads = load_dataset(_cfg(root, skip_unreadable=True))
    procs = load_dataset(_cfg(root, skip_unreadable=True, loader="grain", processes=2))
    batches = mesh_lib.epoch_batches(len(threads.train_labels), 6, 1, 2, 0, 2, False)
    a = list(threads.train_batches(batches, 1, 2, 0))
    b = list(procs.train_batches(batches, 1, 2, 0))
    assert len(b) == len(a) and all(np.array_equal(x, y) for x, y in zip(a, b))
    half = list(procs.train_batches(batches, 1, 2, 0, process_index=1, process_count=2))
    assert all(np.array_equal(x, y[len(y) // 2:]) for x, y in zip(half, a))
    assert procs.skipped == threads.skipped == {bad}
    assert procs.decoded["train"] == sum(len(i) for i in batches) + sum(len(i) // 2 for i in batches)
    strict = load_dataset(_cfg(root, loader="grain", processes=2))
    with pytest.raises(streaming.UnreadableImageError, match="broken.jpg"):  # the worker's error, as it was
        list(strict.train_batches(batches, 1, 2, 0))
    with pytest.raises(ConfigError, match="needs data.loader='grain'"):
        load_dataset(_cfg(root, processes=2))
    for ds in (threads, procs, strict):
        ds.close()


def test_tfds_imagenet2012_through_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = load_dataset(ml_collections.ConfigDict(dict(name="imagenet2012", image_size=16, workers=2)))
        assert isinstance(ds, streaming.StreamingDataset) and ds.num_classes == 1000
        assert len(ds.train_labels) == 20 and len(ds.test_labels) == 20
        assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 1000
        x = next(ds.train_batches([np.arange(8)], 0, 0, 0))
        assert x.shape == (8, 16, 16, 3) and x.dtype == np.uint8 and x.any()
        assert np.array_equal(x, next(ds.train_batches([np.arange(8)], 0, 0, 0)))
        assert ds.test_images[np.arange(5)].shape == (5, 16, 16, 3)
        ds.close()


def test_imagenet_config_recipe_and_overrides():
    from configs import imagenet

    c = imagenet.get_config("resnet34,resnet18,kd,mas")
    assert (c.teacher.arch, c.student.arch) == ("resnet34_imagenet", "resnet18_imagenet")
    assert c.student.batch_size == 256 and c.student.optimizer.lr == 0.1 and c.student.epochs == 100
    assert c.student.optimizer.milestones == (30, 60, 90) and c.student.optimizer.weight_decay == 1e-4
    kd = c.students.kd_mas
    assert kd.temperature == 1.0 and (kd.weights.ce, kd.weights.logit_kd) == (0.5, 0.5)
    assert c.augment.pad == 0 and not c.augment.flip and c.data.flip and c.precision == "bfloat16"
    assert tuple(map(tuple, c.granularities)) == ((512, 2.0), (2048, 8.0))
    c2 = imagenet.get_config("resnet50,mobilenetv1,crd,all")
    assert sorted(c2.students) == ["crd_mag", "crd_mas", "crd_none"] and c2.student.arch == "mobilenetv1_imagenet"
    from configs import cifar100
    assert cifar100.get_config().augment.pad == 4  # CIFAR's recipe untouched


def test_each_process_reads_only_its_own_evaluation_rows(folder, monkeypatch):
    """Evaluation batches (mesh.local_rows, used by every evaluator): process p reads only its slice of each padded
    global batch, and the slices put together are the single-process batch."""
    ds = load_dataset(_cfg(folder))
    images, labels = ds.test_images, ds.test_labels  # 18 images: batches of 12, the second padded by 6
    read = []
    real_read = ds._test.read
    ds._test.read = lambda i: read.append(i) or real_read(i)
    one = [mesh_lib.local_rows(images, labels, np.arange(s, s + 12)) for s in (0, 12)]
    assert read and sorted(read) == list(range(18))
    assert one[1]["mask"].tolist() == [1] * 6 + [0] * 6 and not one[1]["image"][6:].any()
    for pid in range(3):
        monkeypatch.setattr(mesh_lib.jax, "process_count", lambda: 3)
        monkeypatch.setattr(mesh_lib.jax, "process_index", lambda p=pid: p)
        read.clear()
        for s, whole in zip((0, 12), one):
            mine = mesh_lib.local_rows(images, labels, np.arange(s, s + 12))
            for k in whole:
                assert np.array_equal(mine[k], whole[k][4 * pid:4 * pid + 4]), (pid, s, k)
        expected = [r for s in (0, 12) for r in range(s + 4 * pid, s + 4 * pid + 4) if r < 18]
        assert sorted(read) == expected  # only its own rows, padding not read
    ds.close()
