"""Evaluate a stage's best checkpoint: top-1, top-5, NLL, expected calibration error (15 bins); for the
analyzer also each granularity decoder's accuracy.  Writes ``<workdir>/<stage>/eval_<split>.json``.

    python -m mgd_jax.evaluate --workdir=runs/quickstart --stage=students/mas_kd [--split=test]
    python -m mgd_jax.evaluate --workdir=runs/quickstart --stage=analyzer
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax import losses
from mgd_jax.analysis.common import AnalysisError, load_config, model_of, restore_best
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.data import load_dataset
from mgd_jax.data.augment import eval_transform
from mgd_jax.stages.common import apply_backbone
from mgd_jax.train import mesh as mesh_lib

ECE_BINS = 15


EvaluationError = AnalysisError


def calibration_sums(logits, labels, mask, bins: int = ECE_BINS) -> dict:
    """Per-batch sums from which accuracy, NLL and ECE follow exactly over the dataset."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    conf = jnp.exp(jnp.max(logp, axis=-1))
    correct = losses.topk_correct(logits, labels, 1)
    b = jnp.clip(jnp.floor(conf * bins).astype(jnp.int32), 0, bins - 1)
    onehot = jax.nn.one_hot(b, bins) * mask[:, None]
    return {"acc1": jnp.sum(correct * mask), "acc5": jnp.sum(losses.topk_correct(logits, labels, 5) * mask),
            "nll": -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0] * mask),
            "bin_count": jnp.sum(onehot, 0), "bin_conf": onehot.T @ conf, "bin_acc": onehot.T @ correct}


def summarize(sums: dict, n: int) -> dict:
    """Means over ``n`` examples; ECE = sum_b |acc_b - conf_b| * n_b / n."""
    ece = float(np.sum(np.abs(np.asarray(sums["bin_acc"]) - np.asarray(sums["bin_conf"]))) / n)
    return {"top1": float(sums["acc1"]) / n, "top5": float(sums["acc5"]) / n, "nll": float(sums["nll"]) / n,
            "ece": ece}


def evaluate_stage(workdir: str, stage: str, split: str = "test", batch_size: int = 500) -> dict:
    config = load_config(workdir)
    ds = load_dataset(config.data)
    images, labels = (ds.test_images, ds.test_labels) if split == "test" else (ds.train_images, ds.train_labels)
    if split not in ("test", "train"):
        raise EvaluationError(f"unknown split {split!r}; use test or train")
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    aug = config.augment
    directory = os.path.join(workdir, stage)


    if stage == "analyzer":
        t_vars, _ = restore_best(os.path.join(workdir, "teacher"))
        tubes, meta = restore_best(directory)
        t_model = model_of(config, config.teacher.arch, ds.num_classes)
        an = GranularityAnalyzer(parse_granularities(config.granularities), ds.num_classes)

        def fn(x, y, m):
            logits, feats, _ = apply_backbone(t_model, t_vars["params"], t_vars["batch_stats"], x, train=False)
            out = {"teacher": calibration_sums(logits, y, m)}
            for name, (_, dec) in an.apply({"params": tubes}, feats[-1]).items():
                out[f"decoder/{name}"] = calibration_sums(dec, y, m)
            return out
    else:
        variables, meta = restore_best(directory)
        arch = config.teacher.arch if stage == "teacher" else config.student.arch
        model = model_of(config, arch, ds.num_classes)
        params = variables["params"] if stage == "teacher" else variables["params"]["backbone"]
        stats = variables["batch_stats"] if stage == "teacher" else variables["batch_stats"]["backbone"]

        def fn(x, y, m):
            logits, _, _ = apply_backbone(model, params, stats, x, train=False)
            return {"model": calibration_sums(logits, y, m)}

    run = jax.jit(lambda batch: fn(eval_transform(batch["image"], aug), batch["label"], batch["mask"]))
    totals = None
    n = len(labels)
    for start in range(0, n, batch_size):  # exact sums over the whole split
        idx = np.arange(start, min(n, start + batch_size))
        pad = batch_size - len(idx)
        batch = {"image": np.concatenate([images[idx], np.zeros((pad,) + images.shape[1:], images.dtype)]),
                 "label": np.concatenate([labels[idx], np.zeros(pad, labels.dtype)]),
                 "mask": np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])}
        sums = jax.device_get(run(mesh_lib.shard_batch(batch, mesh)))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    result = {"stage": stage, "split": split, "examples": n, "checkpoint_epoch": meta.get("epoch"),
              **{k: summarize(v, n) for k, v in totals.items()}}
    with open(os.path.join(directory, f"eval_{split}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", required=True, help="teacher | analyzer | students/<name>")
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    try:
        result = evaluate_stage(os.path.abspath(a.workdir), a.stage, a.split)
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
