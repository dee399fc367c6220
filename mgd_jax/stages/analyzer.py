"""Stage 2: the teacher's multi-granularity self-analyzing module (SPEC §3.2).

The teacher backbone is frozen and in inference mode (BN running statistics).  Every granularity has its own
optimizer state and schedule and is trained on

    L_g = T_g^2 * KL_batchmean(softmax(z_t / T_g) || softmax(D_g(E_g(h)) / T_g)) + CE(D_g(E_g(h)), y).

The reference makes one pass over the data per granularity per epoch (``shared_pass=False``, the default);
``shared_pass=True`` trains all tubes on one teacher forward pass per batch (same losses, fewer FLOPs).
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import optax

from mgd_jax import losses
from mgd_jax.analyzer import GranularityAnalyzer, Tube, parse_granularities
from mgd_jax.data import augment
from mgd_jax.errors import NonFiniteLossError
from mgd_jax.stages.common import StageRun, TrainState, apply_backbone, best_per_member, stage_config, step_key
from mgd_jax.stages.teacher import Teacher
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.loop import Fresh, StageSpec, fit
from mgd_jax.train.metrics import read_jsonl

# A teacher below this test top-1 is named as the likely cause of a non-finite analyzer loss (undertrained).
LOW_TEACHER_TOP1 = 0.5


def init_states(analyzer: GranularityAnalyzer, tx, key, feature_dim: int) -> dict[str, TrainState]:
    params = analyzer.init(key, jnp.zeros((1, feature_dim), jnp.float32))["params"]
    return {name: TrainState.create(p, {}, tx) for name, p in params.items()}


def make_train_step(model, analyzer: GranularityAnalyzer, tx, aug_cfg, names: tuple[str, ...]):
    """Step over the tubes ``names`` (one name: the reference's separate pass; all: the shared pass)."""
    grans = {g.name: g for g in analyzer.granularities}
    tubes = {n: Tube(grans[n].dim, analyzer.num_classes) for n in names}

    def train_step(states: dict[str, TrainState], teacher, batch, base_key):
        key = step_key(base_key, states[names[0]].step)
        x = augment.train_transform(batch["image"], key, aug_cfg)
        t_logits, t_feats, _ = apply_backbone(model, teacher["params"], teacher["batch_stats"], x, train=False)
        h = t_feats[-1]
        y = batch["label"]

        def loss_fn(tube_params):
            terms, decoded = {}, {}
            for n in names:
                _, dec = tubes[n].apply({"params": tube_params[n]}, h)
                terms[n] = losses.tube_loss(dec, t_logits, y, grans[n].temperature)
                decoded[n] = dec
            return sum(terms.values()), (terms, decoded)

        params = {n: states[n].params for n in names}
        (_, (terms, decoded)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_states = dict(states)
        metrics = {}
        for n in names:
            new_states[n] = states[n].apply_gradients(grads[n], tx)
            metrics[f"loss/{n}"] = terms[n]
            metrics[f"acc1/{n}"] = jnp.mean(losses.topk_correct(decoded[n], y, 1))
            metrics[f"acc5/{n}"] = jnp.mean(losses.topk_correct(decoded[n], y, 5))
            metrics[f"grad_norm/{n}"] = optax.tree.norm(grads[n])
        return new_states, metrics

    return train_step


def make_eval_step(model, analyzer: GranularityAnalyzer, aug_cfg):
    def eval_step(teacher, tube_params, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        logits, feats, _ = apply_backbone(model, teacher["params"], teacher["batch_stats"], x, train=False)
        out = analyzer.apply({"params": tube_params}, feats[-1])
        y, m = batch["label"], batch["mask"]
        counts = {"teacher/acc1": jnp.sum(losses.topk_correct(logits, y, 1) * m)}
        for n, (_, dec) in out.items():
            counts[f"acc1/{n}"] = jnp.sum(losses.topk_correct(dec, y, 1) * m)
            counts[f"acc5/{n}"] = jnp.sum(losses.topk_correct(dec, y, 5) * m)
        return counts

    return eval_step


def spec_meta(config, num_classes: int) -> dict:
    """What identifies this stage's checkpoints (checked on resume and before a run starts)."""
    return {"stage": "analyzer", "teacher_arch": config.teacher.arch, "num_classes": num_classes,
            "granularities": [[int(d), float(t)] for d, t in config.granularities],
            "config": stage_config(config, "analyzer")}


def run(run: StageRun, teacher: Teacher) -> tuple[Teacher, dict]:
    """Train (or resume, or reuse) the teacher's tubes, each granularity with its own optimizer; -> (the teacher
    with each granularity's best tube, {'best', 'last'})."""
    config, cfg = run.config, run.config.analyzer
    analyzer = GranularityAnalyzer(parse_granularities(config.granularities), run.data.num_classes)
    names = tuple(g.name for g in analyzer.granularities)
    tx = run.sgd(cfg.optimizer, cfg.batch_size)  # each granularity's optimizer steps once per batch of its own pass
    sample = run.sample_images(1)
    feature_dim = jax.eval_shape(teacher.backbone.apply, teacher.variables, sample)[1][-1].shape[-1]
    seed = run.seed("analyzer")
    states = Fresh(lambda: init_states(analyzer, tx, jax.random.key(seed), feature_dim),
                   lambda shapes: {nm: shapes[nm].params for nm in names})
    groups = [names] if cfg.shared_pass else [(nm,) for nm in names]
    passes = [("+".join(group), jax.jit(make_train_step(teacher.backbone, analyzer, tx, config.augment, group),
                                        donate_argnums=0))
              for group in groups]
    eval_step = jax.jit(make_eval_step(teacher.backbone, analyzer, config.augment))
    improve, export = best_per_member(names, "test/{metric}/{name}", lambda st, nm: st[nm].params)
    spec = StageSpec(
        name="analyzer", directory=run.directory("analyzer"), num_epochs=cfg.epochs, batch_size=cfg.batch_size,
        seed=seed, meta=spec_meta(config, run.data.num_classes), passes=passes,
        evaluate=lambda s: run.evaluate(lambda b: eval_step(teacher.variables, {nm: s[nm].params for nm in names}, b)),
        improve=improve, export=export, **run.loop_options(cfg.optimizer))
    try:
        _, tubes, result = fit(spec, states, teacher.variables, run.data, run.mesh)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; {nonfinite_hint(run.directory('teacher'), config, run.data.num_classes)}"
                                 ) from None
    return dataclasses.replace(teacher, analyzer=analyzer, tubes=mesh_lib.replicate(tubes, run.mesh)), result


def teacher_top1(teacher_dir: str) -> float | None:
    """The teacher stage's best test top-1 from its ``metrics.jsonl`` (None for an imported teacher)."""
    try:
        rows = read_jsonl(os.path.join(teacher_dir, "metrics.jsonl"))
    except (OSError, ValueError):
        return None
    accs = [r["test/acc1"] for r in rows
            if isinstance(r.get("test/acc1"), (int, float)) and math.isfinite(r["test/acc1"])]
    return max(accs) if accs else None


def nonfinite_hint(teacher_dir: str, config, num_classes: int) -> str:
    """What a non-finite analyzer loss most likely means and what to change: an undertrained teacher (its top-1,
    when low) and the analyzer's learning rate (the config field and a lower value)."""
    lr = float(config.analyzer.optimizer.lr)
    lower = f"--config.analyzer.optimizer.lr={lr / 10:g}"
    top1 = teacher_top1(teacher_dir)
    if top1 is None:
        teacher = "the teacher's accuracy is unknown (no teacher/metrics.jsonl);"
    elif top1 < LOW_TEACHER_TOP1:
        teacher = (f"likely cause: an undertrained teacher (best test top-1 {100 * top1:.1f}%, chance "
                   f"{100 / num_classes:.1f}%, after {config.teacher.epochs} epoch(s)), whose logits the tubes cannot "
                   f"follow; train it longer (config.teacher.epochs) or")
    else:
        teacher = f"the teacher looks trained (best test top-1 {100 * top1:.1f}%);"
    return f"{teacher} lower the analyzer's learning rate config.analyzer.optimizer.lr={lr:g} (e.g. {lower})"
