"""Stage 2: the teacher's multi-granularity self-analyzing module (SPEC §3.2).

The teacher backbone is frozen and in inference mode (BN running statistics).  Every granularity has its own
optimizer state and schedule and is trained on

    L_g = T_g^2 * KL_batchmean(softmax(z_t / T_g) || softmax(D_g(E_g(h)) / T_g)) + CE(D_g(E_g(h)), y).

The reference makes one pass over the data per granularity per epoch (``shared_pass=False``, the default);
``shared_pass=True`` trains all tubes on one teacher forward pass per batch (same losses, fewer FLOPs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mgd_jax import losses
from mgd_jax.analyzer import GranularityAnalyzer, Tube
from mgd_jax.data import augment
from mgd_jax.stages.common import TrainState, apply_backbone, step_key


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
