"""Step speed of each stage for a teacher/student pair: images/s, compile time, memory.  Not a test.

    python benchmarks/step_speed.py                       # resnet56 -> resnet20, batch 64, MAS + KD
    python benchmarks/step_speed.py --teacher=resnet32x4 --student=resnet8x4 --steps=20
    python benchmarks/step_speed.py --pairs=readme        # the MAS+KD student step of each README pair

On CPU, one XLA device per core is created unless XLA_FLAGS already sets a device count; every stage is
timed on a 1-device mesh and on the mesh of all local devices.  Memory: XLA's compiled memory analysis
(arguments + outputs + temporaries of the step) and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from mgd_jax import optim  # noqa: E402
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities  # noqa: E402
from mgd_jax.methods import get_method  # noqa: E402
from mgd_jax.models import get_model  # noqa: E402
from mgd_jax.stages import analyzer as analyzer_stage  # noqa: E402
from mgd_jax.stages import student as student_stage  # noqa: E402
from mgd_jax.stages import teacher as teacher_stage  # noqa: E402
from mgd_jax.train import mesh as mesh_lib  # noqa: E402

AUG = ml_collections.ConfigDict(dict(pad=4, flip=True, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(150,), gamma=0.1))


def _time(step, state, args, batches, steps):
    t0 = time.perf_counter()
    compiled = step.lower(state, *args(batches[0])).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mem_mb = None
    if mem is not None:
        mem_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    state, _ = compiled(state, *args(batches[0]))  # warm-up
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = compiled(state, *args(batches[i % len(batches)]))
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    return compile_s, dt, mem_mb


def _student(t_model, t_vars, student_arch, mode, mesh, batches, steps, num_classes=100):
    """Times the student step (KD weights of the scripts) with ``mode`` in none | mag | mas."""
    key = jax.random.key(0)
    base = mesh_lib.replicate(jax.random.key(1), mesh)
    sample = jnp.zeros((2, 32, 32, 3))
    grans = parse_granularities([(64, 2.0), (256, 8.0)])
    tx = optim.sgd(OPT, 782)
    an = GranularityAnalyzer(grans, num_classes)
    d = t_model.apply(jax.device_get(t_vars), sample)[1][-1].shape[-1]
    teacher = {"backbone": t_vars, "analyzer": mesh_lib.replicate(an.init(key, jnp.zeros((1, d)))["params"], mesh)}
    t_mods = student_stage.TeacherModules(t_model, an)
    s_mods = student_stage.StudentModules(
        get_model(student_arch, num_classes), None if mode == "none" else GranularityAnalyzer(grans, num_classes, False),
        get_method("kd"))
    obj = student_stage.Objective(mode, grans, w_ce=0.2, w_logit_kd=0.8)
    s_state = mesh_lib.replicate(student_stage.init_state(s_mods, t_mods, jax.device_get(teacher), tx, key, sample),
                                 mesh)
    s_step = jax.jit(student_stage.make_train_step(s_mods, t_mods, obj, tx, AUG), donate_argnums=0)
    return _time(s_step, s_state, lambda b: (teacher, b, base), batches, steps)


def _batches(batch, mesh, num_classes=100):
    rng = np.random.default_rng(0)
    return [mesh_lib.shard_batch({"image": rng.integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8),
                                  "label": rng.integers(0, num_classes, size=(batch,)).astype(np.int32)}, mesh)
            for _ in range(4)]


def bench_pairs(pairs, batch, steps, devices):
    mesh = mesh_lib.make_mesh(devices)
    batches = _batches(batch, mesh)
    print("| teacher -> student | MAS+KD student step images/s | ms/step | compile s | XLA memory MiB |")
    print("|---|---|---|---|---|")
    for t_arch, s_arch in pairs:
        t_model = get_model(t_arch, 100)
        t_vars = mesh_lib.replicate(t_model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))), mesh)
        comp, dt, mem = _student(t_model, t_vars, s_arch, "mas", mesh, batches, steps)
        mem_s = "-" if mem is None else f"{mem:.0f}"
        print(f"| {t_arch} -> {s_arch} | {batch / dt:.0f} | {1000 * dt:.1f} | {comp:.1f} | {mem_s} |", flush=True)


def bench(teacher_arch, student_arch, batch, steps, devices, num_classes=100):
    mesh = mesh_lib.make_mesh(devices)
    rng = np.random.default_rng(0)
    batches = _batches(batch, mesh, num_classes)
    key = jax.random.key(0)
    base = mesh_lib.replicate(jax.random.key(1), mesh)
    sample = jnp.zeros((2, 32, 32, 3))
    grans = parse_granularities([(64, 2.0), (256, 8.0)])
    tx = optim.sgd(OPT, 782)
    rows = []

    t_model = get_model(teacher_arch, num_classes)
    t_state = mesh_lib.replicate(teacher_stage.init_state(t_model, tx, key, sample), mesh)
    t_step = jax.jit(teacher_stage.make_train_step(t_model, tx, AUG), donate_argnums=0)
    rows.append(("teacher (CE)",) + _time(t_step, t_state, lambda b: (b, base), batches, steps))
    t_vars = mesh_lib.replicate(t_model.init(key, sample), mesh)

    an = GranularityAnalyzer(grans, num_classes)
    d = t_model.apply(jax.device_get(t_vars), sample)[1][-1].shape[-1]
    names = tuple(g.name for g in grans)
    for label, grp in (("analyzer, one granularity", names[:1]), ("analyzer, shared pass", names)):
        a_states = mesh_lib.replicate(analyzer_stage.init_states(an, tx, key, d), mesh)
        a_step = jax.jit(analyzer_stage.make_train_step(t_model, an, tx, AUG, grp), donate_argnums=0)
        rows.append((label,) + _time(a_step, a_states, lambda b: (t_vars, b, base), batches, steps))

    for mode in ("none", "mag", "mas"):
        label = {"none": "student KD", "mag": "student MAG+KD", "mas": "student MAS+KD"}[mode]
        rows.append((label,) + _student(t_model, t_vars, student_arch, mode, mesh, batches, steps, num_classes))

    # host side of the data path: gather a batch of uint8 rows and place it on the mesh
    train = rng.integers(0, 256, size=(50000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=(50000,)).astype(np.int32)
    idx = mesh_lib.epoch_batches(50000, batch, 0, 0, 0, len(devices))
    t0 = time.perf_counter()
    for i in range(50):
        b = mesh_lib.shard_batch({"image": train[idx[i]], "label": labels[idx[i]]}, mesh)
    jax.block_until_ready(b)
    host_dt = (time.perf_counter() - t0) / 50
    return rows, host_dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", choices=["readme", "scripts"], help="time the MAS+KD student step of each pair")
    a = p.parse_args()
    devs = jax.devices()
    if a.pairs:
        from configs import default
        print(f"batch {a.batch}, {a.steps} timed steps; jax {jax.__version__}, {len(devs)} x {devs[0].device_kind}")
        bench_pairs(default.README_PAIRS if a.pairs == "readme" else default.SCRIPT_PAIRS, a.batch, a.steps, devs)
        return
    print(f"{a.teacher} -> {a.student}, batch {a.batch}, {a.steps} timed steps; jax {jax.__version__}, "
          f"{len(devs)} x {devs[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print("| devices | step | images/s | ms/step | compile s | XLA memory MiB |")
    print("|---|---|---|---|---|---|")
    configs = [devs[:1]] + ([devs] if len(devs) > 1 else [])
    host = {}
    for ds in configs:
        rows, host[len(ds)] = bench(a.teacher, a.student, a.batch, a.steps, ds)
        for name, comp, dt, mem in rows:
            mem_s = "-" if mem is None else f"{mem:.0f}"
            print(f"| {len(ds)} | {name} | {a.batch / dt:.0f} | {1000 * dt:.1f} | {comp:.1f} | {mem_s} |", flush=True)
    for n, dt in host.items():
        print(f"host data path ({n} device(s)): {1000 * dt:.2f} ms per batch of {a.batch} "
              f"({a.batch / dt:.0f} images/s; augmentation runs inside the jitted step)")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
