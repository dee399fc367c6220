"""Robustness to noisy inputs (the paper's abstract claims it; the authors' script does not test it):
test accuracy of several checkpoints under input corruptions at several strengths, side by side.

    python -m mgd_jax.analysis.robustness --workdir=runs/quickstart \
        --stages=teacher,students/kd,students/mag_kd,students/mas_kd

Corruptions act on [0, 1] pixels before normalisation, with a fixed seed: Gaussian noise (sigma), salt-and-
pepper (fraction of pixels), contrast reduction (factor towards the image mean).  Writes robustness.json and
robustness.png in ``--out`` (default: <workdir>/analysis).
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
from mgd_jax.analysis.common import AnalysisError, backbone_fn, load_config, load_data

CORRUPTIONS = {
    "gaussian_noise": (0.0, 0.05, 0.1, 0.2, 0.3, 0.5),
    "salt_pepper": (0.0, 0.02, 0.05, 0.1, 0.2),
    "contrast": (0.0, 0.3, 0.5, 0.7, 0.9),
}


def corrupt(x01: jax.Array, kind: str, severity: float, key: jax.Array) -> jax.Array:
    """x01: [B, H, W, C] in [0, 1]."""
    if severity == 0:
        return x01
    if kind == "gaussian_noise":
        return jnp.clip(x01 + severity * jax.random.normal(key, x01.shape), 0.0, 1.0)
    if kind == "salt_pepper":
        k1, k2 = jax.random.split(key)
        hit = jax.random.bernoulli(k1, severity, x01.shape[:3] + (1,))
        salt = jax.random.bernoulli(k2, 0.5, x01.shape[:3] + (1,)).astype(x01.dtype)
        return jnp.where(hit, salt, x01)
    if kind == "contrast":
        mean = jnp.mean(x01, axis=(1, 2, 3), keepdims=True)
        return mean + (1.0 - severity) * (x01 - mean)
    raise AnalysisError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")


def robustness(workdir: str, stages: list[str], corruptions=None, batch_size: int = 500, seed: int = 0) -> dict:
    config = load_config(workdir)
    ds = load_data(config)
    mean = jnp.asarray(config.augment.mean, jnp.float32)
    std = jnp.asarray(config.augment.std, jnp.float32)
    corruptions = corruptions or CORRUPTIONS
    results = {}
    for stage in stages:
        fn, _ = backbone_fn(workdir, stage, config, ds.num_classes)
        fn = jax.jit(fn)

        per = {}
        for kind, severities in corruptions.items():
            accs = []
            for sev in severities:
                total, n = 0.0, len(ds.test_labels)
                for start in range(0, n, batch_size):
                    idx = np.arange(start, min(n, start + batch_size))
                    key = jax.random.fold_in(jax.random.key(seed), start)
                    x01 = jnp.asarray(ds.test_images[idx], jnp.float32) / 255.0
                    x = (corrupt(x01, kind, float(sev), key) - mean) / std
                    logits, _ = fn(x)
                    total += float(jnp.sum(losses.topk_correct(logits, jnp.asarray(ds.test_labels[idx]), 1)))
                accs.append(total / n)
            per[kind] = {"severity": list(map(float, severities)), "top1": accs}
        results[stage] = per
    return {"workdir": workdir, "examples": len(ds.test_labels), "results": results}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--stages", required=True, help="comma-separated: teacher, students/<name>, ...")
    p.add_argument("--out", help="output folder (default <workdir>/analysis)")
    a = p.parse_args(argv)
    workdir = os.path.abspath(a.workdir)
    out = a.out or os.path.join(workdir, "analysis")
    try:
        result = robustness(workdir, [s for s in a.stages.split(",") if s])
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "robustness.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out, "robustness.png"))
    print(f"wrote {out}/robustness.json and robustness.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
