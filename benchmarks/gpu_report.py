"""The GPU check's helpers (benchmarks/gpu_check.sh): part d's timed train.py run, part b's summary, and the
README table made from a results file.  Not a test.

    python benchmarks/gpu_report.py e2e WORKDIR -- --config=configs/cifar100.py:resnet56,resnet20,kd,mas ...
        runs train.py with these arguments, stamps each line it prints, and gives every epoch's seconds (from one
        epoch's line to the next: training, evaluation and checkpoints; and metrics.jsonl's epoch_seconds:
        training and evaluation) with the 240-epoch projection of the student stage
    python benchmarks/gpu_report.py fused LOG
        part b's summary from step_speed.py --fused --vmap=on,off output (its printed rows: kept by a run cut
        short): per-student images/s unrolled and vmapped
    python benchmarks/gpu_report.py readme benchmarks/results/h200.txt
        the README "Speed" table from a results file of the GPU check
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_LINE = re.compile(r"^\[(?P<stage>[^\]]+)\] epoch (?P<k>\d+)/(?P<n>\d+)\b")
PAPER_EPOCHS = {"teacher": 240, "analyzer": 60, "student": 240}  # configs/default.py


def _family(stage: str) -> str:
    """'student/kd_mas' -> 'student', 'analyzer 64d_T2' -> 'analyzer'."""
    return re.split(r"[ /]", stage)[0]


def epoch_intervals(lines: list[tuple[float, str]]) -> list[dict]:
    """Each epoch line's seconds since the previous epoch line of its stage, or for a stage's first epoch since
    the line that began the stage (its first 'compiling the <stage>' line, else the line before)."""
    rows, last, start = [], {}, {}
    for i, (t, text) in enumerate(lines):
        m = re.search(r"compiling the ([\w/]+)", text)
        if m and _family(m.group(1)) not in start:
            start[_family(m.group(1))] = t
        m = EPOCH_LINE.match(text)
        if not m:
            continue
        stage, k = m.group("stage"), int(m.group("k"))
        fam = _family(stage)
        begin = last.get(stage, start.get(fam, lines[i - 1][0] if i else t))
        rows.append({"stage": stage, "family": fam, "epoch": k, "epochs": int(m.group("n")), "seconds": t - begin})
        last[stage] = t
    return rows


def _metrics(workdir: str) -> dict[str, list[float]]:
    """epoch_seconds of every stage's metrics.jsonl, keyed by the folder relative to the workdir."""
    out = {}
    for dirpath, _, files in os.walk(workdir):
        if "metrics.jsonl" in files:
            with open(os.path.join(dirpath, "metrics.jsonl")) as f:
                rows = [json.loads(x) for x in f if x.strip()]
            out[os.path.relpath(dirpath, workdir)] = [r.get("epoch_seconds") for r in rows]
    return out


def _metrics_for(stage: str, metrics: dict) -> list[float] | None:
    fam = _family(stage)
    if fam == "student":
        return metrics.get(os.path.join("students", stage.split("/", 1)[1])) if "/" in stage else None
    return metrics.get(fam)


def e2e_report(rows: list[dict], metrics: dict, wall_s: float, status: int | None) -> list[str]:
    out = ["| stage | epoch | seconds from the previous epoch (training, evaluation, checkpoints) | "
           "epoch_seconds (metrics.jsonl: training + evaluation) |", "|---|---|---|---|"]
    for r in rows:
        es = _metrics_for(r["stage"], metrics)
        e = es[r["epoch"] - 1] if es and len(es) >= r["epoch"] and es[r["epoch"] - 1] is not None else None
        out.append(f"| {r['stage']} | {r['epoch']}/{r['epochs']} | {r['seconds']:.1f} | "
                   f"{'-' if e is None else f'{e:.1f}'} |")
    out.append("")
    out.append(f"train.py wall time: {wall_s:.1f} s (exit status {status})")
    students = [r for r in rows if r["family"] == "student"]
    by_stage = {}
    for r in students:
        by_stage.setdefault(r["stage"], []).append(r)
    for stage, rs in by_stage.items():
        first = rs[0]["seconds"]
        steady = [r["seconds"] for r in rs[1:]]
        if not steady:
            out.append(f"{stage}: only its first epoch ran ({first:.1f} s, compilation included): no projection")
            continue
        per = sum(steady) / len(steady)
        total = first + (PAPER_EPOCHS["student"] - 1) * per
        out.append(f"{stage}: projected {PAPER_EPOCHS['student']}-epoch student stage: {total / 60:.1f} min "
                   f"(first epoch {first:.1f} s with compilation, then {per:.2f} s per epoch; goal <= 10 min)")
    for fam in ("teacher", "analyzer"):
        rs = [r for r in rows if r["family"] == fam]
        if rs:
            worst = max(r["seconds"] for r in rs)
            out.append(f"{fam}: one epoch {worst:.1f} s with compilation; x {PAPER_EPOCHS[fam]} epochs <= "
                       f"{worst * PAPER_EPOCHS[fam] / 60:.1f} min (an upper bound: every epoch but the first "
                       f"compiles nothing)")
    return out


def run_e2e(workdir: str, train_args: list[str]) -> int:
    """train.py with ``train_args`` (its output echoed, each line stamped), then the epoch table.  A SIGTERM
    (the script's time limit) stops train.py and still prints what was measured."""
    cmd = [sys.executable, "-u", os.path.join(ROOT, "train.py"), f"--workdir={workdir}", *train_args]
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []

    def stop(signum, frame):  # the outer time limit: stop train.py, report what it printed
        proc.terminate()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for text in proc.stdout:
            lines.append((time.monotonic(), text.rstrip("\n")))
            print(text, end="", flush=True)
        status = proc.wait()
    except KeyboardInterrupt:
        status = None
        print("\n(stopped by the time limit)", flush=True)
        proc.kill()  # at once: the script's SIGKILL follows its SIGTERM within seconds, and the report comes first
        proc.wait()
    wall = time.monotonic() - t0
    print("\n" + "\n".join(e2e_report(epoch_intervals(lines), _metrics(workdir), wall, status)), flush=True)
    return 0 if status == 0 else 1


FUSED_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*(on|off)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|")


def fused_summary(text: str) -> list[str]:
    """step_speed.py --fused --vmap rows (``| students | vmap | ms/step | images/s per student | ...``) -> one
    row per group size: unrolled and vmapped side by side, and each against one unrolled student."""
    got = {}
    for line in text.splitlines():
        m = FUSED_ROW.match(line)
        if m:
            got[int(m.group(1)), m.group(2)] = (float(m.group(3)), float(m.group(4)))
    if not got:
        return ["(no fused rows were measured)"]
    one = got.get((1, "off"), got.get((1, "on")))
    out = ["| students | unrolled ms/step | unrolled images/s per student | vmapped ms/step | vmapped images/s per "
           "student | vmapped / unrolled | vmapped per student / one student |", "|---|---|---|---|---|---|---|"]
    for n in sorted({n for n, _ in got}):
        off, on = got.get((n, "off")), got.get((n, "on"))
        cell = lambda r, i, f: "-" if r is None else format(r[i], f)  # noqa: E731
        ratio = "-" if not (on and off) else f"{on[1] / off[1]:.2f}x"
        vs_one = "-" if not (on and one) else f"{on[1] / one[1]:.2f}x"
        out.append(f"| {n} | {cell(off, 0, '.2f')} | {cell(off, 1, '.0f')} | {cell(on, 0, '.2f')} | "
                   f"{cell(on, 1, '.0f')} | {ratio} | {vs_one} |")
    if (8, "on") in got and one:
        r = got[8, "on"][1] / one[1]
        out.append(f"\ngoal: per-student images/s in a vmapped group of 8 >= 4x one student: "
                   f"{'met' if r >= 4 else 'not met'} ({r:.2f}x)")
    return out


def _section(text: str, letter: str) -> str:
    m = re.search(rf"^## {letter}\..*?(?=^## |\Z)", text, re.S | re.M)
    return m.group(0) if m else ""


def _table_rows(section: str, header_start: str) -> list[list[str]]:
    """The rows of the first table in ``section`` whose header starts with ``header_start``."""
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    return []


def readme_table(text: str, source: str) -> list[str]:
    """The README "Speed" table from a results file: one row per measurement, each naming its source."""
    head = {k: v for k, v in re.findall(r"^(card|versions|date|commit): (.*)$", text, re.M)}
    out = [f"{head.get('card', 'unknown card')}; {head.get('versions', '')} (`{source}`, "
           f"`bash benchmarks/gpu_check.sh`{', ' + head['date'] if 'date' in head else ''})", "",
           "| measurement | ours | PyTorch eager | torch.compile | ours vs eager / compile | goal |",
           "|---|---|---|---|---|---|"]
    a = _section(text, "a")
    m = re.search(r"^## a\. MAS\+KD step (\w+ -> \w+)", a)
    pair = m.group(1) if m else "resnet56 -> resnet20"
    a = a.split("### a. summary", 1)[1] if "### a. summary" in a else a  # the table of both runs
    for r in _table_rows(a, "| batch | precision |"):
        batch, prec, e_ms, e_ips, c_ms, c_ips, o_ms, o_ips, vs_e, vs_c = r[:10]
        cell = lambda ms, ips: "-" if ms == "-" else f"{ms} ms ({ips} img/s)"  # noqa: E731
        goal = ">= 2x / >= 1.2x" if batch == "64" else ""
        out.append(f"| MAS+KD step {pair}, batch {batch}, {prec} | {cell(o_ms, o_ips)} | "
                   f"{cell(e_ms, e_ips)} | {cell(c_ms, c_ips)} | {vs_e} / {vs_c} | {goal} |")
    fused = {r[0]: r for r in _table_rows(_section(text, "b"), "| students | unrolled")}
    if "8" in fused:
        r = fused["8"]
        out.append(f"| fused group of 8 KD students, images/s per student (vmapped; unrolled {r[2]}) | {r[4]} | | | "
                   f"{r[6]} of one student | >= 4x one student |")
    depth = _table_rows(_section(text, "c"), "| teacher | layers |")
    per = {}
    for r in depth:
        per.setdefault(r[0], r)  # the first precision's table (bfloat16, as the anomaly was measured)
    if "resnet56" in per and "resnet110" in per:
        a, b = float(per["resnet56"][4]), float(per["resnet110"][4])
        out.append(f"| teacher step ms per layer, resnet110 vs resnet56 (batch 64) | {b:.3f} vs {a:.3f} ms "
                   f"({b / a:.2f}x) | | | | <= 2x |")
    m = re.search(r"projected 240-epoch student stage: ([\d.]+) min", _section(text, "d"))
    if m:
        out.append(f"| {pair} student stage, 240 epochs (projected from 2 epochs of train.py, "
                   f"data.name=synthetic_cifar) | {m.group(1)} min | | | | <= 10 min |")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("e2e")
    e.add_argument("workdir")
    e.add_argument("train_args", nargs=argparse.REMAINDER)
    f = sub.add_parser("fused")
    f.add_argument("log")
    r = sub.add_parser("readme")
    r.add_argument("results")
    a = p.parse_args()
    if a.cmd == "e2e":
        args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
        sys.exit(run_e2e(a.workdir, args))
    path = a.log if a.cmd == "fused" else a.results
    if not os.path.isfile(path):
        p.exit(2, f"error: {path}: no such file\n")
    with open(path) as fh:
        text = fh.read()
    print("\n".join(fused_summary(text) if a.cmd == "fused" else readme_table(text, os.path.relpath(path, ROOT))))


if __name__ == "__main__":
    main()
