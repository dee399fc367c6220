"""The epoch loop shared by all stages: shuffled passes, jitted steps, evaluation, metrics, checkpoints, resume.

A stage hands the loop:
* ``state`` (a pytree that the steps update) and ``frozen`` (arrays the steps read, e.g. the teacher);
* ``passes``: ``[(label, jitted_step)]``, each one full shuffled pass over the training data per epoch
  (``step(state, frozen, batch, key) -> (state, metrics)``);
* ``evaluate(state) -> metrics`` and ``improve(best, metrics) -> (best, improved_keys)``;
* ``export(state, previous_export, improved_keys) -> export``: the stage's product, saved as ``best``.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import StageCheckpoints
from mgd_jax.train.metrics import MetricWriter, check_finite


@dataclasses.dataclass
class StageSpec:
    name: str
    directory: str
    num_epochs: int
    batch_size: int
    seed: int
    meta: dict  # identifies the setup (architecture, ...); checked on resume
    passes: list
    evaluate: Callable[[Any], dict]
    improve: Callable[[dict, dict], tuple[dict, list]]
    export: Callable[[Any, Any, list], Any]
    drop_remainder: bool = False
    progress: bool = True
    batch_extras: Callable | None = None  # (indices, epoch, pass, step) -> extra batch arrays (CRD's indices)


def evaluate_dataset(eval_fn: Callable, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> dict:
    """Runs ``eval_fn(batch) -> {name: sum}`` over padded batches; returns dataset-level means."""
    n, ndev = len(labels), mesh.devices.size
    bs = int(np.ceil(batch_size / ndev) * ndev)
    totals = None
    for start in range(0, n, bs):
        idx = np.arange(start, min(n, start + bs))
        pad = bs - len(idx)
        img = images[idx]
        lab = labels[idx]
        mask = np.ones(len(idx), np.float32)
        if pad:
            img = np.concatenate([img, np.zeros((pad,) + img.shape[1:], img.dtype)])
            lab = np.concatenate([lab, np.zeros(pad, lab.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        counts = eval_fn(mesh_lib.shard_batch({"image": img, "label": lab, "mask": mask}, mesh))
        totals = counts if totals is None else jax.tree.map(lambda a, b: a + b, totals, counts)
    return {k: float(v) / n for k, v in jax.device_get(totals).items()}


def _mean_metrics(acc: list[tuple[int, dict]]) -> dict:
    if not acc:
        return {}
    host = jax.device_get([m for _, m in acc])
    w = np.asarray([n for n, _ in acc], np.float64)
    return {k: float(np.sum(w * np.asarray([m[k] for m in host], np.float64)) / w.sum()) for k in host[0]}


def fit(spec: StageSpec, state, frozen, dataset, mesh, export_like) -> tuple[Any, Any, dict]:
    """Train (or resume, or skip if finished) one stage. Returns (state, export, {'best', 'last', 'history'})."""
    ckpt = StageCheckpoints(f"{spec.directory}/checkpoints")
    writer = MetricWriter(spec.directory)
    try:
        return _fit(spec, state, frozen, dataset, mesh, export_like, ckpt, writer)
    finally:
        writer.close()
        ckpt.close()


def _fit(spec, state, frozen, dataset, mesh, export_like, ckpt, writer):
    from mgd_jax.train.checkpoint import check_meta

    start_epoch, best, export, last = 0, {}, None, {}
    meta = ckpt.latest_meta()
    if meta is not None:
        check_meta(meta, spec.meta, f"{spec.directory}/checkpoints/latest")
        best, last = dict(meta["best"]), dict(meta.get("last", {}))
        if meta.get("imported") or int(meta["epoch"]) >= spec.num_epochs:
            if ckpt.best_meta() is None:
                raise FileNotFoundError(f"{spec.directory}/checkpoints/best is missing for a finished stage")
            export, _ = ckpt.restore_best(export_like)
            how = "imported" if meta.get("imported") else f"finished earlier ({meta['epoch']} epochs)"
            print(f"[{spec.name}] {how}: using {spec.directory}/checkpoints/best", flush=True)
            return state, export, {"best": best, "last": last}
        restored, meta = ckpt.restore_latest(jax.device_get(state))
        state = mesh_lib.replicate(restored, mesh)
        start_epoch = int(meta["epoch"])
        if ckpt.best_meta() is not None:
            export, _ = ckpt.restore_best(export_like)
        print(f"[{spec.name}] resuming after epoch {start_epoch}/{spec.num_epochs}", flush=True)
    writer.truncate_after(start_epoch)

    n, ndev = len(dataset.train_labels), mesh.devices.size
    if spec.batch_size % ndev:
        raise ValueError(f"batch_size {spec.batch_size} is not divisible by the {ndev} devices of the mesh")
    steps = mesh_lib.steps_per_epoch(n, spec.batch_size, ndev, spec.drop_remainder)
    total = steps * len(spec.passes) * spec.num_epochs
    bar = tqdm(total=total, initial=steps * len(spec.passes) * start_epoch, desc=spec.name, unit="step",
               disable=not (spec.progress and sys.stdout.isatty()), dynamic_ncols=True, file=sys.stdout,
               mininterval=1.0)
    stage_key = jax.random.key(spec.seed)
    try:
        for epoch in range(start_epoch, spec.num_epochs):
            t0 = time.time()
            train_metrics = {}
            for p, (label, step) in enumerate(spec.passes):
                base_key = mesh_lib.replicate(jax.random.fold_in(stage_key, p), mesh)
                acc = []
                for i, idx in enumerate(mesh_lib.epoch_batches(n, spec.batch_size, spec.seed, epoch, p, ndev,
                                                               spec.drop_remainder)):
                    rows = {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}
                    if spec.batch_extras is not None:
                        rows.update(spec.batch_extras(idx, epoch, p, i))
                    batch = mesh_lib.shard_batch(rows, mesh)
                    state, m = step(state, frozen, batch, base_key)
                    acc.append((len(idx), m))
                    bar.update(1)
                    if i % 50 == 49 and not bar.disable:  # an occasional host sync for the display
                        bar.set_postfix(epoch=epoch + 1, **{k: f"{float(v):.3f}" for k, v in m.items()
                                                            if k.startswith("loss")})
                train_metrics.update({f"train/{k}": v for k, v in _mean_metrics(acc).items()})
            check_finite({k[len("train/"):]: v for k, v in train_metrics.items()}, spec.name, epoch)
            eval_metrics = {f"test/{k}": v for k, v in spec.evaluate(state).items()}
            metrics = {**train_metrics, **eval_metrics, "epoch_seconds": time.time() - t0}
            best, improved = spec.improve(best, eval_metrics, epoch)
            last = eval_metrics
            writer.write(epoch, metrics)
            if improved or export is None:
                export = jax.device_get(spec.export(state, export, improved))  # a host copy: state buffers are donated
                ckpt.save_best(epoch + 1, export, {**spec.meta, "epoch": epoch + 1, "best": best})
            ckpt.save_latest(epoch + 1, state, {**spec.meta, "epoch": epoch + 1, "best": best, "last": last})
            shown = {k.split("/", 1)[1]: f"{v:.4f}" for k, v in eval_metrics.items()}
            bar.set_postfix(epoch=epoch + 1, **shown)
            if bar.disable:
                print(f"[{spec.name}] epoch {epoch + 1}/{spec.num_epochs} " +
                      " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    finally:
        bar.close()
    return state, export, {"best": best, "last": last}
