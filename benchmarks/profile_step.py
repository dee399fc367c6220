"""Where a step's time goes: op times from a jax.profiler trace, grouped by what the op does.

    python benchmarks/profile_step.py                      # MAS+KD student step, resnet56 -> resnet20, batch 64
    python benchmarks/profile_step.py --stage=teacher --teacher=resnet56
    python benchmarks/profile_step.py --stage=teacher --teacher=resnet110 --precision=bfloat16   # on a GPU

On a GPU or TPU the trace's device plane is read instead: the top ``--top`` kernels by time per step (with the
HLO op each ran for, where the trace names it), the same time by category, and how much of the step's wall time
the device had a kernel running (the rest: the host launching work, or waiting); many short kernels and a
low busy share mean a launch-bound step.  On XLA:CPU:

Categories: convolution forward / input gradient (dgrad) / weight gradient (wgrad, XLA writes it as a
convolution whose "batch" is the input channels and whose window is the whole feature map), the transposes
that feed the weight gradients, other elementwise fusions (BatchNorm, ReLU, residual adds, their backward),
reductions (BatchNorm statistics), dots, collectives (with several devices: the all-reduces of BatchNorm's
global-batch statistics and of the gradients) and the time devices wait for each other at them.  Convolution rows also show GFLOP/s (2 x MACs of the op / its time),
next to the float32 matmul ceiling of the same run.  Times are summed over devices (core-ms per step).
Per XLA worker thread: the share of the step with an op (or a wait at a collective) in progress, and the idle
gaps between ops by length (how many per step, and their total).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed  # noqa: E402  (configures the CPU devices before jax starts)

import jax  # noqa: E402

from mgd_jax.train import mesh as mesh_lib  # noqa: E402

# an instruction: name, element type and dimensions of its (first) output, opcode; a tuple output, such as
# XLA:GPU's cuDNN convolution calls return, by its first element
_INST = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \(?(\w+)\[([0-9,]*)\].*? ([\w\-]+)\(")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None and _INST.match(line):
            cur.append(line)
    return comps


def _shape(s: str) -> list[int]:
    return [int(d) for d in s.split(",") if d]


def classify(hlo: str):
    """-> function(instruction name) -> (category, conv FLOPs or 0)."""
    comps = _computations(hlo)
    where = {}
    for lines in comps.values():
        for line in lines:
            where[_INST.match(line).group(1)] = line

    def conv_info(line, body):
        shapes = {_INST.match(b).group(1): _shape(_INST.match(b).group(3)) for b in body}
        out = _shape(_INST.match(line).group(3))
        ops = re.search(r"convolution\(%([\w.\-]+), %([\w.\-]+)\)", line)
        rhs = shapes.get(ops.group(2)) if ops else None
        win = re.search(r"window=\{size=(\d+)x(\d+)", line)
        kh, kw = (int(win.group(1)), int(win.group(2))) if win else (1, 1)
        flops = 0
        if rhs and len(rhs) == 4:
            flops = 2 * out[0] * out[1] * out[2] * out[3] * kh * kw * rhs[2]
        op = re.search(r'op_name="([^"]*)"', line)
        if kh * kw > 9:  # a window as large as the feature map: the weight gradient
            return "conv wgrad", flops
        if op and "/transpose(" in op.group(1):
            return "conv dgrad", flops
        return "conv forward", flops

    def kind(name):
        if name.startswith(("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")):
            return "collective (all-reduce)", 0
        if name.startswith(("Rendezvous", "Wait:")):
            return "waiting for the other devices", 0
        line = where.get(name)
        if line is None:
            return "other", 0
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = [line] + (comps.get(called.group(1), []) if called else [])
        gpu = _gpu_custom_call(" ".join(body))
        if gpu:
            return gpu, 0
        ops = [_INST.match(b).group(4) for b in body]
        if "convolution" in ops:
            conv = [b for b in body if _INST.match(b).group(4) == "convolution"][-1]
            return conv_info(conv, body)
        if "dot" in ops:
            return "dot", 0
        if "transpose" in ops or name.startswith("transpose"):
            return "transpose", 0
        if "reduce" in ops or "reduce-window" in ops:
            return "reduce", 0
        if set(ops) <= {"copy", "bitcast", "parameter"}:
            return "copy", 0
        return "elementwise", 0

    return kind


def _gpu_custom_call(text: str) -> str | None:
    """The category of a library call of XLA:GPU (cuDNN convolutions, cuBLAS / Triton matmuls), else None."""
    target = re.search(r'custom_call_target="([^"]+)"', text)
    if target is None:
        return None
    t = target.group(1)
    if "BackwardFilter" in t:
        return "conv wgrad"
    if "BackwardInput" in t:
        return "conv dgrad"
    if "conv" in t.lower():
        return "conv forward"
    if "gemm" in t.lower() or "matmul" in t.lower():
        return "dot"
    return None


# lines of a device plane that aggregate the kernels of the stream lines (not kernels themselves)
DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Ops", "Framework Name Scope",
                 "Source code", "TensorFlow Ops", "TensorFlow Name Scope", "Launch Stats", "SparseCore")


def _stats(ev) -> dict:
    try:
        return {k: v for k, v in ev.stats}
    except Exception:  # noqa: BLE001 - a trace format without per-event stats: names only
        return {}


def device_kernels(planes, runs: int, wall_ms: float, kind=None, top: int = 15) -> list[str]:
    """The lines that describe a GPU / TPU trace's device plane(s) (``planes``: the trace's planes; ``runs``: how
    many steps the trace holds; ``wall_ms``: the step's wall time; ``kind``: ``classify``'s function, for
    categories): the top kernels by time per step, time per category, and the device's busy share of the step.
    Empty when the trace has no device plane (XLA:CPU)."""
    times, calls, op_of, by_kind, spans = collections.Counter(), collections.Counter(), {}, collections.Counter(), []
    device = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    lines = [line for p in device for line in p.lines if line.name not in DERIVED_LINES]
    if not any(ev.duration_ns > 0 for line in lines for ev in line.events):  # a TPU: its ops are the "XLA Ops" line
        lines = [line for p in device for line in p.lines if line.name == "XLA Ops"]
    for line in lines:
        for ev in line.events:
            if ev.duration_ns <= 0:
                continue
            name = re.sub(r"\s+", " ", ev.name)
            st = _stats(ev)
            op = str(st.get("hlo_op", "") or "")
            key = (name[:80], op)
            times[key] += ev.duration_ns / 1e6 / runs
            calls[key] += 1 / runs
            spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
            k = "other"
            if kind is not None and op:
                k = kind(op)[0]
            elif "memcpy" in name.lower() or "memset" in name.lower():
                k = "copy"
            by_kind[k] += ev.duration_ns / 1e6 / runs
            op_of[key] = op
    if not times:
        return []
    total = sum(times.values())
    busy = 0
    spans.sort()
    lo, hi = spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo, hi = busy + hi - lo, a, b
        else:
            hi = max(hi, b)
    busy = (busy + hi - lo) / 1e6 / runs
    n = sum(calls.values())
    out = [f"device: {n:.0f} kernels per step, {total:.2f} ms of kernel time per step (mean {1000 * total / n:.1f} us "
           f"per kernel); a kernel running {busy:.2f} ms of the step's {wall_ms:.2f} ms wall time "
           f"({100 * busy / wall_ms:.0f}%: the rest the device waits for the host)", "",
           f"| kernel (top {top} by time) | HLO op | ms / step | calls / step | share of kernel time |",
           "|---|---|---|---|---|"]
    for key, t in times.most_common(top):
        out.append(f"| {key[0]} | {op_of[key] or '-'} | {t:.3f} | {calls[key]:.0f} | {100 * t / total:.1f}% |")
    out += ["", "| category | ms / step | share of kernel time |", "|---|---|---|"]
    for k, t in by_kind.most_common():
        out.append(f"| {k} | {t:.3f} | {100 * t / total:.1f}% |")
    return out


GAP_BUCKETS_US = (1, 10, 50, 200, 1000)


def _busy(events) -> tuple[int, int, list[int]]:
    """(ns covered by at least one event, ns from the first event's start to the last event's end, the idle gaps
    between covered spans in ns)."""
    spans = sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events)
    covered, gaps, (lo, hi) = 0, [], spans[0]
    for a, b in spans[1:]:
        if a > hi:
            gaps.append(a - hi)
            covered, lo, hi = covered + hi - lo, a, b
        else:
            hi = max(hi, b)
    return covered + hi - lo, spans[-1][1] - spans[0][0], gaps


def _gap_table(gaps: list[int], runs: int) -> str:
    """Idle gaps of one worker thread by length: count and total per step."""
    edges = (0,) + GAP_BUCKETS_US + (float("inf"),)
    cells = []
    for lo, hi in zip(edges, edges[1:]):
        sel = [g for g in gaps if lo * 1e3 <= g < hi * 1e3]
        label = f"{lo:g}-{hi:g} us" if hi != float("inf") else f">= {lo:g} us"
        cells.append(f"{label}: {len(sel) / runs:.0f} ({sum(sel) / 1e6 / runs:.1f} ms)")
    return "; ".join(cells)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--stage", default="student", choices=["teacher", "analyzer", "student"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--devices", type=int, default=0, help="mesh size (0: all local devices)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--top", type=int, default=15, help="kernels in the device table (GPU / TPU)")
    p.add_argument("--ceiling_size", type=int, default=4096,
                   help="side of the float32 matmul that measures the ceiling (smaller: quicker, for a dry run)")
    a = p.parse_args()
    devs = jax.devices()[:a.devices or None]
    mesh = mesh_lib.make_mesh(devs)
    ceiling = step_speed.matmul_ceiling(a.ceiling_size)
    b = step_speed.Bench(a.teacher, mesh, a.batch, a.steps,
                         None if a.precision == "float32" else step_speed.jnp.dtype(a.precision))
    captured = {}
    timer = step_speed.time_step

    def traced(step, state, args, batches, steps):
        captured["hlo"] = step.lower(state, *args(batches[0])).compile().as_text()
        tmp = tempfile.mkdtemp()
        jax.profiler.start_trace(tmp)
        r = timer(step, state, args, batches, steps)
        jax.profiler.stop_trace()
        captured["xspace"] = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
        captured["runs"] = steps + 1  # time_step's warm-up call is inside the trace too
        captured["tmp"] = tmp
        return r

    step_speed.time_step = traced
    r = {"teacher": b.teacher, "analyzer": lambda: b.analyzer_step(True),
         "student": lambda: b.student(a.student)}[a.stage]()
    kind = classify(captured["hlo"])
    times, flops, names = collections.Counter(), collections.Counter(), collections.Counter()
    busy = {}  # worker thread -> (busy ns, span ns, events): how much of the step a thread has work
    prof = jax.profiler.ProfileData.from_file(captured["xspace"])
    device = device_kernels(prof.planes, captured["runs"], r["ms"], kind, a.top)
    if device:  # GPU / TPU: the kernels of the device plane (the host threads only launch them)
        shutil.rmtree(captured["tmp"], ignore_errors=True)
        print(f"{a.stage} step, {a.teacher} -> {a.student}, batch {a.batch}, {a.precision}, {len(devs)} x "
              f"{devs[0].device_kind}; {r['ms']:.2f} ms/step wall with the profiler on; jax {jax.__version__}\n")
        print("\n".join(device))
        return
    for plane in prof.planes:
        for line in plane.lines:
            if line.name == "python" or "Compil" in line.name or "codegen" in line.name:
                continue
            evs = [ev for ev in line.events if not ev.name.startswith("ThunkExecutor")]
            if len(evs) > 100 * captured["runs"]:  # XLA's worker threads (not the client's dispatch threads)
                busy[line.name] = _busy(evs) + (len(evs),)
            for ev in evs:
                k, f = kind(ev.name)
                times[k] += ev.duration_ns / 1e6 / captured["runs"]
                names[k, re.sub(r"[.\d]+$", "", ev.name)] += ev.duration_ns / 1e6 / captured["runs"]
                flops[k] += f / captured["runs"]
    shutil.rmtree(captured["tmp"], ignore_errors=True)
    total = sum(times.values())
    ncores = step_speed.cpu.num_cores() if devs[0].platform == "cpu" else 1
    print(f"{a.stage} step, {a.teacher} -> {a.student}, batch {a.batch}, {len(devs)} x {devs[0].device_kind}; "
          f"{r['ms']:.1f} ms/step wall, {total:.1f} core-ms/step in ops; matmul ceiling {ceiling / 1e9:.0f} GFLOP/s")
    for thread, (b_ns, span, gaps, n) in sorted(busy.items()):
        print(f"thread {thread}: an op or a wait in progress {100 * b_ns / span:.0f}% of the traced steps, "
              f"{n / captured['runs']:.0f} op events per step; idle gaps per step by length (count, total): "
              f"{_gap_table(gaps, captured['runs'])}")
    print(f"| category | core-ms / step | share | GFLOP/s per core (ceiling {ceiling / ncores / 1e9:.0f}) | ops (core-ms) |")
    print("|---|---|---|---|---|")
    for k, v in times.most_common():
        rate = f"{flops[k] / (v / 1e3) / 1e9:.0f}" if flops[k] else ""
        top = ", ".join(f"{n} {t:.0f}" for (c, n), t in names.most_common() if c == k)
        print(f"| {k} | {v:.1f} | {100 * v / total:.0f}% | {rate} | {top[:90]} |")


if __name__ == "__main__":
    main()
