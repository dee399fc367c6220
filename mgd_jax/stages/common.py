"""Pieces every stage shares: the train state, backbone application, evaluation counts, and what a stage's runner
needs from the run (``StageRun``: config, workdir, data, mesh) to build its loop spec."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mgd_jax import losses, optim, precision
from mgd_jax.data.augment import eval_transform
from mgd_jax.models import get_model
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import flatten_config
from mgd_jax.train.loop import evaluate_dataset
from mgd_jax.train.progress import epoch_lr


@flax.struct.dataclass
class TrainState:
    """Everything that changes while one optimizer trains.

    ``params`` are trained (gradients, weight decay); ``batch_stats`` are the BatchNorm running statistics of the
    backbone(s); ``method_state`` is a distillation method's variables that change without gradient (its own
    BatchNorm statistics, CRD's memory, a module trained in the init stage and frozen after); ``frozen`` holds
    parameters a stage reads but does not train (the init stage's frozen backbone modules)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    method_state: Any = flax.struct.field(default_factory=dict)
    frozen: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, params, batch_stats, tx: optax.GradientTransformation, method_state=None,
               frozen=None) -> "TrainState":
        return cls(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params), method_state or {}, frozen or {})

    def apply_gradients(self, grads, tx: optax.GradientTransformation, batch_stats=None,
                        method_state=None) -> "TrainState":
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state,
                            batch_stats=self.batch_stats if batch_stats is None else batch_stats,
                            method_state=self.method_state if method_state is None else method_state)


def _is_state(x) -> bool:
    return isinstance(x, TrainState)


def legacy_layout(like):
    """Checkpoints of mgd-jax before the ``method_state`` / ``frozen`` fields (up to commit 19591dd) kept a method's
    state in ``batch_stats['method']`` and the init stage's frozen modules in ``batch_stats['fixed']`` (``frozen``:
    the non-feature modules, ``features``: FT's frozen feature modules).  -> (``like`` in that layout, a function
    converting a tree restored in it to ``like``'s layout), for ``StageSpec.legacy_layout``: an interrupted run of
    the earlier version resumes."""
    def old(ts: TrainState):
        stats = dict(ts.batch_stats)
        if ts.method_state:
            stats["method"] = ts.method_state
        if ts.frozen:
            stats["fixed"] = {"frozen": ts.frozen["non_feature"],
                              **({"features": ts.frozen["features"]} if "features" in ts.frozen else {})}
        return {"step": ts.step, "params": ts.params, "batch_stats": stats, "opt_state": ts.opt_state}

    def new(ts_like, restored):
        if not _is_state(ts_like):
            return restored
        stats = dict(restored["batch_stats"])
        method_state = stats.pop("method") if ts_like.method_state else {}
        fixed = stats.pop("fixed") if ts_like.frozen else {}
        frozen = {}
        if fixed:
            frozen = {"non_feature": fixed["frozen"], **({"features": fixed["features"]} if "features" in fixed else {})}
        return TrainState(restored["step"], restored["params"], stats, restored["opt_state"], method_state, frozen)

    old_like = jax.tree.map(lambda x: old(x) if _is_state(x) else x, like, is_leaf=_is_state)
    return old_like, lambda restored: jax.tree.map(new, like, restored, is_leaf=_is_state)


def apply_backbone(model, params, batch_stats, x, *, train: bool, preact: bool = False):
    """-> (logits, features, new_batch_stats).  In train mode BN uses (global) batch statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        (logits, feats), upd = model.apply(variables, x, train=True, preact=preact, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]
    logits, feats = model.apply(variables, x, train=False, preact=preact)
    return logits, feats, batch_stats


def backbone_variables(state: TrainState) -> dict:
    """What a trained backbone stage exports: ``{'params', 'batch_stats'}``."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def classification_counts(logits, labels, mask) -> dict[str, jax.Array]:
    """Sums (not means) so that evaluation over padded batches gives exact dataset-level numbers."""
    return {
        "acc1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
        "acc5": jnp.sum(losses.topk_correct(logits, labels, 5) * mask),
    }


def train_metrics(loss, terms: dict, logits, labels, grads) -> dict[str, jax.Array]:
    """What a train step reports: the total, every named term, top-1 / top-5 of the batch, the gradient norm."""
    return {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()},
            "acc1": jnp.mean(losses.topk_correct(logits, labels, 1)),
            "acc5": jnp.mean(losses.topk_correct(logits, labels, 5)),
            "grad_norm": optax.tree.norm(grads)}


def step_key(base_key: jax.Array, step: jax.Array) -> jax.Array:
    """The augmentation key of one step: a function of (seed, global step) only, so resume is exact."""
    return jax.random.fold_in(base_key, step)


# --- what a stage's runner needs from the run ----------------------------------------------------------------------
SEED_OFFSETS = {"teacher": 0, "analyzer": 1, "student": 2, "mutual": 2}
RUN_SEED = -1  # ``students.<name>.seed`` of a student that takes the run's seed (an int, so a flag can set it)
# The largest seed: a stage's seed is seed * 1000 + its offset, and JAX's keys take 32 bits of it.
MAX_SEED = (2 ** 32 - 1) // 1000 - 1

# Config fields that do not change a stage's numbers (where the data lives, how it reaches the devices, how many
# students train fused).
_NOT_RESULT_FIELDS = ("data.data_dir", "data.dir", "data.on_device", "data.workers", "data.prefetch", "data.loader",
                      "data.processes", "student.group_size", "student.vmap")


def stage_config(config, stage: str, student: str | None = None) -> dict:
    """Every config value that changes ``stage``'s result, flat as ``{'config.teacher.optimizer.lr': 0.05, ...}``.

    Stored in each checkpoint's metadata and compared on resume (``checkpoint.check_meta``), so a changed loss
    weight, temperature, granularity, seed, schedule or method option is refused instead of silently continuing
    the old run.  A stage includes the fields of the stages it reads (a student: its teacher's and analyzer's)."""
    def fields(*names):
        out = {}
        for name in names:
            if name in config:
                out.update(flatten_config(f"config.{name}", config[name]))
        return {k: v for k, v in out.items() if k[len("config."):] not in _NOT_RESULT_FIELDS}

    common = fields("seed", "data", "augment", "drop_remainder", "precision")
    if stage == "mutual":
        return {**common, **fields("mutual", "granularities")}
    teacher = {**common, **fields("teacher")}
    if stage == "teacher":
        return teacher
    analyzer = {**teacher, **fields("analyzer", "granularities")}
    if stage == "analyzer":
        return analyzer
    if stage in ("student", "student_init"):
        return {**analyzer, **fields("student"),
                **flatten_config(f"config.students.{student}", config.students[student])}
    raise ValueError(f"unknown stage {stage!r}")


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One run's config, workdir, data and device mesh: what every stage's ``run`` reads."""

    config: Any
    workdir: str
    data: Any  # data.ArrayDataset
    mesh: Any  # jax.sharding.Mesh

    def seed(self, stage: str, student: str | None = None) -> int:
        """The seed of ``stage`` (its initialisation, data order and augmentation); a student's: its own
        ``students.<name>.seed`` where set (>= 0), else the run's ``seed``."""
        seed = self.config.seed
        own = None if student is None else self.config.students[student].get("seed", None)
        if own is not None and own != RUN_SEED:
            seed = own
        return int(seed) * 1000 + SEED_OFFSETS[stage]

    def directory(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def backbone(self, arch: str):
        """The backbone ``arch``, computing in ``config.precision`` (float32 by default)."""
        return precision.with_compute_dtype(get_model(arch, self.data.num_classes),
                                            self.config.get("precision", "float32"))

    def steps_per_epoch(self, batch_size: int) -> int:
        return mesh_lib.steps_per_epoch(len(self.data.train_labels), batch_size, self.mesh.devices.size,
                                        self.config.drop_remainder)

    def sgd(self, optimizer_cfg, batch_size: int):
        """The stage's SGD with its per-epoch multi-step schedule (``optim.sgd``)."""
        return optim.sgd(optimizer_cfg, self.steps_per_epoch(batch_size))

    def sample_images(self, n: int = 2):
        """``n`` training images as the evaluation transform gives them (for ``init``)."""
        return eval_transform(self.data.train_images[:n], self.config.augment)

    def data_on_device(self) -> bool:
        """``data.on_device``: True / False, or None = on for GPU / TPU (the host path is as fast on CPU)."""
        if getattr(self.data, "streaming", False):  # decoded on the host batch by batch (data/streaming.py)
            return False
        v = self.config.data.get("on_device", None)
        return jax.default_backend() != "cpu" if v is None else bool(v)

    def loop_options(self, optimizer=None) -> dict:
        """The ``StageSpec`` fields every stage takes from the config; ``optimizer`` (the stage's, as given to
        ``sgd``): its per-epoch lr is shown in the epoch lines."""
        ck = self.config.get("checkpoint", None) or {}
        return dict(drop_remainder=self.config.drop_remainder, progress=self.config.progress,
                    checkpoint_every_steps=int(ck.get("every_steps", 0) or 0),
                    keep_checkpoints=int(ck.get("keep", 2)), on_device=self.data_on_device(),
                    legacy_layout=legacy_layout, lr=None if optimizer is None else epoch_lr(optimizer))

    def evaluate(self, counts_fn) -> dict:
        """``counts_fn(batch) -> {name: sum}`` over the test split: dataset-level means."""
        return evaluate_dataset(counts_fn, self.data.test_images, self.data.test_labels, self.config.eval_batch_size,
                                self.mesh)


def best_by(key: str):
    """StageSpec ``improve``: the epoch with the highest ``metrics[key]`` (strictly better, as the reference)."""
    def improve(best, metrics, epoch):
        v = metrics[key]
        if not best or v > best[key]:
            return {key: v, "epoch": epoch + 1, **{k: metrics[k] for k in metrics if k != key}}, ["all"]
        return best, []
    return improve


def best_per_member(names, key_format: str, product):
    """Best-so-far per member (granularity tube, DML peer), each by its own test top-1 (strictly better).

    -> (improve, export) for StageSpec: the export holds each member's product at its own best epoch."""
    def improve(best, metrics, epoch):
        best, improved = dict(best), []
        for nm in names:
            v = metrics[key_format.format(metric="acc1", name=nm)]
            if nm not in best or v > best[nm]["acc1"]:
                best[nm] = {"acc1": v, "acc5": metrics[key_format.format(metric="acc5", name=nm)], "epoch": epoch + 1}
                improved.append(nm)
        return best, improved

    def export(state, prev, improved):
        prev = dict(prev) if prev is not None else {nm: product(state, nm) for nm in names}
        for nm in improved:
            prev[nm] = product(state, nm)
        return prev

    return improve, export


def result_row(stage, model, result, key="test/acc1", key5="test/acc5") -> dict:
    """One row of the summary table from a stage's ``{'best', 'last'}``."""
    best, last = result["best"], result["last"]
    return {"stage": stage, "model": model, "best_acc1": best.get(key), "last_acc1": last.get(key),
            "best_acc5": best.get(key5), "last_acc5": last.get(key5), "best_epoch": best.get("epoch")}
