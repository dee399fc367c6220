"""The teacher (CE) step of CIFAR ResNets of several depths, per layer, in alternating rounds.  Not a test.

    python benchmarks/teacher_depth.py                                  # resnet20/32/56/110, batch 64, float32
    python benchmarks/teacher_depth.py --precision=bfloat16,float32 --rounds=5 --steps=20

Why: on one H200 the resnet110 teacher step once took 46 ms against resnet56's 6.8 ms (7x the time for 2x the
layers), and 23.7 ms in a later row of the same run.  A step whose time grows with depth as the work does keeps
its ms per layer; one that does not shows it here.  Every architecture is compiled first, then the rounds
alternate between them (each round ``--steps`` steps of each), so that the clocks, the other processes and the
timer affect all alike; the table gives the median and the spread of the rounds.

Columns: weight layers (convolutions + the classifier: the depth), the step's ms (median, min - max of the
rounds), ms per layer and its ratio to the shallowest network's, XLA's FLOPs of the step and the rate they run
at, and the optimized HLO's instructions that run as work of their own (``hlo_counts``: on a GPU roughly one
kernel launch each; fusions, library calls such as cuDNN convolutions, copies and transposes); ``conditional``
and ``while`` count control flow, which on a GPU waits for the host.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed  # noqa: E402  (configures the CPU devices before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mgd_jax.stages import teacher as teacher_stage  # noqa: E402
from mgd_jax.train import mesh as mesh_lib  # noqa: E402

_INST = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = [^=]*? ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) \(")
_NOT_WORK = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast", "call")


def hlo_counts(hlo: str) -> dict[str, int]:
    """The optimized HLO's instructions that run as work of their own (about one kernel launch each on a GPU), by
    kind: those of every computation except the bodies of fusions and the reducers of reductions, i.e. of the
    entry, of command buffers and of control flow (``conditional`` and ``while`` are counted too)."""
    comps, cur, inner = {}, None, set()
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            cur = comps.setdefault(m.group(2), [])
            continue
        m = _INST.match(line)
        if m is None or cur is None:
            continue
        op, rest = m.group(1), m.group(2)
        cur.append(op)
        for key, name in re.findall(r"\b(calls|to_apply)=%([\w.\-]+)", rest):
            if (key == "calls" and op == "fusion") or (key == "to_apply" and op != "call"):
                inner.add(name)
    counts = {}
    for name, ops in comps.items():
        if name in inner:
            continue
        for op in ops:
            if op not in _NOT_WORK:
                counts[op] = counts.get(op, 0) + 1
    return counts


def layers(arch: str) -> int:
    """The weight layers of a CIFAR ResNet (its depth: 6n + 2)."""
    return int(re.sub(r"\D", "", arch))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet20,resnet32,resnet56,resnet110")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="steps per round and architecture")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precision", default="float32", help="float32 and / or bfloat16, comma-separated")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    archs = a.archs.split(",")
    for arch in archs:
        if not re.fullmatch(r"resnet\d+", arch):
            p.exit(2, f"error: --archs: {arch!r} is not a CIFAR ResNet (resnet20, resnet32, resnet56, resnet110, "
                      f"...)\n")
    mesh = mesh_lib.make_mesh(jax.devices())
    dev = jax.devices()[0]
    print(f"teacher (CE) step, batch {a.batch}; jax {jax.__version__}, {len(jax.devices())} x {dev.device_kind}; "
          f"{a.rounds} alternating rounds of {a.steps} steps", flush=True)
    out = []
    for prec in a.precision.split(","):
        dtype = None if prec == "float32" else jnp.dtype(prec)
        runs = {}
        for arch in archs:
            b = step_speed.Bench(arch, mesh, a.batch, a.steps, dtype)
            state = mesh_lib.replicate(teacher_stage.init_state(b.t_model, b.tx, b.key, b.sample), mesh)
            step = jax.jit(teacher_stage.make_train_step(b.t_model, b.tx, step_speed.AUG), donate_argnums=0)
            lowered = step.lower(state, b.batches[0], b.base)
            t0 = time.perf_counter()
            compiled = lowered.compile()
            compile_s = time.perf_counter() - t0
            state, m = compiled(state, b.batches[0], b.base)  # warm-up
            jax.block_until_ready((state, m))
            runs[arch] = dict(step=compiled, state=state, batches=b.batches, base=b.base, compile_s=compile_s,
                              flops=(lowered.cost_analysis() or {}).get("flops"), hlo=hlo_counts(compiled.as_text()),
                              ms=[])
        for _ in range(a.rounds):
            for arch, r in runs.items():
                state, t0 = r["state"], time.perf_counter()
                for i in range(a.steps):
                    state, m = r["step"](state, r["batches"][i % len(r["batches"])], r["base"])
                jax.block_until_ready((state, m))
                r["ms"].append(1000 * (time.perf_counter() - t0) / a.steps)
                r["state"] = state
        print(f"\n{prec}:\n\n| teacher | layers | ms/step (median) | min - max of rounds | ms per layer | per layer vs "
              f"{archs[0]} | GFLOP/step | TFLOP/s | HLO: fusions / library calls / copies+transposes / other | "
              f"conditionals / whiles | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")
        base = None
        for arch, r in runs.items():
            med = float(np.median(r["ms"]))
            per = med / layers(arch)
            base = base or per
            h = r["hlo"]
            fus, calls = h.get("fusion", 0), h.get("custom-call", 0)
            copies = h.get("copy", 0) + h.get("transpose", 0) + h.get("copy-start", 0)
            other = sum(h.values()) - fus - calls - copies - h.get("conditional", 0) - h.get("while", 0)
            gflop = r["flops"] / 1e9 if r["flops"] else None
            rate = "-" if gflop is None else f"{gflop / med:.2f}"
            print(f"| {arch} | {layers(arch)} | {med:.2f} | {min(r['ms']):.2f} - {max(r['ms']):.2f} | {per:.3f} | "
                  f"{per / base:.2f}x | {'-' if gflop is None else f'{gflop:.1f}'} | {rate} | {fus} / {calls} / "
                  f"{copies} / {other} | {h.get('conditional', 0)} / {h.get('while', 0)} | {r['compile_s']:.1f} |",
                  flush=True)
            out.append({"arch": arch, "precision": prec, "layers": layers(arch), "ms_rounds": r["ms"],
                        "median_ms": med, "ms_per_layer": per, "flops": r["flops"], "hlo_counts": h,
                        "compile_s": r["compile_s"]})
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"batch": a.batch, "device": dev.device_kind, "jax": jax.__version__, "rows": out}, f,
                          indent=1)


if __name__ == "__main__":
    main()
