"""Sweeps: methods x granularity modes x teacher/student pairs x seeds, the results table and plots.

    python -m mgd_jax.sweep --config=configs/cifar100.py --pairs="resnet56,resnet20;vgg13,vgg8" \
        --methods=kd,hint,crd --modes=baseline,none,mag,mas --seeds=0,1,2 --root=runs/sweep

Modes (configs/default.py ``STUDENT_MODES``): ``baseline`` = the paper's baseline protocol (RepDistiller's
weights: CE + method, no logit KD; KD: 0.1 CE + 0.9 KD), ``none`` = the MG scripts' weights (CE + logit KD +
method) without the granularity terms, the ablation that isolates them; ``mag`` / ``mas`` = the paper's method.
One workdir per (pair, seed) holds the teacher, its analyzer and one student per method x mode; running the
command again resumes unfinished runs and skips finished ones.  Writes ``<root>/results.md`` (mean ± std
over seeds of the best and the last test top-1, each row's protocol, the paper's number beside the row that
reproduces its protocol), ``results.json``, ``curves.png`` (test top-1 per epoch) and ``gains.png`` (MAG / MAS
minus a baseline row, named on the plot: ``none`` when swept, else ``baseline``).

Every run's config comes from the config file: for each pair x method x mode the sweep calls its
``get_config("teacher,student,method,mode[,...]")`` (like ``configs/cifar100.py``; the command's pair, method and
mode replace the first four fields of ``--config``'s argument, the rest is kept, e.g. the teacher's schedule in
``--config=configs/cifar100.py:resnet56,resnet20,kd,mas,repdistiller``) and merges the students of one (pair,
seed).  The config file is read like train.py's ``--config``: run the command from the repository root.
``--set FIELD=VALUE`` overrides a field of every run config, typed like train.py's ``--config.FIELD=VALUE``
(e.g. ``--set student.epochs=10``).
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from mgd_jax.analysis.common import ConfigFile, ToolParser, cli, override
from mgd_jax.config_validation import fit_milestones
from mgd_jax.errors import USER_ERRORS, ConfigError, remove_if_unused
from mgd_jax.paper_results import TOP1 as PAPER
from mgd_jax.summarize import mean_std
from mgd_jax.train.metrics import read_jsonl


SWEEP_FIELDS = ("teacher", "student", "method", "mode")  # what the sweep puts into the config file's argument


def config_argument(config_path: str, teacher: str, student: str, method: str, mode: str) -> tuple[str, str]:
    """``path[:argument]`` -> (path, the argument for one run): the sweep's teacher, student, method and mode
    replace the first four fields of the argument, the rest (e.g. the teacher schedule) is kept."""
    path, colon, argument = config_path.partition(":")
    rest = argument.split(",")[len(SWEEP_FIELDS):] if colon else []
    if colon and len(argument.split(",")) < len(SWEEP_FIELDS):
        raise ConfigError(f"--config={config_path}: the sweep replaces the first fields of the argument, "
                          f"{','.join(SWEEP_FIELDS)}[,...]; {argument!r} has fewer")
    return path, ",".join([teacher, student, method, mode, *rest])


def run_config(config_path, pair, methods, modes, seed, sets=None, notes=None):
    """The config of one (pair, seed) workdir: the config file's ``get_config("teacher,student,method,mode[,...]")``
    for each method x mode, their students merged into one config (everything else must agree), then ``seed``,
    no progress bars and the ``sets`` overrides (``{field: value text}``; a stage's milestones that no longer fit
    its shortened epochs are scaled, ``config_validation.fit_milestones``, with a line appended to ``notes``).
    -> (config, {(method, mode): student})."""
    t, s = pair
    config_file = ConfigFile(config_path.partition(":")[0])
    if not config_file.takes_argument:
        raise ConfigError(f"--config={config_file.path}: its get_config() takes no argument; a sweep calls it with "
                          f"'{','.join(SWEEP_FIELDS)}[,...]' for every run (like configs/cifar100.py)")
    merged, shared, names = None, None, {}
    for m in methods:
        for mode in modes:
            path, argument = config_argument(config_path, t, s, m, mode)
            c = config_file.get_config(argument)
            students = c.get("students", None) or {}
            if len(students) != 1:
                raise ConfigError(f"--config={path}:{argument} gives {len(students)} students ({', '.join(students)}); "
                                  f"a sweep runs one per method x mode")
            (name, student), = students.items()
            rest = {k: v for k, v in c.to_dict().items() if k != "students"}
            if merged is None:
                merged, shared = c, rest
                merged.students = ml_collections.ConfigDict()
            elif rest != shared:
                raise ConfigError(f"--config={path}:{argument} changes settings besides its student: the runs of "
                                  f"one (pair, seed) share their teacher and analyzer")
            if name in merged.students:
                raise ConfigError(f"--config={path}:{argument} names its student {name!r} like another method x mode")
            merged.students[name] = student
            names[(m, mode)] = name
    merged.seed = seed
    merged.progress = False
    epochs = {}
    for field, text in (sets or {}).items():
        if field.endswith(".epochs"):
            node = merged
            for part in field.split(".")[:-1]:
                node = node.get(part, None) if isinstance(node, ml_collections.ConfigDict) else None
            if isinstance(node, ml_collections.ConfigDict) and isinstance(node.get("epochs", None), int):
                epochs[field[:-len(".epochs")]] = node.epochs  # the file's, before the override
        override(merged, field, text, where=f"--set {field}={text}")
    chosen = {f[:-len(t)] for f in (sets or {}) for t in (".optimizer.milestones", ".optimizer") if f.endswith(t)}
    lines = fit_milestones(merged, epochs, chosen | set(sets or {}), flag="--set ")
    if notes is not None:
        notes.extend(line for line in lines if line not in notes)
    return merged, names


def workdir(root, pair, seed) -> str:
    return os.path.join(root, f"{pair[0]}_{pair[1]}", f"seed{seed}")


def collect(root, pairs, methods, modes, seeds, names=None):
    """Each (pair, method, mode)'s runs; ``names[(teacher, student)][(method, mode)]``: the student's name in the
    run config (default ``<method>_<mode>``)."""
    res = {}
    for t, s in pairs:
        for seed in seeds:
            w = workdir(root, (t, s), seed)
            for m in methods:
                for mode in modes:
                    name = (names or {}).get((t, s), {}).get((m, mode), f"{m}_{mode}")
                    rows = read_jsonl(os.path.join(w, "students", name, "metrics.jsonl"))
                    if not rows:
                        continue
                    acc = [r["test/acc1"] for r in rows]
                    res.setdefault((f"{t},{s}", m, mode), []).append(
                        {"seed": seed, "best": max(acc), "last": acc[-1], "curve": acc})
    return res


# Each mode's protocol, as the table's protocol column names it (weights: configs/default.py STUDENT_MODES).
PROTOCOLS = {
    "baseline": "CE + method, no logit KD (RepDistiller; the paper's baselines)",
    "none": "CE + logit KD + method (MG scripts, no granularity terms)",
    "mag": "MG scripts + granularity KL (MAG)",
    "mas": "MG scripts + granularity KL + stable excitation (MAS)",
}
KD_PROTOCOLS = {"baseline": "0.1 CE + 0.9 logit KD (RepDistiller; the paper's baseline)",
                "none": "0.2 CE + 0.8 logit KD (MG script, no granularity terms)"}
# Logit methods replace the logit-KD term in every mode (their authors' recipe; mas: towards the stable-excitation
# target); the feature methods after the paper use their authors' weights under the modes' protocols.
LOGIT_PROTOCOLS = {
    "dkd": {"baseline": "CE + DKD (mdistiller's recipe)", "none": "CE + DKD (no granularity terms)",
            "mag": "CE + DKD + granularity KL (MAG)", "mas": "CE + DKD to the stable excitation + granularity KL (MAS)"},
    "dist": {"baseline": "CE + 2 DIST (the authors' recipe)", "none": "CE + 2 DIST (no granularity terms)",
             "mag": "CE + 2 DIST + granularity KL (MAG)",
             "mas": "CE + 2 DIST to the stable excitation + granularity KL (MAS)"},
}


def protocol(method: str, mode: str) -> str:
    if method == "none":
        return "CE only (no teacher)"
    if method in LOGIT_PROTOCOLS:
        return LOGIT_PROTOCOLS[method][mode]
    return (KD_PROTOCOLS if method == "kd" else {}).get(mode, PROTOCOLS[mode])


def paper_number(method: str, mode: str, pair: str):
    """The paper's top-1 for the row that reproduces its protocol: its baselines (mode 'none' of its table) are
    runs of the RepDistiller protocol, our mode 'baseline'; our 'none' (the ablation) has no paper number."""
    key = {"baseline": "none", "mag": "mag", "mas": "mas"}.get(mode)
    return PAPER.get((method, key), {}).get(pair) if key else None


def table(res, pairs, methods, modes) -> str:
    keys = [f"{t},{s}" for t, s in pairs]
    head = "| method | protocol | " + " | ".join(k.replace(",", " -> ") for k in keys) + " |"
    lines = [head, "|---|---|" + "---|" * len(keys)]
    for m in methods:
        for mode in modes:
            cells = []
            for k in keys:
                runs = res.get((k, m, mode), [])
                if not runs:
                    cells.append("-")
                    continue
                best = 100 * np.asarray([r["best"] for r in runs])
                last = 100 * np.asarray([r["last"] for r in runs])
                cell = f"{mean_std(best)} (last {last.mean():.2f}, n={len(runs)})"
                paper = paper_number(m, mode, k)
                cells.append(cell + (f" / paper {paper:.2f}" if paper is not None else ""))
            label = {"baseline": m, "none": m, "mag": f"MAG+{m}", "mas": f"MAS+{m}"}[mode]
            lines.append(f"| {label} | {protocol(m, mode)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


GAIN_TITLES = {"none": "MAG / MAS minus mode 'none':\nthe same MG-script weights without the granularity terms",
               "baseline": "MAG / MAS minus mode 'baseline':\nthe paper's baseline protocol (RepDistiller's weights)"}


def gain_reference(modes) -> str | None:
    """The row MAG / MAS gains are measured from: the 'none' ablation when swept (it differs from MAG / MAS by
    the granularity terms only), else the paper's 'baseline' protocol."""
    return next((m for m in ("none", "baseline") if m in modes), None)


def plots(res, pairs, methods, modes, root):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [f"{t},{s}" for t, s in pairs]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for m in methods:
            for mode in modes:
                for r in res.get((k, m, mode), [])[:1]:  # the first seed's curve
                    ax.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], label=f"{m}/{mode}")
        ax.set_title(k.replace(",", " -> "))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(methods) * len(keys)), 3.6))
    labels, x = [], 0
    ref = gain_reference(modes)
    for k in keys:
        for m in methods:
            base = res.get((k, m, ref)) if ref else None
            if not base:
                continue
            b = np.mean([r["best"] for r in base])
            for j, mode in enumerate(("mag", "mas")):
                runs = res.get((k, m, mode))
                if runs:
                    ax.bar(x + 0.4 * j, 100 * (np.mean([r["best"] for r in runs]) - b), width=0.4,
                           color=("tab:green", "tab:purple")[j], label=mode.upper() if x == 0 else None)
            labels.append((x + 0.2, f"{m}\n{k.replace(',', '->')}"))
            x += 1
    ax.axhline(0, color="k", lw=0.8)
    if labels:
        ax.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
    ax.set_ylabel("best top-1 gain (points)")
    ax.set_title(GAIN_TITLES[ref] if ref else "no baseline mode swept", fontsize=8)
    if labels:
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(root, "gains.png"), dpi=110)
    plt.close(fig)


def sweep(config_path, pairs, methods, modes, seeds, root, sets=None, devices=None):
    """Every run config is built (and checked) before anything trains; then one workdir per (pair, seed)."""
    from mgd_jax.config_validation import validate_config
    from mgd_jax.pipeline import train_and_evaluate

    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--root={root} is a file, not a folder")
    plan, names, notes = [], {}, []
    for t, s in pairs:
        for seed in seeds:
            c, names[(t, s)] = run_config(config_path, (t, s), methods, modes, seed, sets, notes)
            validate_config(c)
            plan.append(((t, s), seed, c))
    for line in notes:
        print(line, flush=True)
    existed = os.path.exists(root)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--root={root}: cannot create it ({e.strerror})") from None
    try:
        for (t, s), seed, c in plan:
            print(f"== {t} -> {s}, seed {seed}", flush=True)
            train_and_evaluate(c, workdir(root, (t, s), seed), devices=devices)
    except USER_ERRORS:
        remove_if_unused(root, existed)  # a refused first run (a missing dataset): no empty folders left
        raise
    res = collect(root, pairs, methods, modes, seeds, names)
    md = table(res, pairs, methods, modes)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump([{"pair": k[0], "method": k[1], "mode": k[2], "runs": v} for k, v in res.items()], f, indent=1)
    plots(res, pairs, methods, modes, root)
    print(md, flush=True)
    return res, md


@cli
def main(argv=None):
    p = ToolParser("python -m mgd_jax.sweep", __doc__)
    p.add_argument("--config", default="configs/cifar100.py",
                   help="a config file whose get_config takes 'teacher,student,method,mode[,...]' (read from the "
                        "repository root)")
    p.add_argument("--pairs", required=True, help='"teacher,student;teacher,student"')
    p.add_argument("--methods", default="kd")
    p.add_argument("--modes", default="baseline,none,mag,mas", help="of: baseline, none, mag, mas")
    p.add_argument("--seeds", default="0")
    p.add_argument("--root", required=True)
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE, a config override (like train.py's "
                                                              "--config.FIELD=VALUE), e.g. student.epochs=10")
    a = p.parse_args(argv)
    pairs = [tuple(x.split(",")) for x in a.pairs.split(";") if x]
    bad = [",".join(x) for x in pairs if len(x) != 2]
    if bad:
        p.error(f"--pairs: {'; '.join(bad)} is not teacher,student")
    sets = {}
    for kv in a.set:
        if "=" not in kv:
            p.error(f"--set {kv}: use FIELD=VALUE")
        field, text = kv.split("=", 1)
        sets[field] = text
    try:
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds={a.seeds}: integers, comma-separated")
    if len(set(seeds)) != len(seeds) or any(x < 0 for x in seeds):
        p.error(f"--seeds={a.seeds}: distinct integers >= 0")
    if not pairs:
        p.error(f"--pairs={a.pairs!r}: give teacher,student[;teacher,student...]")
    sweep(a.config, pairs, a.methods.split(","), a.modes.split(","), seeds, a.root, sets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
