"""Speed of each training stage: images/s, % of the arithmetic ceiling, compile time, memory.  Not a test.

    python benchmarks/step_speed.py                       # resnet56 -> resnet20, batch 64, every stage
    python benchmarks/step_speed.py --pairs=readme        # teacher / analyzer / MAS+KD student of each README pair
    python benchmarks/step_speed.py --teacher=resnet32x4 --student=resnet8x4 --steps=20 --json=out.json
    python benchmarks/step_speed.py --fused=1,3,8         # fused students: per-student images/s by group size
    python benchmarks/step_speed.py --fused=3,8 --vmap=on,off --rounds=4   # ... unrolled vs vmapped, alternating

Arithmetic ceiling: the FLOP/s of a large float32 matmul (4096^2) measured in the same run; a step's FLOPs
come from XLA's cost analysis of the whole (global-batch) step, so "% ceiling" = FLOPs / step time / matmul
FLOP/s.  Memory: XLA's compiled memory analysis of the step (arguments + outputs + temporaries, per device),
the device's peak bytes in use where the backend reports it (GPU/TPU), and the process's peak RSS.

Devices: what the training entry point uses (on CPU one XLA device per core unless XLA_FLAGS sets a count,
see ``mgd_jax.train.cpu``); ``--devices=1`` times a 1-device mesh instead.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for configs/ and mgd_jax

from mgd_jax.train import cpu  # noqa: E402

cpu.configure_host_devices()  # before jax creates its backends: the same device setup as train.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mgd_jax import optim, precision  # noqa: E402
from mgd_jax.analyzer import PAPER_GRANULARITIES, GranularityAnalyzer, parse_granularities  # noqa: E402
from mgd_jax.methods import get_method  # noqa: E402
from mgd_jax.models import get_model  # noqa: E402
from mgd_jax.stages import analyzer as analyzer_stage  # noqa: E402
from mgd_jax.stages import student as student_stage  # noqa: E402
from mgd_jax.stages import teacher as teacher_stage  # noqa: E402
from mgd_jax.train import mesh as mesh_lib  # noqa: E402

AUG = ml_collections.ConfigDict(dict(pad=4, flip=True, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(150,), gamma=0.1))
GRANS = parse_granularities(PAPER_GRANULARITIES)
NUM_CLASSES = 100


def matmul_ceiling(n: int = 4096, reps: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul on the first device (median of ``reps``)."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.devices()[0])
    f = jax.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / float(np.median(times))


def _peak_device_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_step(step, state, args, batches, steps) -> dict:
    """Compile (timed), warm up, run ``steps`` steps; FLOPs from the cost analysis of the global step."""
    compiled, state, info = _compiled(step, state, args, batches)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = compiled(state, *args(batches[i % len(batches)]))
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    peak = _peak_device_bytes()
    return {"ms": 1000 * dt, **{k: info[k] for k in ("compile_s", "flops", "xla_memory_mib")},
            "device_peak_mib": None if peak is None else peak / 2 ** 20}


def _batches(batch, mesh):
    rng = np.random.default_rng(0)
    return [mesh_lib.shard_batch({"image": rng.integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8),
                                  "label": rng.integers(0, NUM_CLASSES, size=(batch,)).astype(np.int32)}, mesh)
            for _ in range(4)]


class Bench:
    """One teacher architecture on one mesh: builds and times the step of each stage."""

    def __init__(self, teacher_arch, mesh, batch, steps, compute_dtype=None):
        self.mesh, self.steps, self.dtype = mesh, steps, compute_dtype
        self.batches = _batches(batch, mesh)
        self.key = jax.random.key(0)
        self.base = mesh_lib.replicate(jax.random.key(1), mesh)
        self.sample = jnp.zeros((2, 32, 32, 3))
        self.tx = optim.sgd(OPT, 782)
        self.t_model = self._model(teacher_arch)
        self.t_vars = mesh_lib.replicate(self.t_model.init(self.key, self.sample), mesh)
        self.feature_dim = self.t_model.apply(jax.device_get(self.t_vars), self.sample)[1][-1].shape[-1]
        self.analyzer = GranularityAnalyzer(GRANS, NUM_CLASSES)

    def _model(self, arch):
        return precision.with_compute_dtype(get_model(arch, NUM_CLASSES), self.dtype)

    def teacher(self):
        state = mesh_lib.replicate(teacher_stage.init_state(self.t_model, self.tx, self.key, self.sample), self.mesh)
        step = jax.jit(teacher_stage.make_train_step(self.t_model, self.tx, AUG), donate_argnums=0)
        return time_step(step, state, lambda b: (b, self.base), self.batches, self.steps)

    def analyzer_step(self, shared: bool):
        names = tuple(g.name for g in GRANS)
        states = mesh_lib.replicate(analyzer_stage.init_states(self.analyzer, self.tx, self.key, self.feature_dim),
                                    self.mesh)
        step = jax.jit(analyzer_stage.make_train_step(self.t_model, self.analyzer, self.tx, AUG,
                                                      names if shared else names[:1]), donate_argnums=0)
        return time_step(step, states, lambda b: (self.t_vars, b, self.base), self.batches, self.steps)

    def student(self, student_arch, mode="mas", method="kd"):
        """The student step (KD weights of the scripts) with ``mode`` in none | mag | mas."""
        teacher = {"backbone": self.t_vars, "analyzer": mesh_lib.replicate(
            self.analyzer.init(self.key, jnp.zeros((1, self.feature_dim)))["params"], self.mesh)}
        t_mods = student_stage.TeacherModules(self.t_model, self.analyzer)
        s_mods = student_stage.StudentModules(
            self._model(student_arch),
            None if mode == "none" else GranularityAnalyzer(GRANS, NUM_CLASSES, False), get_method(method))
        objective = student_stage.Objective(mode, GRANS, w_ce=0.2, w_logit_kd=0.8)
        state = mesh_lib.replicate(student_stage.init_state(s_mods, t_mods, jax.device_get(teacher), self.tx,
                                                            self.key, self.sample), self.mesh)
        step = jax.jit(student_stage.make_train_step(s_mods, t_mods, objective, self.tx, AUG), donate_argnums=0)
        return time_step(step, state, lambda b: (teacher, b, self.base), self.batches, self.steps)


def _compiled(step, state, args, batches) -> tuple:
    """-> (compiled step, state after one warm-up step, {compile_s, flops, xla_memory_mib, convolutions})."""
    lowered = step.lower(state, *args(batches[0]))
    flops = (lowered.cost_analysis() or {}).get("flops")
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mem_mb = None if mem is None else \
        (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 20
    state, m = compiled(state, *args(batches[0]))
    jax.block_until_ready((state, m))
    return compiled, state, {"compile_s": compile_s, "flops": flops, "xla_memory_mib": mem_mb,
                             "convolutions": compiled.as_text().count("convolution(")}


def fused_students(b: "Bench", student_arch: str, sizes, batch: int, paper_students: int = 24,
                   vmaps=("off",), rounds: int = 1) -> list[dict]:
    """Per-student images/s of a fused group of n KD students (modes none / mag / mas in turn) sharing one teacher
    pass per batch, against the single MAS+KD student step; and the paper table's ``paper_students`` students of
    one pair (240 epochs x 782 steps), fused in groups of the largest size vs one after another, projected from
    the measured step times (training steps only).  ``vmaps``: the group step unrolled ('off') and / or vmapped
    ('on'), timed in ``rounds`` alternating rounds of ``b.steps`` steps each (the median round is reported)."""
    teacher = {"backbone": b.t_vars, "analyzer": mesh_lib.replicate(
        b.analyzer.init(b.key, jnp.zeros((1, b.feature_dim)))["params"], b.mesh)}
    t_mods = student_stage.TeacherModules(b.t_model, b.analyzer)
    args = lambda x: (teacher, x, b.base)  # noqa: E731
    rows = []
    for n in sizes:
        members, states = {}, {}
        for i in range(n):
            mode = ("none", "mag", "mas")[i % 3]
            s_mods = student_stage.StudentModules(
                b._model(student_arch), None if mode == "none" else GranularityAnalyzer(GRANS, NUM_CLASSES, False),
                get_method("kd"))
            objective = student_stage.Objective(mode, GRANS, w_ce=0.2, w_logit_kd=0.8)
            name = f"s{i}"
            members[name] = (s_mods, objective, b.tx)
            states[name] = student_stage.init_state(s_mods, t_mods, jax.device_get(teacher), b.tx,
                                                    jax.random.fold_in(b.key, i), b.sample)
        runs = {}
        for v in vmaps:
            step = jax.jit(student_stage.make_group_train_step(members, t_mods, AUG, v == "on"), donate_argnums=0)
            fresh = mesh_lib.replicate(jax.device_get(states), b.mesh)  # own buffers: the step donates them
            runs[v] = list(_compiled(step, fresh, args, b.batches)) + [[]]
        for r in range(rounds):
            for v in (vmaps if r % 2 == 0 else vmaps[::-1]):  # alternating: a load change hits both paths alike
                compiled, state, _, times = runs[v]
                t0 = time.perf_counter()
                for i in range(b.steps):
                    state, m = compiled(state, *args(b.batches[i % len(b.batches)]))
                jax.block_until_ready((state, m))
                times.append((time.perf_counter() - t0) / b.steps)
                runs[v][1] = state
        for v in vmaps:
            _, _, info, times = runs[v]
            ms = 1000 * float(np.median(times))
            r = dict(info, students=n, vmap=v, ms=ms, rounds_ms=[1000 * t for t in times],
                     per_student_images_per_s=n * batch / (ms / 1000))
            rows.append(r)
            print(f"| {n} | {v} | {ms:.1f} | {r['per_student_images_per_s']:.0f} | {r['compile_s']:.1f} | "
                  f"{r['xla_memory_mib']:.0f} | {r['convolutions']} |", flush=True)
    for v in vmaps:
        mine = [r for r in rows if r["vmap"] == v]
        one, big = mine[0], mine[-1]
        if one["students"] != 1 or big is one:  # the projection compares a group with one student
            continue
        steps = 240 * 782
        alone_h = paper_students * one["ms"] / 1000 * steps / 3600
        groups = -(-paper_students // big["students"])
        fused_h = groups * big["ms"] / 1000 * steps / 3600
        print(f"\nvmap={v}: projected training time of {paper_students} students (240 epochs x 782 steps, from the "
              f"step times above): one after another {alone_h:.1f} h, fused in {groups} groups of "
              f"{big['students']} {fused_h:.1f} h ({alone_h / fused_h:.2f}x)")
    return rows


def _row(pair, stage, r, batch, ceiling, ndev):
    dt = r["ms"] / 1000
    pct = None if r["flops"] is None else 100 * r["flops"] / dt / ceiling
    r = dict(r, pair=pair, stage=stage, devices=ndev, images_per_s=batch / dt, pct_ceiling=pct)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    mem = fmt(r["xla_memory_mib"], ".0f") + ("" if r["device_peak_mib"] is None else f" / {r['device_peak_mib']:.0f}")
    print(f"| {pair} | {stage} | {ndev} | {r['images_per_s']:.0f} | {fmt(pct, '.0f')} | {r['ms']:.1f} | "
          f"{fmt(r['flops'] and r['flops'] / batch / 1e6, '.0f')} | {r['compile_s']:.1f} | {mem} |", flush=True)
    return r


HEADER = ("| teacher -> student | stage | devices | images/s | % ceiling | ms/step | MFLOP/image | compile s | "
          "XLA memory MiB (/ device peak) |\n|---|---|---|---|---|---|---|---|---|")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--devices", type=int, default=0, help="mesh size (0: all local devices)")
    p.add_argument("--pairs", choices=["readme", "scripts"], help="teacher, analyzer and MAS+KD student of each pair")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--fused", default="", help="group sizes, e.g. 1,3,8: per-student images/s of fused students")
    p.add_argument("--vmap", default="off", help="fused groups unrolled and / or vmapped: off, on or on,off")
    p.add_argument("--rounds", type=int, default=1, help="fused: alternating timing rounds of --steps steps each")
    a = p.parse_args()
    load0 = os.getloadavg()
    devs = jax.devices()[:a.devices or None]
    mesh = mesh_lib.make_mesh(devs)
    dtype = None if a.precision == "float32" else jnp.dtype(a.precision)
    ceiling = matmul_ceiling()
    print(f"batch {a.batch}, {a.steps} timed steps, {a.precision}; jax {jax.__version__}, "
          f"{len(devs)} x {devs[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print(f"arithmetic ceiling: float32 4096^2 matmul = {ceiling / 1e9:.0f} GFLOP/s\n")
    rows = []
    if a.fused:
        print(f"{a.teacher} -> {a.student}, fused KD students (none / mag / mas in turn)\n")
        print("| students | vmap | ms/step | images/s per student | compile s | XLA memory MiB | convolutions |\n"
              "|---|---|---|---|---|---|---|")
        b = Bench(a.teacher, mesh, a.batch, a.steps, dtype)
        vmaps = tuple(a.vmap.split(","))
        if not set(vmaps) <= {"on", "off"}:
            p.error(f"--vmap={a.vmap}: on, off or on,off")
        rows = fused_students(b, a.student, [int(n) for n in a.fused.split(",")], a.batch, vmaps=vmaps,
                              rounds=a.rounds)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"batch": a.batch, "steps_per_round": a.steps, "rounds": a.rounds, "jax": jax.__version__,
                           "device": devs[0].device_kind, "devices": len(devs), "load_average_start": load0,
                           "load_average_end": os.getloadavg(),
                           "rows": rows}, f, indent=1)
        return
    print(HEADER)
    if a.pairs:
        from configs import default
        pairs = default.README_PAIRS if a.pairs == "readme" else default.SCRIPT_PAIRS
        for t_arch, s_arch in pairs:
            b = Bench(t_arch, mesh, a.batch, a.steps, dtype)
            name = f"{t_arch} -> {s_arch}"
            rows.append(_row(name, "1 teacher (CE)", b.teacher(), a.batch, ceiling, len(devs)))
            rows.append(_row(name, "2 analyzer (shared pass)", b.analyzer_step(True), a.batch, ceiling, len(devs)))
            rows.append(_row(name, "3 student MAS+KD", b.student(s_arch), a.batch, ceiling, len(devs)))
    else:
        b = Bench(a.teacher, mesh, a.batch, a.steps, dtype)
        name = f"{a.teacher} -> {a.student}"
        rows.append(_row(name, "1 teacher (CE)", b.teacher(), a.batch, ceiling, len(devs)))
        rows.append(_row(name, "2 analyzer, one granularity", b.analyzer_step(False), a.batch, ceiling, len(devs)))
        rows.append(_row(name, "2 analyzer, shared pass", b.analyzer_step(True), a.batch, ceiling, len(devs)))
        for mode, label in (("none", "3 student KD"), ("mag", "3 student MAG+KD"), ("mas", "3 student MAS+KD")):
            rows.append(_row(name, label, b.student(a.student, mode), a.batch, ceiling, len(devs)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {rss:.0f} MiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ceiling_flops": ceiling, "batch": a.batch, "precision": a.precision, "jax": jax.__version__,
                       "device": devs[0].device_kind, "devices": len(devs), "peak_rss_mib": rss,
                       "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
