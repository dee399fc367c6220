"""Evaluate a stage's best checkpoint: top-1, top-5, NLL, expected calibration error (15 bins); for the
analyzer also each granularity decoder's accuracy.  Writes ``<workdir>/<stage>/eval_<split>.json``.

    python -m mgd_jax.evaluate --workdir=runs/quickstart --stage=students/mas_kd [--split=test]
    python -m mgd_jax.evaluate --workdir=runs/quickstart --stage=analyzer
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax import losses
from mgd_jax.analysis.common import Run, cli, evaluate_split, tool_parser
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.data.augment import eval_transform
from mgd_jax.errors import AnalysisError

ECE_BINS = 15
SPLITS = ("test", "train")


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


def evaluate_stage(workdir: str, stage: str, split: str = "test", batch_size: int | None = None) -> dict:
    """``stage``: teacher | analyzer (the teacher and each granularity's decoder) | students/<name>.
    ``batch_size``: the run's ``eval_batch_size`` by default."""
    run = Run(workdir)
    stage = run.check_stage(stage, also=("analyzer",))
    if batch_size is not None and batch_size < 1:
        raise AnalysisError(f"batch_size={batch_size}: must be >= 1")
    images, labels = run.split(split)
    aug = run.config.augment
    if stage == "analyzer":
        teacher = run.backbone("teacher")
        tubes, meta = run.restore_best("analyzer")
        analyzer = GranularityAnalyzer(parse_granularities(run.config.granularities), teacher.num_classes)

        def step(args, batch):
            variables, tube_params = args
            logits, feats = teacher.apply(variables, eval_transform(batch["image"], aug))
            out = {"teacher": calibration_sums(logits, batch["label"], batch["mask"])}
            for name, (_, dec) in analyzer.apply({"params": tube_params}, feats[-1]).items():
                out[f"decoder/{name}"] = calibration_sums(dec, batch["label"], batch["mask"])
            return out

        args = (teacher.variables, tubes)
    else:
        backbone = run.backbone(stage)
        meta = backbone.meta

        def step(variables, batch):
            logits, _ = backbone.apply(variables, eval_transform(batch["image"], aug))
            return {"model": calibration_sums(logits, batch["label"], batch["mask"])}

        args = backbone.variables
    totals = evaluate_split(step, args, images, labels, batch_size or run.config.get("eval_batch_size", 500))
    n = len(labels)
    result = {"stage": stage, "split": split, "examples": n, "checkpoint_epoch": meta.get("epoch"),
              **{k: summarize(v, n) for k, v in totals.items()}}
    path = os.path.join(run.stage_dir(stage), f"eval_{split}.json")
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    except OSError as e:
        raise AnalysisError(f"{path}: cannot write the result ({e.strerror})") from None
    return result


@cli
def main(argv=None):
    p = tool_parser(__doc__, stage="teacher | analyzer | students/<name>", prog="python -m mgd_jax.evaluate")
    p.add_argument("--split", default="test", choices=SPLITS)
    a = p.parse_args(argv)
    print(json.dumps(evaluate_stage(a.workdir, a.stage, a.split), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
