"""Mean ± std over runs (e.g. seeds) of the workdirs' summary.json files, as a markdown table.

    python -m mgd_jax.summarize runs/seed0 runs/seed1 runs/seed2 [--out table.md]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mgd_jax.analysis.common import cli
from mgd_jax.errors import AnalysisError


def mean_std(values) -> str:
    """``mean ± std`` (sample std; 0 for one value) at 2 decimals: the cell of this table and of the sweep's."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def aggregate(workdirs: list[str]) -> str:
    runs = []
    for w in workdirs:
        path = os.path.join(w, "summary.json")
        if not os.path.exists(path):
            raise AnalysisError(f"{path} does not exist (has `train.py --workdir={w}` finished?)")
        with open(path) as f:
            runs.append(json.load(f))
    keys = [(r["stage"], r["model"]) for r in runs[0]]
    lines = ["| stage | model | best top-1 | last top-1 | best top-5 | n |", "|---|---|---|---|---|---|"]
    for stage, model in keys:
        rows = [r for run in runs for r in run if (r["stage"], r["model"]) == (stage, model)]

        def cell(k):
            v = [100 * r[k] for r in rows if r.get(k) is not None]
            return mean_std(v) if v else "-"

        lines.append(f"| {stage} | {model} | {cell('best_acc1')} | {cell('last_acc1')} | {cell('best_acc5')} | "
                     f"{len(rows)} |")
    return "\n".join(lines) + "\n"


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out")
    a = p.parse_args(argv)
    table = aggregate(a.workdirs)
    print(table, end="")
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
