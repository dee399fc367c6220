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

from mgd_jax import losses
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.data import augment
from mgd_jax.models import LOW_LR_ARCHITECTURES
from mgd_jax.stages.common import (StageRun, TrainState, apply_backbone, backbone_variables, best_per_member,
                                   classification_counts, stage_config, step_key, train_metrics)
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.loop import StageSpec, fit


def peer_kl(student, other, temperature: float = 1.0) -> jax.Array:
    """The mutual term towards another peer: PyTorch's ``kl_div`` with reduction 'mean' (over all elements),
    times T^2; the other peer is a detached target."""
    return losses.distill_kl(student, jax.lax.stop_gradient(other), temperature, reduction="mean")


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
                    mutual = mutual + peer_kl(logits_m, outs[j][0])
                    for g in granularities:
                        mutual = mutual + peer_kl(enc_m[g.name], outs[j][1][g.name], g.temperature)
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


def spec_meta(config, num_classes: int) -> dict:
    cfg = config.mutual
    return {"stage": "mutual", "peers": list(cfg.peers), "granularity": bool(cfg.granularity),
            "num_classes": num_classes, "config": stage_config(config, "mutual")}


def run(run: StageRun) -> list[dict]:
    """Deep mutual learning of ``config.mutual.peers`` (with the granularity tubes when ``granularity``); -> one
    summary row per peer."""
    config, cfg = run.config, run.config.mutual
    models = [run.backbone(a) for a in cfg.peers]
    grans = parse_granularities(config.granularities) if cfg.granularity else ()
    analyzer = GranularityAnalyzer(grans, run.data.num_classes, with_decoders=False) if grans else None
    txs = []
    for arch in cfg.peers:
        optimizer = cfg.optimizer.copy_and_resolve_references()
        if arch in LOW_LR_ARCHITECTURES:
            optimizer.lr = cfg.low_lr
        txs.append(run.sgd(optimizer, cfg.batch_size))
    seed = run.seed("mutual")
    states = mesh_lib.replicate(init_states(models, analyzer, txs, jax.random.key(seed), run.sample_images()),
                                run.mesh)
    step = jax.jit(make_train_step(models, analyzer, txs, config.augment, grans), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(models, analyzer, config.augment))
    names = [f"peer{i}" for i in range(len(models))]
    improve, export = best_per_member(names, "test/{name}/{metric}", lambda st, k: backbone_variables(st[k]))
    spec = StageSpec(
        name="mutual", directory=run.directory("mutual"), num_epochs=cfg.epochs, batch_size=cfg.batch_size,
        seed=seed, meta=spec_meta(config, run.data.num_classes), passes=[("mutual", step)],
        evaluate=lambda st: run.evaluate(lambda b: eval_step(st, b)), improve=improve, export=export,
        **run.loop_options())
    like = jax.device_get({k: backbone_variables(states[k]) for k in names})
    _, _, result = fit(spec, states, None, run.data, run.mesh, like)
    rows = []
    for i, k in enumerate(names):
        best = result["best"].get(k, {})
        rows.append({"stage": f"mutual {k} ({'MDP-DML' if grans else 'DML'})", "model": cfg.peers[i],
                     "best_acc1": best.get("acc1"), "best_acc5": best.get("acc5"), "best_epoch": best.get("epoch"),
                     "last_acc1": result["last"].get(f"test/{k}/acc1"),
                     "last_acc5": result["last"].get(f"test/{k}/acc5")})
    return rows
