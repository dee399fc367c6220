"""Linear CKA between the teacher's and a student's features, layer by layer (every pair of entries of the two
feature lists), on test images.  Writes cka_<student>.json and a heat map cka_<student>.png.

    python -m mgd_jax.analysis.cka --workdir=runs/quickstart --stage=students/mas_kd [--examples=500]

CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with X, Y the column-centred [n, features] matrices.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax.analysis.common import AnalysisError, Run, check_out_folder, cli, tool_parser, write_outputs
from mgd_jax.data.augment import eval_transform


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    x = x - x.mean(0)
    y = y - y.mean(0)
    # Gram form: <K_x, K_y> / (||K_x|| ||K_y||) with K = X X^T (cheap when features >> examples)
    kx, ky = x @ x.T, y @ y.T
    return float(np.sum(kx * ky) / (np.linalg.norm(kx) * np.linalg.norm(ky)))


def cka_matrix(workdir: str, student: str, examples: int = 500) -> dict:
    """CKA between every teacher feature and every feature of ``student`` (a stage: students/<name>) on the
    first ``examples`` test images."""
    run = Run(workdir)
    student = run.check_stage(student, refuse={
        "teacher": "CKA compares a student with the teacher; give students/<name>"})
    if int(examples) < 2:
        raise AnalysisError(f"--examples={examples}: CKA needs at least 2 examples")
    images, _ = run.split("test")
    n = min(examples, len(images))
    x = eval_transform(jnp.asarray(images[:n]), run.config.augment)
    feats, arch = {}, {}
    for who, stage in (("teacher", "teacher"), ("student", student)):
        backbone = run.backbone(stage)
        _, f = jax.jit(backbone.apply)(backbone.variables, x)
        feats[who], arch[who] = [np.asarray(a) for a in f], backbone.arch
    m = [[linear_cka(t, s) for s in feats["student"]] for t in feats["teacher"]]
    return {"workdir": run.workdir, "student": student, "examples": n, "teacher_arch": arch["teacher"],
            "student_arch": arch["student"], "teacher_layers": [list(a.shape[1:]) for a in feats["teacher"]],
            "student_layers": [list(a.shape[1:]) for a in feats["student"]], "cka": m}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(result["cka"])
    fig, ax = plt.subplots(figsize=(1.1 * m.shape[1] + 2, 1.0 * m.shape[0] + 1.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(m.shape[1]), [f"f{j}" for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), [f"f{i}" for i in range(m.shape[0])])
    ax.set_xlabel(f"student {result['student_arch']} ({result['student']})")
    ax.set_ylabel(f"teacher {result['teacher_arch']}")
    ax.set_title("linear CKA (last entry: pooled feature)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


@cli
def main(argv=None):
    p = tool_parser(__doc__, stage="students/<name>, compared with the teacher", stage_aliases=("--student",),
                    prog="python -m mgd_jax.analysis.cka")
    p.add_argument("--examples", type=int, default=500)
    p.add_argument("--out", help="output folder (default <workdir>/analysis)")
    a = p.parse_args(argv)
    check_out_folder(a.out)
    result = cka_matrix(a.workdir, a.stage, a.examples)
    out = a.out or os.path.join(result["workdir"], "analysis")
    name = result["student"].replace("/", "_")
    write_outputs(out, {f"cka_{name}.json": lambda path: _write_json(result, path),
                        f"cka_{name}.png": lambda path: plot(result, path)})
    print(f"wrote {out}/cka_{name}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
