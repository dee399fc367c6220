"""Pieces every stage shares: the train state, backbone application, evaluation counts."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mgd_jax import losses


@flax.struct.dataclass
class TrainState:
    """Everything that changes while one optimizer trains: step, params, BN statistics, optimizer state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @classmethod
    def create(cls, params, batch_stats, tx: optax.GradientTransformation) -> "TrainState":
        return cls(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params))

    def apply_gradients(self, grads, tx: optax.GradientTransformation, batch_stats=None) -> "TrainState":
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state,
                            batch_stats=self.batch_stats if batch_stats is None else batch_stats)


def apply_backbone(model, params, batch_stats, x, *, train: bool, preact: bool = False):
    """-> (logits, features, new_batch_stats).  In train mode BN uses (global) batch statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        (logits, feats), upd = model.apply(variables, x, train=True, preact=preact, mutable=["batch_stats"])
        return logits, feats, upd["batch_stats"]
    logits, feats = model.apply(variables, x, train=False, preact=preact)
    return logits, feats, batch_stats


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
