"""Stage 1: the teacher, trained with cross-entropy (SPEC §2)."""
from __future__ import annotations

import jax

from mgd_jax import losses
from mgd_jax.data import augment
from mgd_jax.stages.common import TrainState, apply_backbone, classification_counts, step_key, train_metrics


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
