"""The epoch loop shared by all stages: shuffled passes, jitted steps, evaluation, metrics, checkpoints, resume.

A stage hands the loop:
* ``state`` (a pytree that the steps update) and ``frozen`` (arrays the steps read, e.g. the teacher);
* ``passes``: ``[(label, jitted_step)]``, each one full shuffled pass over the training data per epoch
  (``step(state, frozen, batch, key) -> (state, metrics)``);
* ``evaluate(state) -> metrics`` and ``improve(best, metrics) -> (best, improved_keys)``;
* ``export(state, previous_export, improved_keys) -> export``: the stage's product, saved as ``best``.

Data path: by default each step's rows are gathered on the host and placed on the mesh.  With
``on_device=True`` the training images and labels are put on every device once per stage and each step
receives only the batch's row indices; the rows are gathered inside the jitted step (augmentation runs there
already), so the step needs nothing from the host but 4 bytes per image.  Metrics stay on the device until
the loop fetches them in groups (at checkpoints and epoch ends), so no step waits for the host.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from mgd_jax.train import faults
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import StageCheckpoints
from mgd_jax.train.metrics import MetricWriter, NonFiniteLossError, check_finite


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
    checkpoint_every_steps: int = 0  # also checkpoint inside an epoch (0: at epoch ends only)
    keep_checkpoints: int = 2
    on_device: bool = False  # training data resident on the devices, batches gathered inside the step
    # (like) -> (like in an earlier version's checkpoint layout, convert to like's): resumes old workdirs
    legacy_layout: Callable | None = None


def host_rss_mib() -> float:
    """This process's resident memory now (Linux /proc), else its peak so far; logged every epoch."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ROWS = "rows"  # on_device: the batch's row indices into the device-resident training set


def gather_rows(step: Callable) -> Callable:
    """``step(state, frozen, batch, key)`` -> the same step fed by row indices into device-resident data.

    The rows travel under their own key, so the rest of the batch (CRD's ``index`` and ``contrast_idx``) reaches
    the step unchanged."""

    def step_on_device(state, frozen, batch, key, data):
        batch = dict(batch)
        idx = batch.pop(ROWS)
        return step(state, frozen, {"image": data["image"][idx], "label": data["label"][idx], **batch}, key)

    return jax.jit(step_on_device, donate_argnums=0)


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


def _first_nonfinite(pending: list[tuple[int, int, dict]]):
    """pending: [(global step, batch size, device metrics)] -> (step, name, value) of the first non-finite loss
    term or gradient norm (a NaN gradient can leave the loss finite while it turns the parameters into NaN)."""
    host = jax.device_get([m for _, _, m in pending])
    for (gstep, _, _), m in zip(pending, host):
        for k, v in m.items():
            parts = k.split("/")  # 'loss/ce', 'grad_norm/16d_T2', 'peer0/grad_norm' (mutual learning)
            if (parts[0] == "loss" or "grad_norm" in parts) and not np.isfinite(v):
                return gstep, k, float(v)
    return None


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves])) if leaves \
        else jax.numpy.bool_(True)


class _Accumulator:
    """Batch-size-weighted sums of one pass's step metrics, kept on the host (saved with mid-epoch checkpoints)."""

    def __init__(self, sums=None, count=0):
        self.sums, self.count = dict(sums or {}), int(count)

    def add(self, pending):
        host = jax.device_get([m for _, _, m in pending])
        for (_, n, _), m in zip(pending, host):
            for k, v in m.items():
                self.sums[k] = self.sums.get(k, 0.0) + n * float(v)
            self.count += n

    def means(self):
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}


def fit(spec: StageSpec, state, frozen, dataset, mesh, export_like) -> tuple[Any, Any, dict]:
    """Train (or resume, or skip if finished) one stage. Returns (state, export, {'best', 'last'})."""
    ckpt = StageCheckpoints(f"{spec.directory}/checkpoints", keep=spec.keep_checkpoints, name=spec.name)
    writers = []  # opened once the resume point is known
    try:
        return _fit(spec, state, frozen, dataset, mesh, export_like, ckpt, writers)
    finally:
        for w in writers:
            w.close()
        ckpt.close()


def _fit(spec, state, frozen, dataset, mesh, export_like, ckpt, writers):
    from mgd_jax.train.checkpoint import check_meta

    n, ndev = len(dataset.train_labels), mesh.devices.size
    if spec.batch_size % ndev:
        raise ValueError(f"batch_size {spec.batch_size} is not divisible by the {ndev} devices of the mesh")
    steps = mesh_lib.steps_per_epoch(n, spec.batch_size, ndev, spec.drop_remainder)
    npass = len(spec.passes)

    start_epoch, start_pass, start_batch, best, export, last = 0, 0, 0, {}, None, {}
    done_passes, acc = {}, _Accumulator()
    meta = ckpt.latest_meta()
    if meta is not None:
        check_meta(meta, spec.meta, f"{spec.directory}/checkpoints/latest")
        best, last = dict(meta["best"]), dict(meta.get("last", {}))
        if meta.get("imported") or (int(meta["epoch"]) >= spec.num_epochs and not meta.get("position")):
            if ckpt.best_meta() is None:
                raise FileNotFoundError(f"{spec.directory}/checkpoints/best is missing for a finished stage")
            export, _ = ckpt.restore_best(export_like, spec.legacy_layout)
            how = "imported" if meta.get("imported") else f"finished earlier ({meta['epoch']} epochs)"
            print(f"[{spec.name}] {how}: using {spec.directory}/checkpoints/best", flush=True)
            return state, export, {"best": best, "last": last}
        restored, meta = ckpt.restore_latest(jax.device_get(state), spec.legacy_layout)
        state = mesh_lib.replicate(restored, mesh)
        start_epoch = int(meta["epoch"])
        pos = meta.get("position")
        if pos:
            start_pass, start_batch = int(pos["pass"]), int(pos["batch"])
            done_passes = dict(pos["done_passes"])
            acc = _Accumulator(pos["sums"], pos["count"])
        if ckpt.best_meta() is not None:
            export, _ = ckpt.restore_best(export_like, spec.legacy_layout)
        where = f"at epoch {start_epoch + 1}, pass {start_pass + 1}, batch {start_batch}" if pos else \
            f"after epoch {start_epoch}/{spec.num_epochs}"
        print(f"[{spec.name}] resuming {where}", flush=True)
    writer = None
    if jax.process_index() == 0:  # a redone epoch's rows are dropped: each epoch is logged once
        writer = MetricWriter(spec.directory, start_epoch=start_epoch)
        writers.append(writer)

    total = steps * npass * spec.num_epochs
    done = (start_epoch * npass + start_pass) * steps + start_batch
    bar = tqdm(total=total, initial=done, desc=spec.name, unit="step",
               disable=not (spec.progress and sys.stdout.isatty() and jax.process_index() == 0),
               dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
    stage_key = jax.random.key(spec.seed)
    every = int(spec.checkpoint_every_steps or 0)
    if spec.on_device:
        data = mesh_lib.replicate({"image": dataset.train_images, "label": dataset.train_labels}, mesh)
        passes = [(label, gather_rows(step)) for label, step in spec.passes]
    else:
        data, passes = None, spec.passes

    def flush(pending, epoch, p, i):
        if not pending:
            return
        bad = _first_nonfinite(pending)
        if bad is not None:
            gstep, term, value = bad
            what = "gradient norm" if "grad_norm" in term.split("/") else "loss term"
            raise NonFiniteLossError(
                f"{spec.name}: {what} {term!r} became {value} at step {gstep} (epoch {epoch + 1}); stopped, "
                f"the last good checkpoint stays the latest")
        acc.add(pending)
        pending.clear()

    def save_latest(gstep, epoch, meta, point):
        """The latest checkpoint, only of finite parameters / statistics (never a NaN 'last good' state)."""
        if not bool(_all_finite(state)):
            raise NonFiniteLossError(
                f"{spec.name}: the trained state became non-finite by step {gstep} (epoch {epoch + 1}) although "
                f"every logged loss and gradient norm was finite; stopped, the last good checkpoint stays the latest")
        faults.point(spec.name, f"before_{point}")
        ckpt.save_latest(gstep, state, meta)
        faults.point(spec.name, f"after_{point}")

    try:
        for epoch in range(start_epoch, spec.num_epochs):
            t0 = time.time()
            for p in range(start_pass if epoch == start_epoch else 0, npass):
                label, step = passes[p]
                base_key = mesh_lib.replicate(jax.random.fold_in(stage_key, p), mesh)
                batches = mesh_lib.epoch_batches(n, spec.batch_size, spec.seed, epoch, p, ndev, spec.drop_remainder)
                first = start_batch if (epoch == start_epoch and p == start_pass) else 0
                pending = []
                for i in range(first, len(batches)):
                    idx = batches[i]
                    if data is None:
                        rows = {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}
                    else:
                        rows = {ROWS: idx.astype(np.int32)}
                    if spec.batch_extras is not None:
                        rows.update(spec.batch_extras(idx, epoch, p, i))
                    args = (state, frozen, mesh_lib.shard_batch(rows, mesh), base_key)
                    state, m = step(*args) if data is None else step(*args, data)
                    gstep = (epoch * npass + p) * steps + i + 1
                    pending.append((gstep, len(idx), m))
                    bar.update(1)
                    if every and gstep % every == 0 and i + 1 < len(batches):
                        flush(pending, epoch, p, i)
                        save_latest(gstep, epoch, {
                            **spec.meta, "epoch": epoch, "best": best, "last": last,
                            "position": {"pass": p, "batch": i + 1, "done_passes": done_passes,
                                         "sums": acc.sums, "count": acc.count}}, "mid")
                    if i % 50 == 49 and not bar.disable:  # an occasional host sync for the display
                        bar.set_postfix(epoch=epoch + 1, **{k: f"{float(v):.3f}" for k, v in m.items()
                                                            if k.startswith("loss")})
                flush(pending, epoch, p, len(batches) - 1)
                done_passes.update({f"train/{k}": v for k, v in acc.means().items()})
                acc = _Accumulator()
            train_metrics, done_passes = done_passes, {}
            check_finite({k[len("train/"):]: v for k, v in train_metrics.items()}, spec.name, epoch)
            eval_metrics = {f"test/{k}": v for k, v in spec.evaluate(state).items()}
            metrics = {**train_metrics, **eval_metrics, "epoch_seconds": time.time() - t0,
                       "host_rss_mib": host_rss_mib()}
            best, improved = spec.improve(best, eval_metrics, epoch)
            last = eval_metrics
            if writer is not None:
                writer.write(epoch, metrics)
            if improved or export is None:
                export = jax.device_get(spec.export(state, export, improved))  # a host copy: state buffers are donated
                if not bool(_all_finite(export)):
                    raise NonFiniteLossError(f"{spec.name}: the stage's product became non-finite in epoch "
                                             f"{epoch + 1}; stopped, the last good checkpoint stays the latest")
                faults.point(spec.name, "before_best")
                ckpt.save_best(epoch + 1, export, {**spec.meta, "epoch": epoch + 1, "best": best})
                faults.point(spec.name, "after_best")
            save_latest((epoch + 1) * npass * steps, epoch,
                        {**spec.meta, "epoch": epoch + 1, "best": best, "last": last}, "latest")
            shown = {k.split("/", 1)[1]: f"{v:.4f}" for k, v in eval_metrics.items()}
            bar.set_postfix(epoch=epoch + 1, **shown)
            if bar.disable and jax.process_index() == 0:
                print(f"[{spec.name}] epoch {epoch + 1}/{spec.num_epochs} " +
                      " ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    finally:
        bar.close()
    return state, export, {"best": best, "last": last}
