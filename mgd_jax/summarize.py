"""Mean ± std over runs (e.g. seeds) of the workdirs' summary.json files, as a markdown table.

    python -m mgd_jax.summarize runs/seed0 runs/seed1 runs/seed2 [--out table.md]
    python -m mgd_jax.summarize runs/* --group_by=config      # one table per config

The runs of one table must share their config except for the run's ``seed`` and the fields that do not change a
result (data folders, loaders, ``student.group_size``, progress, checkpoint and device settings); a student's own
seed (``students.<name>.seed``) is part of the config.  Runs of different configs are refused, naming the first
differing field, unless ``--group_by=config`` asks for one table per config.  Every row of every run is kept: a row that only some runs have shows its own ``n``.
"""
from __future__ import annotations

import json
import os

import numpy as np

from mgd_jax.analysis.common import ToolParser, cli
from mgd_jax.errors import AnalysisError
from mgd_jax.data.sources import with_old_defaults

# The config sections that change a result (as stages.common.stage_config reads them); the seed is what the
# runs of one table differ in.
RESULT_SECTIONS = ("data", "augment", "drop_remainder", "precision", "teacher", "analyzer", "granularities",
                   "student", "students", "mutual")
GROUP_BY = ("config",)


def mean_std(values) -> str:
    """``mean ± std`` (sample std; 0 for one value) at 2 decimals: the cell of this table and of the sweep's."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2f}"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def run_identity(config: dict) -> dict:
    """``config.json`` -> ``{field: value}`` of every field that changes a result, the seed left out."""
    from mgd_jax.stages.common import _NOT_RESULT_FIELDS, RUN_SEED

    flat = {}
    for section in RESULT_SECTIONS:
        if section in config:
            _flatten(section, config[section], flat)
    for name, student in (config.get("students") or {}).items():  # written before students had seeds: the run's
        if isinstance(student, dict):
            flat.setdefault(f"students.{name}.seed", RUN_SEED)
    return {k: json.dumps(v, sort_keys=True) for k, v in flat.items() if k not in _NOT_RESULT_FIELDS}


def first_difference(a: dict, b: dict) -> tuple[str, str, str] | None:
    """The first field (in the config's order) where two identities differ -> (field, a's value, b's value)."""
    for k in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(k, "(absent)"), b.get(k, "(absent)")
        if va != vb:
            return k, va, vb
    return None


class Run:
    """One workdir: its summary rows and its result identity."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        if not os.path.isdir(workdir):
            raise AnalysisError(f"{workdir} " + ("is a file, not a workdir" if os.path.exists(workdir)
                                                 else "does not exist"))
        path = os.path.join(workdir, "summary.json")
        if not os.path.isfile(path):
            raise AnalysisError(f"{path} does not exist (has `train.py --workdir={workdir}` finished?)")
        self.rows = _read_json(path, list, "a summary.json written by train.py")
        for r in self.rows:
            if not (isinstance(r, dict) and "stage" in r and "model" in r):
                raise AnalysisError(f"{path}: not a summary.json written by train.py (a row without stage / model)")
        cpath = os.path.join(workdir, "config.json")
        if not os.path.isfile(cpath):
            raise AnalysisError(f"{cpath} does not exist: without it the runs' configs cannot be compared")
        self.config = with_old_defaults(_read_json(cpath, dict, "a config.json written by train.py"))
        self.identity = run_identity(self.config)
        self.seed = self.config.get("seed")


def _read_json(path: str, kind: type, what: str):
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise AnalysisError(f"{path}: not {what} ({type(e).__name__}: {e})") from None
    if not isinstance(value, kind):
        raise AnalysisError(f"{path}: not {what} (a JSON {type(value).__name__})")
    return value


def table(runs: list[Run]) -> str:
    """The markdown table of ``runs`` (one config): every (stage, model) row of any run, in first-seen order."""
    keys = list(dict.fromkeys((r["stage"], r["model"]) for run in runs for r in run.rows))
    lines = ["| stage | model | best top-1 | last top-1 | best top-5 | n |", "|---|---|---|---|---|---|"]
    for stage, model in keys:
        rows = [r for run in runs for r in run.rows if (r["stage"], r["model"]) == (stage, model)]

        def cell(k):
            v = [100 * r[k] for r in rows if isinstance(r.get(k), (int, float))]
            return mean_std(v) if v else "-"

        lines.append(f"| {stage} | {model} | {cell('best_acc1')} | {cell('last_acc1')} | {cell('best_acc5')} | "
                     f"{len(rows)} |")
    return "\n".join(lines) + "\n"


def group(runs: list[Run]) -> list[list[Run]]:
    """Runs of the same identity together, in first-seen order."""
    groups: list[list[Run]] = []
    for run in runs:
        for g in groups:
            if g[0].identity == run.identity:
                g.append(run)
                break
        else:
            groups.append([run])
    return groups


def _describe(g: list[Run], groups: list[list[Run]]) -> str:
    """The fields in which ``g``'s config differs from the other groups', with ``g``'s values."""
    others = [o[0].identity for o in groups if o is not g]
    mine = g[0].identity
    fields = [k for k in mine if any(o.get(k) != mine[k] for o in others)]
    fields += [k for o in others for k in o if k not in mine and k not in fields]
    shown = ", ".join(f"{k}={mine.get(k, '(absent)')}" for k in fields[:6])
    return shown + (f", ... ({len(fields)} fields differ)" if len(fields) > 6 else "")


def aggregate(workdirs: list[str], group_by: str | None = None) -> str:
    """The table over ``workdirs`` (one config), or with ``group_by='config'`` one table per config."""
    if not workdirs:
        raise AnalysisError("no workdirs given")
    seen = {}
    for w in workdirs:
        key = os.path.realpath(w)
        if key in seen:
            raise AnalysisError(f"{w} is given twice (as {seen[key]} too): a run would count twice")
        seen[key] = w
    if group_by is not None and group_by not in GROUP_BY:
        raise AnalysisError(f"--group_by={group_by}: use {' or '.join(GROUP_BY)}")
    runs = [Run(w) for w in workdirs]
    groups = group(runs)
    if len(groups) > 1 and group_by is None:
        a, b = groups[0][0], groups[1][0]
        field, va, vb = first_difference(a.identity, b.identity)
        raise AnalysisError(f"{a.workdir} and {b.workdir} were trained with different configs (first difference: "
                            f"config.{field} = {va} vs {vb}): a table averages the runs of one config (seeds); "
                            f"--group_by=config prints one table per config")
    if len(groups) == 1:
        return table(runs)
    parts = []
    for i, g in enumerate(groups, 1):
        parts.append(f"### config {i} of {len(groups)}: {', '.join(r.workdir for r in g)}\n\n"
                     f"{_describe(g, groups)}\n\n{table(g)}")
    return "\n".join(parts)


@cli
def main(argv=None):
    p = ToolParser("python -m mgd_jax.summarize", __doc__)
    p.add_argument("workdirs", nargs="+", help="workdirs of finished runs (each holds summary.json, config.json)")
    p.add_argument("--out", help="also write the table(s) to this file")
    p.add_argument("--group_by", choices=GROUP_BY, default=None,
                   help="config: one table per config instead of refusing runs of different configs")
    a = p.parse_args(argv)
    if a.out is not None:
        if not a.out or os.path.isdir(a.out):
            raise AnalysisError(f"--out={a.out!r}: give a file name, not a folder")
        parent = os.path.dirname(os.path.abspath(a.out))
        if not os.path.isdir(parent):
            raise AnalysisError(f"--out={a.out}: the folder {parent} does not exist")
    text = aggregate(a.workdirs, a.group_by)
    print(text, end="")
    if a.out:
        try:
            with open(a.out, "w") as f:
                f.write(text)
        except OSError as e:
            raise AnalysisError(f"--out={a.out}: cannot write it ({e.strerror})") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
