"""The epoch loop shared by all stages: shuffled passes, jitted steps, evaluation, metrics, checkpoints, resume.

A stage hands the loop:
* ``state`` (a pytree that the steps update), or ``Fresh(make)``: the state made only if the stage starts from
  scratch (a resumed stage is restored onto its shapes, a finished one needs none); ``frozen`` (arrays the steps
  read, e.g. the teacher);
* ``passes``: ``[(label, jitted_step)]``, each one full shuffled pass over the training data per epoch
  (``step(state, frozen, batch, key) -> (state, metrics)``);
* ``evaluate(state) -> metrics`` and ``improve(best, metrics) -> (best, improved_keys)``;
* ``export(state, previous_export, improved_keys) -> export``: the stage's product, saved as ``best``.

Data path: by default each step's rows are gathered on the host and placed on the mesh.  With
``on_device=True`` the training images and labels are put on every device once per stage and each step
receives only the batch's row indices; the rows are gathered inside the jitted step (augmentation runs there
already), so the step needs nothing from the host but 4 bytes per image.  A streaming dataset (``streaming = True``:
ImageNet, image folders; ``mgd_jax/data/streaming.py``) decodes and augments each step's rows on host threads,
prefetched, every process only its own slice of the batch.  Metrics stay on the device until
the loop fetches them in groups (at checkpoints and epoch ends), so no step waits for the host; the first step of
each pass (and the first evaluation) is the exception, timed once to say how long it compiled (``train/progress.py``:
the lines and the bar a person watching sees).
A preemption notice (SIGTERM; ``train/preemption.py``) saves the latest checkpoint at the next step boundary on
every process and raises ``preemption.Preempted``: the restart redoes no step.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax.errors import ConfigError
from mgd_jax.train import faults
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train import preemption
from mgd_jax.train.checkpoint import StageCheckpoints
from mgd_jax.train.metrics import MetricWriter, NonFiniteLossError, check_finite
from mgd_jax.train.progress import Progress, epoch_lines


class Fresh:
    """A stage's initial state, made (``make()``; the loop replicates it over the mesh) only when the stage starts
    from scratch.  A resumed stage is restored onto its shapes (``jax.eval_shape``: traced, not run) and a
    finished one reads only its best export, so a rerun does not initialise a model it then overwrites (eager
    initialisation runs a small program per parameter: 1-2 s for a small CIFAR ResNet in a new process).
    ``export_like(shapes)``: the structure of the stage's export, from the state's shapes."""

    def __init__(self, make: Callable[[], Any], export_like: Callable[[Any], Any]):
        self.make, self.export_like = make, export_like
        self._shapes = None

    def shapes(self):
        if self._shapes is None:
            self._shapes = jax.eval_shape(self.make)
        return self._shapes


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
    lr: Callable[[int], float] | None = None  # the 0-based epoch's learning rate, for the epoch line (None: not shown)


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


# While the loop times a stage's first evaluation: the seconds of each evaluation's first (compiling) batch.
_first_eval_batches: list | None = None


def evaluate_dataset(eval_fn: Callable, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> dict:
    """Runs ``eval_fn(batch) -> {name: sum}`` over padded batches; returns dataset-level means."""
    n, ndev = len(labels), mesh.devices.size
    bs = int(np.ceil(batch_size / ndev) * ndev)
    totals = None
    for start in range(0, n, bs):
        rows = mesh_lib.local_rows(images, labels, np.arange(start, start + bs))  # this process's rows only
        t0 = time.perf_counter()
        counts = eval_fn(mesh_lib.shard_local_batch(rows, bs, mesh))
        if start == 0 and _first_eval_batches is not None:  # the batch that compiled: waited for once
            jax.block_until_ready(counts)
            _first_eval_batches.append(time.perf_counter() - t0)
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


def _host_finite(tree) -> bool:
    """Every float in ``tree`` is finite, checked with numpy (no program compiled for the tree's structure): host
    arrays, or arrays in host memory (the CPU backend's; one replica of each)."""
    for x in jax.tree.leaves(tree):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
            if not np.isfinite(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)).all():
                return False
    return True


def _state_finite(tree) -> bool:
    """Every float in ``tree`` (a state on the mesh) is finite.  On an accelerator a jitted reduction (``_all_finite``)
    reads it where it lives; on the CPU, where the arrays are in host memory already, numpy reads one replica of
    each, with no program compiled for the state's structure (~0.3 s for a CIFAR ResNet's state), unless a leaf is
    sharded (the jitted reduction then sees every shard, and every process gets the same answer)."""
    replicated = all(x.is_fully_replicated for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))
    return _host_finite(tree) if jax.default_backend() == "cpu" and replicated else bool(_all_finite(tree))


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


def fit(spec: StageSpec, state, frozen, dataset, mesh, export_like=None) -> tuple[Any, Any, dict]:
    """Train (or resume, or skip if finished) one stage. Returns (state, export, {'best', 'last'}); ``state``: the
    initial state, or ``Fresh`` (then ``export_like`` comes from it; a finished stage returns it unmade)."""
    name = spec.name

    def one(step):
        def group_step(states, frozen, batch, key):
            new, metrics = step(states[name], frozen, batch, key)
            return {name: new}, {name: metrics}
        return group_step

    passes = [(label, one(step)) for label, step in spec.passes]
    extras = None if spec.batch_extras is None else \
        (lambda idx_of, *where: spec.batch_extras(idx_of[spec.seed], *where))
    states, exports, results = fit_group([spec], passes, {name: state}, frozen, dataset, mesh, {name: export_like},
                                         extras)
    return states[name], exports[name], results[name]


def committed_steps(spec: StageSpec) -> tuple[list[int], bool]:
    """-> (the committed ``latest`` steps of ``spec``'s stage, oldest first; whether the stage has finished)."""
    ck = StageCheckpoints(f"{spec.directory}/checkpoints", keep=spec.keep_checkpoints, name=spec.name)
    try:
        steps, meta = ck.latest_steps(), ck.latest_meta()
    finally:
        ck.close()
    finished = meta is not None and (bool(meta.get("imported")) or
                                     (int(meta["epoch"]) >= spec.num_epochs and not meta.get("position")))
    return steps, finished


def lockstep_groups(specs: list) -> list[tuple[list, int | None]]:
    """Split stages that should train in lockstep into groups that can: ``[(specs, resume_step)]``.

    A finished stage is alone (nothing to train).  The others resume together from the newest step all of them
    committed (a group killed between its members' saves of one step: the members ahead redo it exactly, a step
    saved already is kept), if every one has that step; a stage that would have to go back to the start while it
    has checkpoints trains with the stages at its own newest step instead."""
    info = {id(s): committed_steps(s) for s in specs}
    groups = [([s], None) for s in specs if info[id(s)][1]]
    rest = [s for s in specs if not info[id(s)][1]]
    while rest:
        shared = set.intersection(*[set(info[id(s)][0]) | {0} for s in rest])
        step = max(shared)
        members = [s for s in rest if step in info[id(s)][0] or (step == 0 and not info[id(s)][0])]
        if not members:  # no step in common: the stages at the newest point first
            newest = max(max(info[id(s)][0], default=0) for s in rest)
            members = [s for s in rest if max(info[id(s)][0], default=0) == newest]
            step = newest
        groups.append((members, step))
        rest = [s for s in rest if s not in members]
    return groups


class _Member:
    """One stage of a group: its checkpoints, metric writer, best epoch, export and running sums."""

    def __init__(self, spec: StageSpec, export_like, state):
        self.spec, self.export_like, self.initial = spec, export_like, state
        self.ckpt = StageCheckpoints(f"{spec.directory}/checkpoints", keep=spec.keep_checkpoints, name=spec.name)
        self.writer = None
        self.best, self.last, self.export = {}, {}, None
        self.done_passes, self.acc = {}, _Accumulator()
        self.evaluated = False  # its evaluation has compiled in this run

    def restore_like(self):
        """The structure its best export is restored onto: the one given, or a ``Fresh`` state's."""
        if self.export_like is not None:
            return self.export_like
        if isinstance(self.initial, Fresh):
            return self.initial.export_like(self.initial.shapes())
        raise TypeError(f"{self.spec.name}: restoring its best export needs export_like (or a loop.Fresh state)")

    def close(self, quietly: bool = False):
        """Close the metric writer and checkpoints; ``quietly`` (an error is on its way up already): a failure to
        close (a full disk flushing TensorBoard events) must not replace that error."""
        from mgd_jax.train.checkpoint import _is_disk_full, disk_full_error

        try:
            if self.writer is not None:
                self.writer.close()
        except OSError as e:
            if not quietly:
                if _is_disk_full(e):
                    raise disk_full_error(self.spec.directory, "while closing its metrics", e) from e
                raise
        finally:
            try:
                self.ckpt.close()
            except Exception:  # noqa: BLE001
                if not quietly:
                    raise


_SHARED_FIELDS = ("num_epochs", "batch_size", "drop_remainder", "checkpoint_every_steps", "on_device")


def data_orders(specs: list) -> list[int]:
    """The distinct seeds of a group's members, in member order: one data order (and augmentation key) each.  A
    group step receives each batch as ``mesh.interleave`` of one batch per seed, in this order, and its key as one
    key per seed (a single key where all members share one seed)."""
    return list(dict.fromkeys(spec.seed for spec in specs))


def fit_group(specs: list, passes: list, states: dict, frozen, dataset, mesh, export_likes: dict,
              batch_extras: Callable | None = None, resume_step: int | None = None) -> tuple[dict, dict, dict]:
    """Train several stages in lockstep, step for step: ``passes`` are ``[(label, step)]`` with
    ``step(states, frozen, batch, key) -> (states, {name: metrics})`` over ``states = {spec.name: state}``.  Each
    member keeps its own checkpoints, metrics, best epoch and export, as if it ran alone; all must share the data
    epochs and checkpoint cadence (``_SHARED_FIELDS``) and stand at the same point, or resume together from
    ``resume_step`` (``lockstep_groups``; 0: from the start).  Members may differ in seed: each seed is one data
    order, and the step receives one batch of every order (``data_orders``; the per-member rows and key are the
    same as alone).  ``batch_extras(idx_of, epoch, pass, step)``: ``idx_of`` maps each seed to its rows.
    ``states[name]`` may be ``Fresh`` (then ``export_likes`` need not name it).
    -> ({name: state}, {name: export}, {name: {'best', 'last'}})."""
    lead = specs[0]
    for spec in specs[1:]:
        for f in _SHARED_FIELDS:
            if getattr(spec, f) != getattr(lead, f):
                raise ValueError(f"fit_group: {spec.name} and {lead.name} differ in {f}")
    members = {}
    try:
        for spec in specs:
            members[spec.name] = _Member(spec, (export_likes or {}).get(spec.name), states[spec.name])
        out = _fit_group(lead, members, passes, states, frozen, dataset, mesh, batch_extras, resume_step)
    except BaseException:
        for m in members.values():
            m.close(quietly=True)
        raise
    for m in members.values():
        m.close()
    return out


def _resume(m: _Member, state, mesh, step=None):
    """-> (state, position or None, finished) of member ``m`` from its checkpoints (a fresh member as given), from
    its newest latest step or ``step`` (0: from the start)."""
    from mgd_jax.train.checkpoint import check_meta

    spec, ckpt = m.spec, m.ckpt
    meta = None if step == 0 else ckpt.latest_meta(step)
    if meta is None:
        return (mesh_lib.replicate(state.make(), mesh) if isinstance(state, Fresh) else state), (0, 0, 0), False
    check_meta(meta, spec.meta, f"{spec.directory}/checkpoints/latest")
    m.best, m.last = dict(meta["best"]), dict(meta.get("last", {}))
    if meta.get("imported") or (int(meta["epoch"]) >= spec.num_epochs and not meta.get("position")):
        if ckpt.best_meta() is None:
            raise FileNotFoundError(f"{spec.directory}/checkpoints/best is missing for a finished stage")
        m.export, _ = ckpt.restore_best(m.restore_like(), spec.legacy_layout)
        how = "imported" if meta.get("imported") else f"finished earlier ({meta['epoch']} epochs)"
        print(f"[{spec.name}] {how}: using {spec.directory}/checkpoints/best", flush=True)
        return state, None, True
    like = state.shapes() if isinstance(state, Fresh) else jax.device_get(state)
    restored, meta = ckpt.restore_latest(like, spec.legacy_layout, step)
    state = mesh_lib.replicate(restored, mesh)
    start = (int(meta["epoch"]), 0, 0)
    pos = meta.get("position")
    if pos:
        start = (start[0], int(pos["pass"]), int(pos["batch"]))
        m.done_passes = dict(pos["done_passes"])
        m.acc = _Accumulator(pos["sums"], pos["count"])
    if ckpt.best_meta() is not None:
        m.export, _ = ckpt.restore_best(m.restore_like(), spec.legacy_layout)
    where = f"at epoch {start[0] + 1}, pass {start[1] + 1}, batch {start[2]}" if pos else \
        f"after epoch {start[0]}/{spec.num_epochs}"
    print(f"[{spec.name}] resuming {where}", flush=True)
    return state, start, False


def _interleaved(streams: list, groups: int):
    """Streamed batches of several data orders (this process's rows of each) -> this process's rows of their
    ``mesh.interleave``d batches (``groups``: its devices); closing it closes every stream."""
    try:
        if len(streams) == 1:
            yield from streams[0]
        else:
            for parts in zip(*streams):
                yield mesh_lib.interleave(parts, groups)
    finally:
        for stream in streams:
            stream.close()


def _evaluate(m: _Member, state, progress: Progress) -> dict:
    """``m``'s evaluation of ``state``; its first in this run compiles: said, with the seconds of its compiling
    batches (``evaluate_dataset``'s first batch, waited for once; the whole evaluation if it has none)."""
    global _first_eval_batches
    if m.evaluated:
        return m.spec.evaluate(state)
    with progress.compiling(f"{m.spec.name} evaluation step") as timer:
        _first_eval_batches = []
        try:
            out = m.spec.evaluate(state)
            if _first_eval_batches:
                timer.seconds = sum(_first_eval_batches)
        finally:
            _first_eval_batches = None
    m.evaluated = True
    return out


def _fit_group(lead, members, passes, states, frozen, dataset, mesh, batch_extras, resume_step=None):
    n, ndev = len(dataset.train_labels), mesh.devices.size
    if lead.batch_size % ndev:  # every stage's global batch (the pipeline checks the main stages' up front)
        raise ConfigError(f"{lead.name}: batch_size={lead.batch_size}: the global batch must be divisible by the "
                          f"{ndev} devices of the mesh")
    steps = mesh_lib.steps_per_epoch(n, lead.batch_size, ndev, lead.drop_remainder)
    npass = len(passes)

    states, starts, finished = dict(states), {}, {}
    for name, m in members.items():
        states[name], starts[name], finished[name] = _resume(m, states[name], mesh, resume_step)
    if any(finished.values()):
        if not all(finished.values()):
            raise ValueError(f"fit_group: members at different points ({starts}); group them with lockstep_groups")
        return states, {k: m.export for k, m in members.items()}, {k: {"best": m.best, "last": m.last}
                                                                   for k, m in members.items()}
    if len(set(starts.values())) > 1:
        raise ValueError(f"fit_group: members at different points ({starts}); group them with lockstep_groups")
    start_epoch, start_pass, start_batch = next(iter(starts.values()))
    if jax.process_index() == 0:  # a redone epoch's rows are dropped: each epoch is logged once
        for m in members.values():
            m.writer = MetricWriter(m.spec.directory, start_epoch=start_epoch)

    total = steps * npass * lead.num_epochs
    done = (start_epoch * npass + start_pass) * steps + start_batch
    label = lead.name if len(members) == 1 else f"{len(members)} x {lead.name.split('/')[0]}"
    what = f"{lead.name} step" if len(members) == 1 else \
        f"fused step of {len(members)} {lead.name.split('/')[0]}s ({', '.join(members)})"
    progress = Progress(label, total, done, bar=lead.progress and sys.stdout.isatty())  # prints on process 0 only
    compiled = set()  # (pass, batch size) of the steps compiled in this run (the epoch's last batch may be smaller)
    seeds = data_orders([m.spec for m in members.values()])
    stage_keys = [jax.random.key(seed) for seed in seeds]
    every = int(lead.checkpoint_every_steps or 0)
    streaming = bool(getattr(dataset, "streaming", False))
    if lead.on_device and not streaming:
        data = mesh_lib.replicate({"image": dataset.train_images, "label": dataset.train_labels}, mesh)
        passes = [(lbl, gather_rows(step)) for lbl, step in passes]
    else:
        data = None

    def flush(pending, epoch):
        if not pending:
            return
        for name, m in members.items():
            mine = [(g, size, metrics[name]) for g, size, metrics in pending]
            bad = _first_nonfinite(mine)
            if bad is not None:
                gstep, term, value = bad
                what = "gradient norm" if "grad_norm" in term.split("/") else "loss term"
                raise NonFiniteLossError(
                    f"{m.spec.name}: {what} {term!r} became {value} at step {gstep} (epoch {epoch + 1}); stopped, "
                    f"the last good checkpoint stays the latest")
        for name, m in members.items():
            m.acc.add([(g, size, metrics[name]) for g, size, metrics in pending])
        pending.clear()

    def check_states(gstep, epoch):
        """Every member's parameters / statistics are finite, checked before any member saves (never a NaN 'last
        good' state, and the members of a group stop at the same point)."""
        for name, m in members.items():
            if not _state_finite(states[name]):
                raise NonFiniteLossError(
                    f"{m.spec.name}: the trained state became non-finite by step {gstep} (epoch {epoch + 1}) although "
                    f"every logged loss and gradient norm was finite; stopped, the last good checkpoint stays the "
                    f"latest")

    def save_latest(m, state, gstep, epoch, meta, point):
        faults.point(m.spec.name, f"before_{point}")
        m.ckpt.save_latest(gstep, state, meta)
        faults.point(m.spec.name, f"after_{point}")

    streamed = None
    try:
        for epoch in range(start_epoch, lead.num_epochs):
            t0 = time.time()
            for p in range(start_pass if epoch == start_epoch else 0, npass):
                _, step = passes[p]
                keys = [jax.random.fold_in(key, p) for key in stage_keys]
                base_key = mesh_lib.replicate(keys[0] if len(keys) == 1 else jnp.stack(keys), mesh)
                orders = [mesh_lib.epoch_batches(n, lead.batch_size, seed, epoch, p, ndev, lead.drop_remainder)
                          for seed in seeds]
                batches = [mesh_lib.interleave(parts, ndev) for parts in zip(*orders)]
                first = start_batch if (epoch == start_epoch and p == start_pass) else 0
                pending = []
                if streaming:
                    streamed = _interleaved([dataset.train_batches(order[first:], seed, epoch, p, jax.process_index(),
                                                                   jax.process_count())
                                             for seed, order in zip(seeds, orders)],
                                            ndev // jax.process_count())
                for i in range(first, len(batches)):
                    idx, rows_each = batches[i], len(batches[i]) // len(seeds)
                    if streaming:
                        rows = {"label": dataset.train_labels[idx]}
                    elif data is None:
                        rows = {"image": dataset.train_images[idx], "label": dataset.train_labels[idx]}
                    else:
                        rows = {ROWS: idx.astype(np.int32)}
                    batch = mesh_lib.shard_batch(rows, mesh)
                    if batch_extras is not None:  # each member's own rows (sharded as its order's)
                        extras = batch_extras({seed: order[i] for seed, order in zip(seeds, orders)}, epoch, p, i)
                        if extras:
                            batch.update(mesh_lib.shard_batch(extras, mesh))
                    if streaming:  # this process's rows of the global batch
                        batch["image"] = jax.make_array_from_process_local_data(
                            mesh_lib.batch_sharding(mesh), next(streamed), (len(idx), *dataset.image_shape))
                    args = (states, frozen, batch, base_key)
                    if (p, len(idx)) in compiled:
                        states, metrics = step(*args) if data is None else step(*args, data)
                    else:  # a pass's first step of a batch size compiles: said, and timed by waiting for it once
                        again = any(q == p for q, _ in compiled)
                        with progress.compiling(what + (f" ({passes[p][0]})" if npass > 1 else "") +
                                                (f" for a batch of {rows_each}" if again else "")):
                            states, metrics = step(*args) if data is None else step(*args, data)
                            jax.block_until_ready((states, metrics))
                        compiled.add((p, len(idx)))
                    gstep = (epoch * npass + p) * steps + i + 1
                    pending.append((gstep, rows_each, metrics))
                    progress.advance()
                    for m in members.values():
                        faults.hold(m.spec.name, gstep)
                    if i + 1 < len(batches):  # inside the pass: a checkpoint when due or on a preemption notice
                        stop = preemption.requested()
                        if stop or (every and gstep % every == 0):
                            flush(pending, epoch)
                            check_states(gstep, epoch)
                            for name, m in members.items():
                                save_latest(m, states[name], gstep, epoch, {
                                    **m.spec.meta, "epoch": epoch, "best": m.best, "last": m.last,
                                    "position": {"pass": p, "batch": i + 1, "done_passes": m.done_passes,
                                                 "sums": m.acc.sums, "count": m.acc.count}}, "mid")
                        if stop:
                            where = f"epoch {epoch + 1}, " + (f"pass {p + 1}, " if npass > 1 else "") + \
                                f"batch {i + 1} of {len(batches)}"
                            raise preemption.Preempted(f"[{label}] saved the latest checkpoint at step {gstep} "
                                                       f"({where})")
                    if i % 50 == 49 and progress.bar is not None:  # an occasional host sync for the display
                        loss = metrics[next(iter(members))].get("loss")
                        progress.postfix(epoch=f"{epoch + 1}/{lead.num_epochs}",
                                         **({} if loss is None else {"loss": f"{float(loss):.4g}"}))
                flush(pending, epoch)
                for m in members.values():
                    m.done_passes.update({f"train/{k}": v for k, v in m.acc.means().items()})
                    m.acc = _Accumulator()
            for m in members.values():
                check_finite({k[len("train/"):]: v for k, v in m.done_passes.items()}, m.spec.name, epoch)
            check_states((epoch + 1) * npass * steps, epoch)
            for name, m in members.items():
                spec, state = m.spec, states[name]
                train_metrics, m.done_passes = m.done_passes, {}
                eval_metrics = {f"test/{k}": v for k, v in _evaluate(m, state, progress).items()}
                epoch_metrics = {**train_metrics, **eval_metrics, "epoch_seconds": time.time() - t0,
                                 "host_rss_mib": host_rss_mib()}
                m.best, improved = spec.improve(m.best, eval_metrics, epoch)
                m.last = eval_metrics
                if m.writer is not None:
                    m.writer.write(epoch, epoch_metrics)
                if improved or m.export is None:
                    # a host copy: state buffers are donated
                    m.export = jax.device_get(spec.export(state, m.export, improved))
                    if not _host_finite(m.export):
                        raise NonFiniteLossError(f"{spec.name}: the stage's product became non-finite in epoch "
                                                 f"{epoch + 1}; stopped, the last good checkpoint stays the latest")
                    faults.point(spec.name, "before_best")
                    m.ckpt.save_best(epoch + 1, m.export, {**spec.meta, "epoch": epoch + 1, "best": m.best})
                    faults.point(spec.name, "after_best")
                save_latest(m, state, (epoch + 1) * npass * steps, epoch,
                            {**spec.meta, "epoch": epoch + 1, "best": m.best, "last": m.last}, "latest")
                for text in epoch_lines(spec.name, epoch, spec.num_epochs, epoch_metrics, m.best,
                                        None if spec.lr is None else spec.lr(epoch), epoch_metrics["epoch_seconds"]):
                    progress.line(text)
            if preemption.requested():  # after the epoch's checkpoints; after a stage's last one too (the
                # restart finds the stage finished): a notice is not carried into the next stage's start-up
                done = "the stage finished" if epoch + 1 == lead.num_epochs else f"the end of epoch {epoch + 1}"
                raise preemption.Preempted(f"[{label}] saved the latest checkpoint at step "
                                           f"{(epoch + 1) * npass * steps} ({done})")
    finally:
        if streamed is not None:  # a pass left by an error: stop its decoding threads / grain worker processes
            streamed.close()
        progress.close()
    return states, {k: m.export for k, m in members.items()}, {k: {"best": m.best, "last": m.last}
                                                               for k, m in members.items()}
