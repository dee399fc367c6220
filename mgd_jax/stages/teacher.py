"""Stage 1: the teacher, trained with cross-entropy (SPEC §2)."""
from __future__ import annotations

import dataclasses

import jax

from mgd_jax import losses
from mgd_jax.data import augment
from mgd_jax.stages.common import (StageRun, TrainState, apply_backbone, backbone_variables, best_by,
                                   classification_counts, stage_config, step_key, train_metrics)
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.loop import Fresh, StageSpec, fit


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The frozen teacher as the later stages read it: its backbone, the backbone's variables, and (after the
    analyzer stage) its self-analyzing module with each granularity's best tube.  Variables live on the devices
    (replicated over the mesh) and enter the jitted steps as arguments."""

    backbone: object
    variables: dict  # {'params', 'batch_stats'}
    analyzer: object = None  # analyzer.GranularityAnalyzer
    tubes: dict | None = None  # granularity name -> tube params


def init_state(model, tx, key, sample_images) -> TrainState:
    variables = model.init(key, sample_images, train=False)
    return TrainState.create(variables["params"], variables["batch_stats"], tx)


def make_train_step(model, tx, aug_cfg):
    def train_step(state: TrainState, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, state.step), aug_cfg)

        def loss_fn(params):
            logits, _, new_bs = apply_backbone(model, params, state.batch_stats, x, train=True)
            terms = {"ce": losses.cross_entropy(logits, batch["label"])}
            return terms["ce"], (terms, logits, new_bs)

        (loss, (terms, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, tx, new_bs)
        return new_state, train_metrics(loss, terms, logits, batch["label"], grads)

    return train_step


def make_eval_step(model, aug_cfg):
    def eval_step(variables, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        logits, _, _ = apply_backbone(model, variables["params"], variables["batch_stats"], x, train=False)
        return classification_counts(logits, batch["label"], batch["mask"])

    return eval_step


def spec_meta(config, num_classes: int) -> dict:
    """What identifies this stage's checkpoints (checked on resume and before a run starts)."""
    return {"stage": "teacher", "arch": config.teacher.arch, "num_classes": num_classes,
            "config": stage_config(config, "teacher")}


def run(run: StageRun) -> tuple[Teacher, dict]:
    """Train (or resume, or reuse) the teacher; -> (the teacher at its best epoch, {'best', 'last'})."""
    config, cfg = run.config, run.config.teacher
    model = run.backbone(cfg.arch)
    tx = run.sgd(cfg.optimizer, cfg.batch_size)
    seed = run.seed("teacher")
    state = Fresh(lambda: init_state(model, tx, jax.random.key(seed), run.sample_images()), backbone_variables)
    step = jax.jit(make_train_step(model, tx, config.augment), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, config.augment))

    def train_step(state, frozen, batch, key):
        return step(state, batch, key)

    spec = StageSpec(
        name="teacher", directory=run.directory("teacher"), num_epochs=cfg.epochs, batch_size=cfg.batch_size,
        seed=seed, meta=spec_meta(config, run.data.num_classes), passes=[("teacher", train_step)],
        evaluate=lambda s: run.evaluate(lambda b: eval_step(backbone_variables(s), b)),
        improve=best_by("test/acc1"), export=lambda s, prev, improved: backbone_variables(s),
        **run.loop_options(cfg.optimizer))
    _, export, result = fit(spec, state, None, run.data, run.mesh)
    return Teacher(model, mesh_lib.replicate(export, run.mesh)), result
