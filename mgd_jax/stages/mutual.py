"""Deep mutual learning (SPEC §7, ``dml.py``) and its multi-granularity variant (``mdp_dml.py``), N peers.

Every peer m minimises  CE(z_m, y) + 1/(N-1) sum_{j != m} KL_mean(softmax(z_j) || softmax(z_m))
(+ with tubes: T_g^2 KL_mean over each granularity's encodings at T_g), the other peers' outputs detached;
'mean' = PyTorch's default reduction over all B x K elements, no temperature on the logits.  All peers see
the same augmented batch and are computed before any update (as in the reference), so one jitted step with
stop-gradient targets reproduces the reference's sequential updates.  (The reference's loop compares the
batch index with the peer index; that bug only drops the mutual term of two peers in the first two batches
and is not reproduced.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mgd_jax import losses
from mgd_jax.data import augment
from mgd_jax.stages.common import TrainState, apply_backbone, classification_counts, step_key, train_metrics


def kl_mean(student, target, temperature: float = 1.0) -> jax.Array:
    """PyTorch ``kl_div(log_softmax(s/T), softmax(t/T))`` with reduction 'mean' (over all elements), times T^2."""
    t = float(temperature)
    log_q = jax.nn.log_softmax(student / t, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(target) / t, axis=-1)
    return jnp.mean(jnp.exp(log_p) * (log_p - log_q)) * t * t


def peer_forward(model, analyzer, params, batch_stats, x, train):
    logits, feats, new_bs = apply_backbone(model, params["backbone"], batch_stats, x, train=train)
    enc = {}
    if analyzer is not None:
        enc = {n: e for n, (e, _) in analyzer.apply({"params": params["analyzer"]}, feats[-1], decode=False).items()}
    return logits, enc, new_bs


def make_train_step(models, analyzer, txs, aug_cfg, granularities=()):
    names = [f"peer{i}" for i in range(len(models))]
    n = len(models)

    def train_step(states, frozen, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, states[names[0]].step), aug_cfg)
        y = batch["label"]

        def loss_fn(all_params):
            outs = {k: peer_forward(models[i], analyzer, all_params[k], states[k].batch_stats, x, True)
                    for i, k in enumerate(names)}
            terms, total = {}, 0.0
            for m in names:
                logits_m, enc_m, _ = outs[m]
                ce = losses.cross_entropy(logits_m, y)
                mutual = 0.0
                for j in names:
                    if j == m:
                        continue
                    mutual = mutual + kl_mean(logits_m, outs[j][0])
                    for g in granularities:
                        mutual = mutual + kl_mean(enc_m[g.name], outs[j][1][g.name], g.temperature)
                mutual = mutual / (n - 1)
                terms[f"{m}/ce"], terms[f"{m}/mutual"] = ce, mutual
                total = total + ce + mutual
            return total, (terms, {k: outs[k][0] for k in names}, {k: outs[k][2] for k in names})

        params = {k: states[k].params for k in names}
        (loss, (terms, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_states, metrics = {}, {"loss": loss, **{f"loss/{k}": v for k, v in terms.items()}}
        for i, k in enumerate(names):
            new_states[k] = states[k].apply_gradients(grads[k], txs[i], new_bs[k])
            for mk, mv in train_metrics(terms[f"{k}/ce"], {}, logits[k], y, grads[k]).items():
                if not mk.startswith("loss"):
                    metrics[f"{k}/{mk}"] = mv
        return new_states, metrics

    return train_step


def make_eval_step(models, analyzer, aug_cfg):
    def eval_step(states, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        out = {}
        for i, model in enumerate(models):
            k = f"peer{i}"
            logits, _, _ = peer_forward(model, analyzer, states[k].params, states[k].batch_stats, x, False)
            out.update({f"{k}/{m}": v for m, v in classification_counts(logits, batch["label"], batch["mask"]).items()})
        return out

    return eval_step


def init_states(models, analyzer, txs, key, sample):
    states = {}
    for i, model in enumerate(models):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        v = model.init(k1, sample, train=False)
        params = {"backbone": v["params"]}
        if analyzer is not None:
            h = model.apply(v, sample)[1][-1]
            params["analyzer"] = analyzer.init(k2, h, decode=False)["params"]
        states[f"peer{i}"] = TrainState.create(params, v["batch_stats"], txs[i])
    return states
