"""Robustness to noisy inputs (the paper's abstract claims it; the authors' script does not test it):
test accuracy of several checkpoints under input corruptions at several strengths, side by side.

    python -m mgd_jax.analysis.robustness --workdir=runs/quickstart \
        --stages=teacher,students/kd,students/mag_kd,students/mas_kd

Corruptions act on [0, 1] pixels before normalisation, each test image with its own key (a function of the seed
and the image's index, so that results do not depend on the batch size): Gaussian noise (sigma), salt-and-pepper
(fraction of pixels), contrast reduction (factor towards the image mean).  Writes robustness.json and
robustness.png in ``--out`` (default: <workdir>/analysis).
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax import losses
from mgd_jax.analysis.common import (AnalysisError, Run, check_out_folder, cli, evaluate_split, tool_parser,
                                     write_outputs)

CORRUPTIONS = {
    "gaussian_noise": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "salt_pepper": (0.0, 0.02, 0.05, 0.1, 0.2),
    "contrast": (0.0, 0.3, 0.5, 0.7, 0.9),
}


def corrupt(x01: jax.Array, kind: str, severity, key: jax.Array) -> jax.Array:
    """x01: [B, H, W, C] in [0, 1]; ``severity`` may be traced.  Severity 0 returns ``x01`` unchanged."""
    if kind == "gaussian_noise":
        out = jnp.clip(x01 + severity * jax.random.normal(key, x01.shape), 0.0, 1.0)
    elif kind == "salt_pepper":
        k1, k2 = jax.random.split(key)
        hit = jax.random.bernoulli(k1, severity, x01.shape[:3] + (1,))
        salt = jax.random.bernoulli(k2, 0.5, x01.shape[:3] + (1,)).astype(x01.dtype)
        out = jnp.where(hit, salt, x01)
    elif kind == "contrast":
        mean = jnp.mean(x01, axis=(1, 2, 3), keepdims=True)
        out = mean + (1.0 - severity) * (x01 - mean)
    else:
        raise AnalysisError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return jnp.where(severity == 0, x01, out)


def corrupt_examples(x01: jax.Array, index: jax.Array, severity, kind: str, seed: int) -> jax.Array:
    """Each image corrupted with its own key, a function of (seed, its index in the test set): the result does
    not depend on the batch size."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)
    return jax.vmap(lambda x, k: corrupt(x[None], kind, severity, k)[0])(x01, keys)


def robustness(workdir: str, stages: list[str], corruptions=None, batch_size: int | None = None,
               seed: int = 0) -> dict:
    """Test top-1 of each stage's backbone under each corruption and severity.  ``batch_size``: the run's
    ``eval_batch_size`` by default."""
    run = Run(workdir)
    stages = [run.check_stage(stage) for stage in stages]
    if not stages:
        raise AnalysisError("--stages is empty: give one or more of teacher, students/<name> (comma-separated)")
    if batch_size is not None and batch_size < 1:
        raise AnalysisError(f"batch_size={batch_size}: must be >= 1")
    images, labels = run.split("test")
    mean = jnp.asarray(run.config.augment.mean, jnp.float32)
    std = jnp.asarray(run.config.augment.std, jnp.float32)
    corruptions = corruptions or CORRUPTIONS
    kinds = list(corruptions)
    for kind in kinds:
        if kind not in CORRUPTIONS:
            raise AnalysisError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    batch_size = batch_size or run.config.get("eval_batch_size", 500)
    results = {}
    for stage in stages:
        backbone = run.backbone(stage)

        def step(args, batch):  # one compilation per stage: the corruption and its severity are arguments
            variables, kind_index, severity = args
            x01 = batch["image"].astype(jnp.float32) / 255.0
            branches = [functools.partial(corrupt_examples, kind=k, seed=seed) for k in kinds]
            x = jax.lax.switch(kind_index, branches, x01, batch["index"], severity)
            logits, _ = backbone.apply(variables, (x - mean) / std)
            return jnp.sum(losses.topk_correct(logits, batch["label"], 1) * batch["mask"])

        per = {}
        for k, kind in enumerate(kinds):
            accs = [float(evaluate_split(step, (backbone.variables, np.int32(k), np.float32(sev)), images, labels,
                                         batch_size)) / len(labels) for sev in corruptions[kind]]
            per[kind] = {"severity": list(map(float, corruptions[kind])), "top1": accs}
        results[stage] = per
    return {"workdir": run.workdir, "examples": len(labels), "results": results}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(next(iter(result["results"].values())))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for stage, per in result["results"].items():
            ax.plot(per[kind]["severity"], [100 * a for a in per[kind]["top1"]], marker="o", label=stage)
        ax.set_title(kind.replace("_", " "))
        ax.set_xlabel("severity")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli
def main(argv=None):
    p = tool_parser(__doc__, prog="python -m mgd_jax.analysis.robustness")
    p.add_argument("--stages", "--stage", required=True, help="comma-separated: teacher, students/<name>, ...")
    p.add_argument("--out", help="output folder (default <workdir>/analysis)")
    a = p.parse_args(argv)
    check_out_folder(a.out)
    result = robustness(a.workdir, [s.strip() for s in a.stages.split(",") if s.strip()])
    out = a.out or os.path.join(result["workdir"], "analysis")

    def write_json(path):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    write_outputs(out, {"robustness.json": write_json, "robustness.png": lambda path: plot(result, path)})
    print(f"wrote {out}/robustness.json and robustness.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
