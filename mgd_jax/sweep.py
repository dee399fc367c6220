"""Sweeps: methods x granularity modes x teacher/student pairs x seeds, the results table and plots.

    python -m mgd_jax.sweep --config=configs/cifar100.py --pairs="resnet56,resnet20;vgg13,vgg8" \
        --methods=kd,hint,crd --modes=none,mag,mas --seeds=0,1,2 --root=runs/sweep

One workdir per (pair, seed) holds the teacher, its analyzer and one student per method x mode; running the
command again resumes unfinished runs and skips finished ones.  Writes ``<root>/results.md`` (mean ± std
over seeds of the best and the last test top-1, the paper's number beside ours where it has one),
``results.json``, ``curves.png`` (test top-1 per epoch) and ``gains.png`` (MAG / MAS minus the plain
baseline).  ``--set key=value`` overrides config fields (Python literals), e.g. ``--set student.epochs=10``.
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
    c.teacher.arch, c.student.arch = t, s
    if s in default.LOW_LR_STUDENTS:
        c.student.optimizer.lr = 0.01
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


def table(res, pairs, methods, modes) -> str:
    keys = [f"{t},{s}" for t, s in pairs]
    head = "| method | " + " | ".join(k.replace(",", " -> ") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
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
                paper = PAPER.get((m, mode), {}).get(k)
                cells.append(cell + (f" / paper {paper:.2f}" if paper is not None else ""))
            label = {"none": m, "mag": f"MAG+{m}", "mas": f"MAS+{m}"}[mode]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    for k in keys:
        for m in methods:
            base = res.get((k, m, "none"))
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
    ax.set_ylabel("best top-1 gain over the baseline (points)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(root, "gains.png"), dpi=110)
    plt.close(fig)


def sweep(config_path, pairs, methods, modes, seeds, root, sets=None, devices=None):
    from mgd_jax.pipeline import train_and_evaluate

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
    p.add_argument("--modes", default="none,mag,mas")
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
