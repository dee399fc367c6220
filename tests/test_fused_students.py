"""Fused students: the students of a run share one teacher pass per batch, unrolled or (config.student.vmap) those
of one method as one vmapped program; each ends as if it ran alone (float32 noise at most), and a kill between two
members' saves resumes bitwise exactly."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import smoke
from conftest import xla_flags
import test_reliability
from mgd_jax import pipeline
from mgd_jax.stages import student as student_stage
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import faults

reference_run = test_reliability.reference_run  # the smoke config trained once by train.py, a session fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG = "resnet8,resnet8,kd,all"  # three students: kd with none / mag / mas


def _students(workdir, names, which="latest"):
    out = {}
    for name in names:
        ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, "students", name, "checkpoints"))
        try:
            mngr = getattr(ck, which)
            out[name] = mngr.restore(mngr.latest_step(),
                                     args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        finally:
            ck.close()
    return out


def _crd_config(group_size):
    c = smoke.get_config(ARG)
    crd = smoke.get_config("resnet8,resnet8,crd,mas").students.crd_mas
    crd.method_options.nce_k, crd.method_options.feat_dim = 16, 16
    ab = smoke.get_config("resnet8,resnet8,abound,mag").students.abound_mag
    ab.init.epochs = 1
    c.students.crd_mas, c.students.abound_mag = crd, ab
    c.student.group_size = group_size
    # students of their own seeds: each its own initialisation, data order and augmentation (CRD's indices too)
    c.students.kd_mag.seed, c.students.crd_mas.seed = 7, 3
    return c


def _best_steps(workdir, names):
    out = {}
    for name in names:
        ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, "students", name, "checkpoints"))
        try:
            out[name] = ck.best.latest_step()
        finally:
            ck.close()
    return out


def _metric_rows(workdir, name):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "students", name, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "host_rss_mib")} for r in rows]


@pytest.mark.timeout(900)
def test_fused_students_equal_their_separate_runs(smoke_workdir, tmp_path, monkeypatch):
    """One group of five (kd none / mag / mas, CRD with its own indices, AB with the teacher's pre-activation
    features and an init stage; kd_mag and CRD with seeds of their own: three data orders), unrolled (vmap off) and
    vmapped (vmap on: the three KD students one program, CRD and AB each their own), against the same students one
    after another, from the same teacher.  Each fused run builds one group step of the five, fed the three orders,
    and trains with it; the separate run builds none.  Every student ends as alone (float32 noise at most), with
    its own metrics (the same terms, the same values up to noise) and best epoch."""
    import shutil

    src, _ = smoke_workdir
    real_group_step, groups = student_stage.make_group_train_step, []

    def group_step(members, t, aug, vmap=False, orders=None, devices=1):  # -> [members, times traced, subgroups,
        fused = real_group_step(members, t, aug, vmap, orders, devices)  # data orders]: jit traces on its first run
        seen = [sorted(members), 0, student_stage.vmap_subgroups(members) if vmap else None, orders]
        groups.append(seen)

        def step(*a):
            seen[1] += 1
            return fused(*a)
        return step

    monkeypatch.setattr(student_stage, "make_group_train_step", group_step)
    runs = {}
    for size, vmap in ((0, "off"), (0, "on"), (1, "on")):
        work = str(tmp_path / f"size{size}_{vmap}")
        for stage in ("teacher", "analyzer"):
            shutil.copytree(os.path.join(src, stage), os.path.join(work, stage))
        c = _crd_config(size)
        c.student.vmap = vmap
        groups.clear()
        summary = pipeline.train_and_evaluate(c, work, devices=jax.devices()[:2])
        runs[size, vmap] = (work, summary, list(c.students))
        if size == 0:  # one group step of the five, and it ran
            assert [g[0] for g in groups] == [sorted(f"student/{n}" for n in c.students)] and len(c.students) == 5
            assert groups[0][1] >= 1, groups
            assert groups[0][3] == {"student/abound_mag": 0, "student/crd_mas": 1, "student/kd_mag": 2,
                                    "student/kd_mas": 0, "student/kd_none": 0}, groups  # in config (name) order
            if vmap == "on":
                assert sorted(map(sorted, groups[0][2])) == [["student/abound_mag"], ["student/crd_mas"], [
                    "student/kd_mag", "student/kd_mas", "student/kd_none"]], groups
        else:  # group_size=1: each student alone, no group step
            assert groups == [], groups
    alone, s_alone, names = runs[1, "on"]
    b = _students(alone, names)
    for vmap in ("off", "on"):
        fused, s_fused, _ = runs[0, vmap]
        a = _students(fused, names)
        # Float32 noise (the vmapped convolutions sum in another order; the teacher's batch holds every data order)
        # can flip a ReLU at its kink: one step's gradient then jumps by one term (measured: ~2e-4 in one step of a
        # resnet8 student, its momentum 5e-3 off by the end, its parameters 5e-5, every logged loss within 1e-4;
        # the same run on one device instead of two: 1e-7).  A student that stepped on another's rows or target is
        # off by 1e-2 or more in its parameters and losses.
        def without_momentum(states):
            return {n: {k: v for k, v in st.items() if k != "opt_state"} for n, st in states.items()}

        chex.assert_trees_all_close(without_momentum(a), without_momentum(b), rtol=1e-3, atol=1e-3)
        chex.assert_trees_all_close({n: st["opt_state"] for n, st in a.items()},
                                    {n: st["opt_state"] for n, st in b.items()}, rtol=1e-2, atol=2e-2)
        chex.assert_trees_all_close(_students(fused, names, "best"), _students(alone, names, "best"), rtol=1e-3,
                                    atol=1e-3)
        assert _best_steps(fused, names) == _best_steps(alone, names)
        assert [r["stage"] for r in s_fused["rows"]] == [r["stage"] for r in s_alone["rows"]]
        for name in names:  # each member's own metrics file, one row per epoch, the terms it logs alone
            mine, its = _metric_rows(fused, name), _metric_rows(alone, name)
            assert [r["epoch"] for r in mine] == [1, 2]
            assert [sorted(r) for r in mine] == [sorted(r) for r in its], name
            chex.assert_trees_all_close(mine, its, rtol=1e-3, atol=1e-5)


def _train(workdir, kill=None, vmap="off", *flags):
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env["XLA_FLAGS"] = xla_flags()
    if kill:
        env[faults.ENV] = kill
    return subprocess.run([sys.executable, "train.py", f"--config=configs/smoke.py:{ARG}", f"--workdir={workdir}",
                           f"--config.student.vmap={vmap}", *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("vmap", ["off", "on"])
def test_a_kill_between_members_saves_resumes_the_group_exactly(reference_run, tmp_path, vmap):
    """Killed after the first member saved a mid-epoch step and before the next one did: the restart resumes all
    three from the step they all have, and ends bitwise equal to an uninterrupted fused run (unrolled, and the
    three as one vmapped program).  Unrolled, a second kill lets the first member finish: the other two resume as
    a group of two, still bitwise (each member's update is its own).  Vmapped, a group of two is another program
    (float32 noise, docs/speed.md): one kill, after the first member saved the end of epoch 1, and the three resume
    from the step they all have, mid-epoch; there one student has a seed of its own (two data orders, each resumed
    at its own batch).  The teacher and analyzer are the shared
    reference run's (the same smoke config for those stages, checked by the workdir's fingerprints)."""
    import shutil

    ref, work = str(tmp_path / "ref"), str(tmp_path / "killed")
    for w in (ref, work):  # the kills are in the students' stage
        for stage in ("teacher", "analyzer"):
            shutil.copytree(os.path.join(reference_run, stage), os.path.join(w, stage))
    flags = ["--config.students.kd_mag.seed=5"] if vmap == "on" else []
    r = _train(ref, None, vmap, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiling the teacher step" not in r.stdout and "compiling the analyzer step" not in r.stdout, r.stdout
    names = sorted(smoke.get_config(ARG).students)
    first, second = f"student/{names[0]}", f"student/{names[1]}"
    # unrolled: killed in epoch 2 (the common step is 3), then before the second member's last save; vmapped: once,
    # before the second member's save at the end of epoch 1 (the first has saved step 3 and its best, the others
    # only step 2): the three resume as one group from step 2, in the middle of epoch 1
    kills = [f"{second}:before_mid:2", f"{second}:before_latest"] if vmap == "off" else [f"{second}:before_latest"]
    for kill in kills:
        r = _train(work, kill, vmap, *flags)
        assert r.returncode == -9, (kill, r.stderr[-2000:])
    r = _train(work, None, vmap, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    if vmap == "off":  # the first member finished; the other two resume from their mid-epoch step 4
        want = [f"[student/{names[0]}] finished earlier (2 epochs)"] + [
            f"[student/{n}] resuming at epoch 2, pass 1, batch 1" for n in names[1:]]
    else:  # the three from step 2, mid-epoch 1
        want = [f"[student/{n}] resuming at epoch 1, pass 1, batch 2" for n in names]
    assert all(line in r.stdout for line in want), (want, r.stdout[-3000:])
    for which in ("latest", "best"):
        chex.assert_trees_all_equal(_students(ref, names, which), _students(work, names, which))
    assert json.load(open(os.path.join(ref, "summary.json"))) == json.load(open(os.path.join(work, "summary.json")))
    np.testing.assert_equal(len(open(os.path.join(work, "students", names[0], "metrics.jsonl")).readlines()), 2)


def test_lockstep_groups_never_send_a_student_with_checkpoints_back_to_the_start(tmp_path):
    """Who trains with whom after a restart: the newest step all share; a finished stage alone; a stage whose
    checkpoints share no step with the others keeps its own point (never the start)."""
    from mgd_jax.train.loop import StageSpec, lockstep_groups

    def spec(name, steps, finished=False):
        d = str(tmp_path / name)
        ck = ckpt_lib.StageCheckpoints(os.path.join(d, "checkpoints"), keep=3)
        try:
            for s in steps:
                done = finished and s == steps[-1]
                ck.save_latest(s, {"w": np.zeros(2)}, {"epoch": 2 if done else 1, "best": {},
                                                       **({} if done else {"position": {"pass": 0, "batch": s}})})
        finally:
            ck.close()
        return StageSpec(name=name, directory=d, num_epochs=2, batch_size=8, seed=0, meta={}, passes=[],
                         evaluate=None, improve=None, export=None)

    a, b, c, d = spec("a", [2, 4]), spec("b", [2]), spec("c", []), spec("d", [2, 6], finished=True)
    e, f = spec("e", [4]), spec("f", [2])  # keep=1 and a kill between their saves: nothing in common but 0
    got = [([s.name for s in group], step) for group, step in lockstep_groups([a, b, c, d])]
    assert got == [(["d"], None), (["c"], 0), (["a", "b"], 2)]
    got = [([s.name for s in group], step) for group, step in lockstep_groups([e, f])]
    assert got == [(["e"], 4), (["f"], 2)]


# --- students of one method as one vmapped program (config.student.vmap) -------------------------------------------
def _tiny_group(method="dkd", logit_standardization=False):
    """Three students of one method in modes none / mag / mas, each with its own weights, on a resnet8 teacher;
    8x8 grey images, two steps per epoch (DKD's warm-up reads the epoch)."""
    import jax.numpy as jnp
    import ml_collections

    from mgd_jax import optim
    from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
    from mgd_jax.methods import get_method
    from mgd_jax.models import get_model

    S, nc, key = student_stage, 10, jax.random.key(0)
    grans = parse_granularities(((16, 2.0), (32, 8.0)))
    sample = jnp.zeros((2, 8, 8, 1))
    t_model = get_model("resnet8", nc)
    t_vars = t_model.init(key, sample)
    t_an = GranularityAnalyzer(grans, nc)
    teacher = {"backbone": t_vars, "analyzer": t_an.init(jax.random.key(1), jnp.zeros((1, 64)))["params"]}
    t_mods = S.TeacherModules(t_model, t_an)
    tx = optim.sgd(ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, weight_decay=5e-4, milestones=(1,),
                                                  gamma=0.1)), 2)
    members, states = {}, {}
    for i, (mode, w) in enumerate([("none", dict(w_method=2.0)), ("mag", dict(w_ce=0.2, w_logit_kd=0.0)),
                                   ("mas", dict(w_logit_kd=0.8, w_granularity=0.5))]):
        s = S.StudentModules(get_model("resnet8", nc), None if mode == "none" else
                             GranularityAnalyzer(grans, nc, False), get_method(method))
        name = f"{method}_{mode}"
        members[name] = (s, S.Objective(mode, grans, steps_per_epoch=2, logit_standardization=logit_standardization,
                                         **w), tx)
        states[name] = S.init_state(s, t_mods, teacher, tx, jax.random.fold_in(key, i), sample, {"num_train": 32})
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8),
                "label": rng.integers(0, nc, 8).astype(np.int32)} for _ in range(3)]
    aug = smoke.get_config().augment
    return members, states, t_mods, teacher, batches, aug


def test_a_vmapped_group_step_holds_one_students_convolutions_and_each_member_steps_as_alone():
    """vmap on, 3 same-method students (DKD, a logit method: the MAS member distils towards the stable-excitation
    target, the others the teacher's logits) of two seeds (data orders) on 2 devices: the batch holds one batch per
    order (``mesh.interleave`` of each device's rows), the key one key per order.  The optimized HLO of the group
    step holds the convolutions of one student (the teacher runs once, on both orders' images; the members'
    convolutions one batched kernel) and moves no rows between devices (no all-to-all or collective-permute); the
    unrolled step of two holds about 1.75x theirs (the teacher's once, each student's own).  After 3 steps each member's state and metrics equal that member
    trained alone on its own order's batches and key (float32 noise), each with its own state structure (mode
    'none': no encoders) and the terms it logs alone; the unrolled group of the two members of one order (the step
    as before seeds) equals their runs alone to 1e-6.  One order vmapped: the OFD test below; unrolled with several
    orders: ``test_fused_students_equal_their_separate_runs``."""
    import jax.numpy as jnp

    from mgd_jax.train import mesh as mesh_lib

    members, states, t_mods, teacher, batches, aug = _tiny_group()
    orders = {"dkd_none": 0, "dkd_mag": 1, "dkd_mas": 1}  # the MAS and MAG members share order 1
    rng = np.random.default_rng(1)
    other = [{"image": rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8),
              "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(3)]
    assert not np.array_equal(batches[0]["image"], other[0]["image"])  # the orders' batches differ
    by_order, keys = [batches, other], [jax.random.key(2), jax.random.key(5)]
    fused_batches = [{k: mesh_lib.interleave([b0[k], b1[k]], 2) for k in b0} for b0, b1 in zip(batches, other)]
    assert not np.array_equal(fused_batches[0]["image"][:8], batches[0]["image"])  # the layout is not concatenation
    mesh = mesh_lib.make_mesh(jax.devices()[:2])

    def train(group, step_batches, key, vmap=False, orders=None, sharded=False):
        step = jax.jit(student_stage.make_group_train_step(group, t_mods, aug, vmap, orders, 2))
        state, frozen = {k: states[k] for k in group}, teacher
        if sharded:
            state, frozen, key = mesh_lib.replicate((state, frozen, key), mesh)
            step_batches = [mesh_lib.shard_batch(b, mesh) for b in step_batches]
        hlo = step.lower(state, frozen, step_batches[0], key).compile().as_text()
        history = []
        for b in step_batches:
            state, metrics = step(state, frozen, b, key)
            history.append(jax.device_get(metrics))
        return jax.device_get(state), history, hlo.count("convolution("), hlo

    alone = {name: train({name: members[name]}, by_order[orders[name]], keys[orders[name]]) for name in members}
    one = alone["dkd_mas"][2]
    state, history, convs, hlo = train(members, fused_batches, jnp.stack(keys), True, orders, sharded=True)
    assert convs == one, (convs, one)
    assert "all-to-all" not in hlo and "collective-permute" not in hlo
    for name in members:
        assert jax.tree.structure(state[name]) == jax.tree.structure(states[name])
        assert int(state[name].step) == 3
        chex.assert_trees_all_close(state[name], alone[name][0][name], rtol=1e-5, atol=2e-6)
        for a, b in zip(history, alone[name][1]):
            assert sorted(a[name]) == sorted(b[name]), (name, sorted(a[name]), sorted(b[name]))
            # a KL of T=8 encodings (x T^2 = 64, of a ~0.01 value) shows float32 noise at ~1e-6 absolute
            chex.assert_trees_all_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    assert "analyzer" not in state["dkd_none"].params
    assert {k for k in history[0]["dkd_mas"] if k.startswith("loss/")} == {
        "loss/ce", "loss/stable_excitation", "loss/method", "loss/granularity/16d_T2", "loss/granularity/32d_T8"}
    assert {k for k in history[0]["dkd_mag"] if k.startswith("loss/")} == {
        "loss/ce", "loss/method", "loss/granularity/16d_T2", "loss/granularity/32d_T8"}  # logit KD weighs 0
    assert {k for k in history[0]["dkd_none"] if k.startswith("loss/")} == {"loss/ce", "loss/logit_kd", "loss/method"}
    one_order = {k: members[k] for k in ("dkd_mag", "dkd_mas")}
    state, history, convs, _ = train(one_order, other, keys[1])
    assert convs >= 1.5 * one, (convs, one)  # unrolled: the teacher's once, then each member's own (~1.75x)
    for name in one_order:
        chex.assert_trees_all_close(state[name], alone[name][0][name], rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(history[-1][name], alone[name][1][-1][name], rtol=1e-6, atol=1e-7)


def test_a_checkpoint_from_before_student_seeds_resumes_only_at_the_runs_seed():
    """A stored config without ``students.<name>.seed`` (written before students had seeds) was trained at the
    run's seed: resuming it at the run's seed goes on; with a seed of the student's own it is refused in one line
    that names the field and how to finish the run as it was started."""
    from mgd_jax.errors import StageMismatchError
    from mgd_jax.stages.common import RUN_SEED
    from mgd_jax.train.checkpoint import ADDED_FIELDS, check_meta

    assert ADDED_FIELDS["config.students.*.seed"] == RUN_SEED
    old = {"stage": "student", "config": {"config.seed": 0, "config.students.kd_mas.method": "kd"}}

    def expected(seed):
        return {"stage": "student", "config": {"config.seed": 0, "config.students.kd_mas.method": "kd",
                                               "config.students.kd_mas.seed": seed}}

    check_meta(old, expected(RUN_SEED), "w/students/kd_mas/checkpoints/latest")
    with pytest.raises(StageMismatchError) as e:
        check_meta(old, expected(3), "w/students/kd_mas/checkpoints/latest")
    assert str(e.value) == ("w/students/kd_mas/checkpoints/latest was written for config.students.kd_mas.seed=-1 but "
                            "the config asks for config.students.kd_mas.seed=3; use another --workdir, or delete "
                            "w/students/kd_mas (and the stages trained after it), or "
                            "--config.students.kd_mas.seed=-1 to finish it as it was started")


def test_interleaved_batches_split_on_a_sharded_mesh_without_mixing_orders():
    """``mesh.interleave`` of 3 orders' batches, sharded over 2 devices, splits back (``deinterleave``, jitted) to
    each order's rows in order; each device's shard holds only its own rows of every order."""
    import jax.numpy as jnp

    from mgd_jax.train import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    parts = [np.arange(8) + 100 * k for k in range(3)]
    rows = mesh_lib.interleave(parts, 2)
    batch = mesh_lib.shard_batch({"x": rows}, mesh)["x"]
    for shard in batch.addressable_shards:  # device d: rows d*4 .. d*4+3 of each order
        d = shard.index[0].start // 12
        assert sorted(np.asarray(shard.data) % 100) == sorted(list(range(4 * d, 4 * d + 4)) * 3), shard.data
    split = jax.jit(lambda x: mesh_lib.deinterleave(x, 3, 2))(batch)
    np.testing.assert_array_equal(np.asarray(split), np.stack(parts))
    np.testing.assert_array_equal(mesh_lib.deinterleave(rows, 3, 2), np.stack(parts))
    assert mesh_lib.interleave(parts[:1], 2) is parts[0]
    with pytest.raises(ValueError, match="interleave"):
        mesh_lib.interleave([np.arange(8), np.arange(6)], 2)


@pytest.mark.parametrize("path", ["host", "on_device", "streaming"])
def test_the_loop_feeds_each_seeds_rows_and_key_on_every_data_path(tmp_path, path):
    """A group of three stages, two of one seed and one of another, on 2 devices: every step of the one group step
    receives each seed's own shuffled rows (labels and images, on the host path, gathered on the devices, and
    decoded by a streaming dataset with its seed) in ``mesh.interleave``'s layout, the epoch's last, smaller batch
    included, and one key per seed; each member's checkpoint and export are its own."""
    import jax.numpy as jnp

    from mgd_jax.stages.common import best_by
    from mgd_jax.train import mesh as mesh_lib
    from mgd_jax.train.loop import StageSpec, data_orders, fit_group

    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    n, bs, epochs = 22, 4, 2  # 5 batches of 4 and one of 2 per epoch
    steps = 6 * epochs
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)  # each image is its row's number
    labels = (np.arange(n) % 3).astype(np.int32)
    streamed_seeds = []

    class Streaming:
        streaming, image_shape, train_images, train_labels = True, (1, 1, 1), None, labels

        def train_batches(self, batches, seed, epoch, pass_id, process_index=0, process_count=1):
            streamed_seeds.append(seed)
            for idx in batches:
                yield images[idx]

    dataset = Streaming() if path == "streaming" else type("DS", (), dict(train_images=images,
                                                                          train_labels=labels))()
    specs = [StageSpec(name=f"m{i}", directory=str(tmp_path / f"m{i}"), num_epochs=epochs, batch_size=bs, seed=seed,
                       meta={"stage": f"m{i}"}, passes=[], evaluate=lambda s: {"acc1": 0.0},
                       improve=best_by("test/acc1"), export=lambda s, prev, imp: s, on_device=path == "on_device")
             for i, seed in enumerate((11, 12, 11))]
    seeds = data_orders(specs)
    assert seeds == [11, 12]

    def step(states, frozen, batch, key):
        rows = mesh_lib.deinterleave(batch["image"].reshape(-1), 2, 2).astype(jnp.int32)
        labs = mesh_lib.deinterleave(batch["label"], 2, 2)
        new = {}
        for name, st in states.items():
            o = seeds.index(specs[int(name[1])].seed)
            kd = jax.random.key_data(key[o])
            size = rows.shape[1]  # the last batch: its rows, the rest of the record -1
            new[name] = {"step": st["step"] + 1,
                         "rows": st["rows"].at[st["step"]].set(jnp.full(bs, -1).at[:size].set(rows[o])),
                         "labels": st["labels"].at[st["step"]].set(jnp.full(bs, -1).at[:size].set(labs[o])),
                         "keys": st["keys"].at[st["step"]].set(kd.reshape(-1))}
        return new, {k: {"loss": jnp.float32(0.0)} for k in states}

    def fresh():
        return {"step": jnp.int32(0), "rows": jnp.zeros((steps, bs), jnp.int32),
                "labels": jnp.zeros((steps, bs), jnp.int32), "keys": jnp.zeros((steps, 2), jnp.uint32)}

    states = {s.name: mesh_lib.replicate(fresh(), mesh) for s in specs}
    likes = {s.name: jax.device_get(fresh()) for s in specs}
    out, exports, _ = fit_group(specs, [("p", jax.jit(step, donate_argnums=0))], states, None, dataset, mesh, likes)
    if path == "streaming":
        assert streamed_seeds == [11, 12] * epochs
    for spec in specs:
        got = jax.device_get(out[spec.name])
        want = np.stack([np.pad(b, (0, bs - len(b)), constant_values=-1) for e in range(epochs)
                         for b in mesh_lib.epoch_batches(n, bs, spec.seed, e, 0, 2)])
        assert want.shape == (steps, bs) and (want[5] == -1).sum() == 2
        np.testing.assert_array_equal(got["rows"], want)
        np.testing.assert_array_equal(got["labels"], np.where(want >= 0, labels[want], -1))
        key_data = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(spec.seed), 0))).reshape(-1)
        np.testing.assert_array_equal(got["keys"], np.broadcast_to(key_data, (steps, key_data.size)))
        np.testing.assert_array_equal(exports[spec.name]["rows"][:6], want[:6])  # best: epoch 1
    assert not np.array_equal(jax.device_get(out["m0"]["rows"]), jax.device_get(out["m1"]["rows"]))


@pytest.mark.slow
def test_vmapped_students_with_method_parameters_and_state_equal_the_loop():
    """OFD (its own parameters and BatchNorm statistics, stacked with the students': the mode-'none' member's
    missing encoders padded) under logit standardization: 2 vmapped steps end within float32 noise of the
    unrolled ones, method parameters and statistics included."""
    members, states, t_mods, teacher, batches, aug = _tiny_group("ofd", logit_standardization=True)
    assert all(st.params.get("method") and st.method_state for st in states.values())
    base, ends = jax.random.key(2), {}
    for vmap in (False, True):
        step = jax.jit(student_stage.make_group_train_step(members, t_mods, aug, vmap))
        start = dict(states)
        for b in batches[:2]:
            start, metrics = step(start, teacher, b, base)
        ends[vmap] = jax.device_get((start, metrics))
    assert student_stage.vmap_subgroups(members) == [list(members)]
    # OFD's partial-L2 sums are large: the batched convolutions' float32 noise grows to ~2e-5 in the parameters and
    # ~7e-5 in the momentum after 2 steps (VID under logit standardization, no method state: 1e-7); a member that
    # read another's parameters or statistics would be off by their size, ~1e-1
    for name in members:
        chex.assert_trees_all_close(ends[True][0][name], ends[False][0][name], rtol=1e-3, atol=2e-4)
        chex.assert_trees_all_close(ends[True][1][name], ends[False][1][name], rtol=1e-3, atol=2e-4)


def test_which_students_share_one_vmapped_program():
    """The paper table's methods x 3 modes: one subgroup of 3 per method; CRD (a memory bank and batch extras per
    student) one by one; another temperature, method option or optimizer: another program.  'auto' per backend."""
    import optax

    from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
    from mgd_jax.methods import get_method
    from mgd_jax.models import get_model

    S, grans, tx = student_stage, parse_granularities(((16, 2.0),)), optax.sgd(0.1)
    methods = ["kd", "hint", "attention", "similarity", "rkd", "pkt", "crd", "dkd"]

    def member(method, mode, t=4.0, opt=tx, **options):
        an = None if mode == "none" else GranularityAnalyzer(grans, 10, False)
        return (S.StudentModules(get_model("resnet8", 10), an, get_method(method, **options)),
                S.Objective(mode, grans, temperature=t), opt)

    members = {f"{m}_{mode}": member(m, mode) for m in methods for mode in ("none", "mag", "mas")}
    groups = S.vmap_subgroups(members)
    assert groups == [[f"{m}_{mode}" for mode in ("none", "mag", "mas")] for m in methods if m != "crd"
                      ][:6] + [["crd_none"], ["crd_mag"], ["crd_mas"], ["dkd_none", "dkd_mag", "dkd_mas"]]
    odd = {"a": member("kd", "mas"), "b": member("kd", "mag", t=2.0), "c": member("kd", "none", opt=optax.sgd(0.1)),
           "d": member("dkd", "mas"), "e": member("dkd", "mag", nckd_beta=4.0), "f": member("kd", "none")}
    assert S.vmap_subgroups(odd) == [["a", "f"], ["b"], ["c"], ["d"], ["e"]]
    # bfloat16 backbones, each student's wrapper built on its own (as the stages build them): still one program
    import dataclasses

    from mgd_jax import precision

    def bf16(method, mode):
        s, o, opt = member(method, mode)
        backbone = precision.with_compute_dtype(get_model("resnet8", 10), "bfloat16")
        return dataclasses.replace(s, backbone=backbone), o, opt

    half = {f"kd_{mode}": bf16("kd", mode) for mode in ("none", "mag", "mas")}
    assert S.vmap_subgroups(half) == [["kd_none", "kd_mag", "kd_mas"]]
    assert [S.vmap_students(v, b) for v, b in [("on", "cpu"), ("off", "gpu"), ("auto", "gpu"), ("auto", "tpu")]] == [
        True, False, False, False]  # not measured on GPU / TPU: the tested unrolled path
    assert S.vmap_students("auto", "cpu") is S.VMAP_AUTO["cpu"]


def test_a_bad_vmap_setting_is_one_line():
    from mgd_jax.config_validation import validate_config
    from mgd_jax.errors import ConfigError

    c = smoke.get_config()
    c.student.vmap = "yes"
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    assert str(e.value) == "config.student.vmap='yes': must be auto, on or off"
