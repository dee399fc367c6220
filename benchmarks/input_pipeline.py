"""ImageNet input pipeline and step speed.  Not a test.

    python benchmarks/input_pipeline.py                          # synthetic JPEG folder; tfds through mock_data
    python benchmarks/input_pipeline.py --folder=/data/imagenet --tfds_data_dir=~/tensorflow_datasets
    python benchmarks/input_pipeline.py --step_batch=256 --precision=bfloat16   # on a GPU / TPU

1. Input pipeline alone (``mgd_jax/data/streaming.py``): images/s of read + JPEG decode + RandomResizedCrop(224) +
   flip (train) and of resize 256 + centre crop 224 (eval), with 1 decoding thread (= per core) and with one
   thread per core, from an image folder (``--folder``, else a synthetic one: JPEGs of ImageNet's typical size,
   500x375 / 375x500, quality 90, with some texture) and from tfds ``imagenet2012`` (``--tfds_data_dir`` where it
   is built as ArrayRecord; else tfds' mock_data, whose records are random arrays: no JPEG decode, a lower
   bound of the per-record cost only).  Host memory: the process's RSS after streaming a quarter of the folder
   and after streaming all of it (it must not grow with the number of images).
2. One ResNet-34 -> ResNet-18 MAS+KD student step at 224x224, 1000 classes (the ImageNet config's granularities):
   images/s, % of the arithmetic ceiling (a large matmul's FLOP/s, as ``step_speed.py``), XLA memory, peak RSS.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for configs/ and mgd_jax

from mgd_jax.train import cpu  # noqa: E402

cpu.configure_host_devices()  # the same device setup as train.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mgd_jax.data import load_dataset  # noqa: E402
from mgd_jax.train import mesh as mesh_lib  # noqa: E402
from mgd_jax.train.loop import host_rss_mib  # noqa: E402


def synthetic_folder(root: str, n: int, classes: int = 4, seed: int = 0) -> str:
    """``n`` JPEGs (train) of ImageNet's typical size, some texture so they compress like photos; a few for val."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 8))):
        for k in range(count):
            d = os.path.join(root, split, f"c{k % classes}")
            os.makedirs(d, exist_ok=True)
            w, h = (500, 375) if k % 3 else (375, 500)
            low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
            img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"{k:06d}.JPEG"), quality=90)
    return root


def stream_rate(ds, n: int, batch: int, train: bool, skip: int = 1) -> float:
    """Steady images/s of streaming ``n`` images (train: ``train_batches``; eval: the test view's batches), timed
    after the first ``skip`` batches (a loader's start-up, e.g. grain's worker processes, once per epoch, is left out)."""
    rows = np.arange(n)
    batches = [rows[i:i + batch] for i in range(0, n - batch + 1, batch)]
    stream = ds.train_batches(batches, 0, 0, 0) if train else (ds.test_images[idx] for idx in batches)
    skip = min(skip, len(batches) - 1)
    for _ in range(skip):
        next(stream)
    t0 = time.perf_counter()
    for _ in stream:
        pass
    return (len(batches) - skip) * batch / (time.perf_counter() - t0)


def pipeline_rows(cfg_base: dict, label: str, n_train: int, n_test: int, batch: int, counts) -> list:
    rows = []
    for workers in counts:
        extra = {"processes": workers} if cfg_base.get("processes") else {}  # one decoding thread per process
        ds = load_dataset(ml_collections.ConfigDict({**cfg_base, "workers": workers, "prefetch": 4, **extra}))
        n_tr, n_te = min(n_train, len(ds.train_labels)), min(n_test, len(ds.test_labels))
        stream_rate(ds, n_tr, min(batch, n_tr // 4), True)  # warm: threads, the OS file cache (as in a long run)
        stream_rate(ds, n_te, min(batch, n_te // 4), False)
        tr = stream_rate(ds, n_tr, min(batch, n_tr // 4), True, skip=max(1, ds.processes))
        te = stream_rate(ds, n_te, min(batch, n_te // 4), False)
        ds.close()
        rows.append((label, workers, tr, tr / workers, te, te / workers))
        print(f"| {label} | {workers} | {tr:.0f} | {tr / workers:.0f} | {te:.0f} | {te / workers:.0f} |", flush=True)
    return rows


def linked_folder(root: str, source: str, n: int) -> str:
    """A training folder of ``n`` files, hard links (or copies) of ``source``'s training JPEGs under new names: as
    many files as a large dataset's shard, without writing them all."""
    src = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(source, "train")) for f in fs)
    for split, count in (("train", n), ("val", 4)):
        for k in range(count):
            d = os.path.join(root, split, f"c{k % 4}")
            os.makedirs(d, exist_ok=True)
            dst = os.path.join(d, f"{k:07d}.JPEG")
            try:
                os.link(src[k % len(src)], dst)
            except OSError:
                shutil.copyfile(src[k % len(src)], dst)
    return root


def rss_growth(folder: str, size: int, batch: int, workers: int | None = None) -> None:
    """Host RSS while one dataset streams every training image of ``folder`` (one pass, shuffled), read at 1/8, 1/4,
    1/2 and all of the pass: it must stay flat, whatever the number of images."""
    ds = load_dataset(ml_collections.ConfigDict(dict(name="imagenet2012", dir=folder, image_size=size, prefetch=4,
                                                     workers=workers)))
    n = len(ds.train_labels)
    batches = mesh_lib.epoch_batches(n, batch, 0, 0, 0, 1, True)
    marks = {max(1, len(batches) * k // 8) for k in (1, 2, 4, 8)}
    t0 = time.perf_counter()
    for i, _ in enumerate(ds.train_batches(batches, 0, 0, 0), 1):
        if i in marks:
            print(f"host RSS after streaming {i * batch} of {n} images: {host_rss_mib():.0f} MiB "
                  f"({i * batch / (time.perf_counter() - t0):.0f} images/s)", flush=True)
    ds.close()


def step_row(batch: int, steps: int, dtype_name: str) -> None:
    from benchmarks.step_speed import matmul_ceiling, time_step
    from configs import imagenet
    from mgd_jax import optim, precision
    from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
    from mgd_jax.methods import get_method
    from mgd_jax.models import get_model
    from mgd_jax.stages import student as student_stage

    mesh = mesh_lib.make_mesh()
    ndev = mesh.devices.size
    batch = -(-batch // ndev) * ndev
    cfg = imagenet.get_config("resnet34,resnet18,kd,mas")
    dtype = None if dtype_name == "float32" else jnp.bfloat16
    grans = parse_granularities(cfg.granularities)
    t_model = precision.with_compute_dtype(get_model("resnet34_imagenet", 1000), dtype)
    s_model = precision.with_compute_dtype(get_model("resnet18_imagenet", 1000), dtype)
    key = jax.random.key(0)
    sample = jnp.zeros((2, 224, 224, 3))
    t_vars = t_model.init(key, sample)
    feature_dim = t_model.apply(t_vars, sample)[1][-1].shape[-1]
    analyzer = GranularityAnalyzer(grans, 1000)
    teacher = mesh_lib.replicate({"backbone": t_vars, "analyzer": analyzer.init(key, jnp.zeros((1, feature_dim)))
                                  ["params"]}, mesh)
    run = cfg.students.kd_mas
    t_mods = student_stage.TeacherModules(t_model, analyzer)
    s_mods = student_stage.StudentModules(s_model, GranularityAnalyzer(grans, 1000, False), get_method("kd"))
    objective = student_stage.Objective("mas", grans, temperature=run.temperature, w_ce=run.weights.ce,
                                        w_logit_kd=run.weights.logit_kd)
    tx = optim.sgd(cfg.student.optimizer, 5000)
    state = mesh_lib.replicate(student_stage.init_state(s_mods, t_mods, jax.device_get(teacher), tx, key, sample),
                               mesh)
    step = jax.jit(student_stage.make_train_step(s_mods, t_mods, objective, tx, cfg.augment), donate_argnums=0)
    rng = np.random.default_rng(0)
    batches = [mesh_lib.shard_batch({"image": rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8),
                                     "label": rng.integers(0, 1000, batch).astype(np.int32)}, mesh) for _ in range(2)]
    base = mesh_lib.replicate(jax.random.key(1), mesh)
    ceiling = matmul_ceiling()
    r = time_step(step, state, lambda b: (teacher, b, base), batches, steps)
    dt = r["ms"] / 1000
    pct = None if r["flops"] is None else 100 * r["flops"] / dt / ceiling
    peak = f" / device peak {r['device_peak_mib']:.0f}" if r["device_peak_mib"] else ""
    print("| step | devices | batch | precision | images/s | % ceiling | ms/step | GFLOP/image | compile s | "
          "XLA memory MiB | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| resnet34 -> resnet18 MAS+KD, 224 | {ndev} x {jax.devices()[0].platform} | {batch} | {dtype_name} | "
          f"{batch / dt:.1f} | {'-' if pct is None else f'{pct:.0f}'} | {r['ms']:.0f} | "
          f"{(r['flops'] or 0) / batch / 1e9:.1f} | {r['compile_s']:.1f} | {r['xla_memory_mib']:.0f}{peak} | "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", help="an image folder (train/, val/); default: a synthetic one in a temporary folder")
    p.add_argument("--images", type=int, default=512, help="synthetic folder: training images")
    p.add_argument("--tfds_data_dir", help="where tfds imagenet2012 is built (ArrayRecord); default: mock_data")
    p.add_argument("--rss_images", type=int, default=8192,
                   help="host memory check: stream a folder of this many files (hard links of the synthetic JPEGs)")
    p.add_argument("--threads", help="comma list of decoding thread / process counts (default: 1 and one per core)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64, help="input pipeline batch")
    p.add_argument("--step_batch", type=int, default=16, help="the MAS+KD step's global batch (0: skip the step)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--loader", default="threads",
                   help="comma list of threads (the thread pool), grain (grain, threads), processes (grain, one worker "
                        "process per thread: data.processes)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    counts = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, cores})

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or synthetic_folder(os.path.join(tmp, "images"), args.images)
        what = args.folder or f"synthetic: {args.images} JPEGs 500x375, q90"
        print(f"## input pipeline at {args.size} ({cores} cores)\n\n| source | threads | train images/s | per thread | "
              f"eval images/s | per thread |\n|---|---|---|---|---|---|", flush=True)
        for loader in args.loader.split(","):
            kind = dict(loader="grain", processes=1) if loader == "processes" else dict(loader=loader)
            pipeline_rows(dict(name="imagenet2012", dir=folder, image_size=args.size, **kind),
                          f"folder ({what}), {'grain worker processes' if loader == 'processes' else loader}",
                          args.images if not args.folder else 2048, 512, args.batch, counts)
        if args.tfds_data_dir:
            pipeline_rows(dict(name="imagenet2012", data_dir=args.tfds_data_dir, image_size=args.size),
                          "tfds imagenet2012", 2048, 512, args.batch, counts)
        else:
            try:
                import tensorflow_datasets as tfds
            except ImportError:
                tfds = None
                print("| tfds imagenet2012 | - | tensorflow-datasets is not installed | | | |")
        if not args.tfds_data_dir and tfds is not None:
            with tfds.testing.mock_data(num_examples=args.batch * 4, policy=tfds.testing.MockPolicy.USE_CODE):
                pipeline_rows(dict(name="imagenet2012", image_size=args.size), "tfds imagenet2012 (mock_data: random "
                              "arrays, no JPEG decode)", args.batch * 4, args.batch * 4, args.batch, counts)
        print()
        big = linked_folder(os.path.join(tmp, "many"), folder, args.rss_images)
        rss_growth(big, args.size, args.batch)
    if args.step_batch:
        print()
        step_row(args.step_batch, args.steps, args.precision)


if __name__ == "__main__":
    main()
