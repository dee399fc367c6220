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
minus a baseline row, named on the plot: ``none`` when swept, else ``baseline``).  ``--set key=value``
overrides config fields (Python literals), e.g. ``--set student.epochs=10``; the teacher's schedule comes with
the config, e.g. ``--config=configs/cifar100.py:resnet56,resnet20,kd,mas,repdistiller``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys

import numpy as np

from mgd_jax.paper_results import TOP1 as PAPER
from mgd_jax.train.metrics import read_jsonl


def load_base(config_path: str):
    path, _, arg = config_path.partition(":")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))  # for `from configs import ...`
    spec = importlib.util.spec_from_file_location("sweep_base_config", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return (lambda: module.get_config(arg)) if arg else module.get_config


def run_config(base, pair, methods, modes, seed, sets):
    from configs import default  # the repository's configs/ (run from the repository root, like train.py)

    t, s = pair
    c = base()
    default.set_pair(c, t, s)
    c.seed = seed
    c.progress = False
    import ml_collections
    c.students = ml_collections.ConfigDict({f"{m}_{mode}": default.student_run(m, mode, student_arch=s)
                                            for m in methods for mode in modes})
    for key, value in sets.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def collect(root, pairs, methods, modes, seeds):
    res = {}
    for t, s in pairs:
        for seed in seeds:
            w = os.path.join(root, f"{t}_{s}", f"seed{seed}")
            for m in methods:
                for mode in modes:
                    rows = read_jsonl(os.path.join(w, "students", f"{m}_{mode}", "metrics.jsonl"))
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


def protocol(method: str, mode: str) -> str:
    if method == "none":
        return "CE only (no teacher)"
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
                sd = best.std(ddof=1) if len(best) > 1 else 0.0
                cell = f"{best.mean():.2f} ± {sd:.2f} (last {last.mean():.2f}, n={len(runs)})"
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
    from configs import default
    from mgd_jax.config_validation import ConfigError
    from mgd_jax.pipeline import train_and_evaluate

    unknown = [m for m in modes if m not in default.STUDENT_MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(default.STUDENT_MODES)}")
    base = load_base(config_path)
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    for t, s in pairs:
        for seed in seeds:
            c = run_config(base, (t, s), methods, modes, seed, sets or {})
            print(f"== {t} -> {s}, seed {seed}", flush=True)
            train_and_evaluate(c, os.path.join(root, f"{t}_{s}", f"seed{seed}"), devices=devices)
    res = collect(root, pairs, methods, modes, seeds)
    md = table(res, pairs, methods, modes)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump([{"pair": k[0], "method": k[1], "mode": k[2], "runs": v} for k, v in res.items()], f, indent=1)
    plots(res, pairs, methods, modes, root)
    print(md, flush=True)
    return res, md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar100.py")
    p.add_argument("--pairs", required=True, help='"teacher,student;teacher,student"')
    p.add_argument("--methods", default="kd")
    p.add_argument("--modes", default="baseline,none,mag,mas", help="of: baseline, none, mag, mas")
    p.add_argument("--seeds", default="0")
    p.add_argument("--root", required=True)
    p.add_argument("--set", action="append", default=[], help="key=value (a Python literal)")
    a = p.parse_args(argv)
    pairs = [tuple(x.split(",")) for x in a.pairs.split(";") if x]
    sets = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            sets[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            sets[k] = v
    from mgd_jax.errors import USER_ERRORS
    try:
        sweep(a.config, pairs, a.methods.split(","), a.modes.split(","), [int(x) for x in a.seeds.split(",")],
              a.root, sets)
    except (FileNotFoundError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
