"""Data parallelism: the jitted steps on a 4-device mesh give the 1-device result (global-batch BatchNorm)."""
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mgd_jax import optim
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.methods import get_method
from mgd_jax.models import get_model
from mgd_jax.stages import analyzer as analyzer_stage
from mgd_jax.stages import student as student_stage
from mgd_jax.stages import teacher as teacher_stage
from mgd_jax.train import mesh as mesh_lib

AUG = ml_collections.ConfigDict(dict(pad=2, flip=True, mean=(0.3,), std=(0.4,)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(1,), gamma=0.1))
GRANS = parse_granularities([(16, 2.0), (32, 8.0)])


def _batches(n_steps, bs=16):
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, size=(bs, 16, 16, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, size=(bs,)).astype(np.int32)} for _ in range(n_steps)]


def _run_all_stages(devices):
    mesh = mesh_lib.make_mesh(devices)
    key = jax.random.key(0)
    batches = _batches(3)
    sample = jnp.zeros((2, 16, 16, 1))
    # stage 1
    t_model = get_model("resnet8", 10)
    tx = optim.sgd(OPT, 2)
    t_state = mesh_lib.replicate(teacher_stage.init_state(t_model, tx, key, sample), mesh)
    step = jax.jit(teacher_stage.make_train_step(t_model, tx, AUG))
    base = mesh_lib.replicate(jax.random.key(7), mesh)
    for b in batches:
        t_state, t_metrics = step(t_state, mesh_lib.shard_batch(b, mesh), base)
    t_vars = {"params": t_state.params, "batch_stats": t_state.batch_stats}
    # stage 2 (shared pass)
    an = GranularityAnalyzer(GRANS, 10)
    names = tuple(g.name for g in GRANS)
    a_states = mesh_lib.replicate(analyzer_stage.init_states(an, tx, key, 64), mesh)
    a_step = jax.jit(analyzer_stage.make_train_step(t_model, an, tx, AUG, names))
    for b in batches:
        a_states, _ = a_step(a_states, t_vars, mesh_lib.shard_batch(b, mesh), base)
    tubes = {n: a_states[n].params for n in names}
    # stage 3, MAS + KD
    s_mods = student_stage.StudentModules(get_model("resnet8", 10), GranularityAnalyzer(GRANS, 10, False),
                                          get_method("kd"))
    t_mods = student_stage.TeacherModules(t_model, an)
    teacher = {"backbone": t_vars, "analyzer": tubes}
    obj = student_stage.Objective("mas", GRANS, w_ce=0.2, w_logit_kd=0.8)
    s_state = mesh_lib.replicate(
        student_stage.init_state(s_mods, t_mods, jax.device_get(teacher), tx, key, sample), mesh)
    s_step = jax.jit(student_stage.make_train_step(s_mods, t_mods, obj, tx, AUG))
    for b in batches:
        s_state, s_metrics = s_step(s_state, teacher, mesh_lib.shard_batch(b, mesh), base)
    assert len(s_state.params["backbone"]["fc"]["kernel"].sharding.device_set) == len(devices)
    return jax.device_get((t_state.params, t_state.batch_stats, tubes, s_state.params, s_state.batch_stats,
                           s_metrics))


def _require_four_devices():
    if jax.device_count() < 4:  # a failure, not a skip: CI must run these
        pytest.fail(f"needs 4 devices, found {jax.device_count()}: tests/conftest.py sets XLA_FLAGS="
                    "--xla_force_host_platform_device_count=4 before jax starts (was jax imported before conftest, "
                    "or XLA_FLAGS set to another count?)")


def test_four_devices_equal_one_device():
    _require_four_devices()
    one = _run_all_stages(jax.devices()[:1])
    four = _run_all_stages(jax.devices()[:4])
    chex.assert_trees_all_close(one, four, atol=1e-5, rtol=1e-5)
    # the metrics dict carries every named term of the MAS objective
    assert {"loss", "loss/ce", "loss/stable_excitation", "loss/granularity/16d_T2", "loss/granularity/32d_T8",
            "acc1", "grad_norm"} <= set(one[-1])
    # and the steps really changed something (the comparison is not between two initial states)
    assert float(np.abs(one[0]["fc"]["kernel"]).sum()) > 0 and one[-1]["grad_norm"] > 0


def _perturbed(tree, seed, scale=0.02):
    """``tree`` + scale * |N(0, 1)| per entry: no BatchNorm statistic left at its 0 / 1 init, no zero bias."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(a + scale * np.abs(rng.standard_normal(a.shape)), a.dtype), tree)


def test_teacher_is_frozen_by_construction():
    """The optimizer updates ``state.params`` and the step writes ``state.batch_stats``; the teacher is in
    neither (so nothing can train it or its BN statistics), it is read from the step's argument, and it runs in
    inference mode (running statistics: a sample's outputs do not depend on the rest of the batch)."""
    t_model = get_model("resnet8", 10)
    an = GranularityAnalyzer(GRANS, 10)
    key = jax.random.key(0)
    sample = jnp.zeros((2, 16, 16, 1))
    teacher = _perturbed({"backbone": t_model.init(jax.random.key(11), sample),
                          "analyzer": an.init(jax.random.key(12), jnp.zeros((1, 64)))["params"]}, 13)
    s_an = GranularityAnalyzer(GRANS, 10, False)
    s_mods = student_stage.StudentModules(get_model("resnet8", 10), s_an, get_method("kd"))
    t_mods = student_stage.TeacherModules(t_model, an)
    tx = optim.sgd(OPT, 2)
    state = student_stage.init_state(s_mods, t_mods, teacher, tx, key, sample)
    # what the optimizer trains is exactly the student's backbone and its encoders (no decoders), nothing more
    assert set(state.params) == {"backbone", "analyzer"} and set(state.batch_stats) == {"backbone"}
    assert all("decoder" not in k for k in state.params["analyzer"]["16d_T2"])  # student decoders are not trained
    n_student = sum(a.size for a in jax.tree.leaves(jax.eval_shape(
        lambda: (get_model("resnet8", 10).init(key, sample)["params"],
                 s_an.init(key, jnp.zeros((1, 64)), decode=False)["params"]))))
    assert sum(a.size for a in jax.tree.leaves(state.params)) == n_student
    t_leaves = [np.asarray(a) for a in jax.tree.leaves(teacher)]

    def holds_teacher_leaf(tree):
        return any(a.shape == t.shape and np.array_equal(a, t) for a in map(np.asarray, jax.tree.leaves(tree))
                   for t in t_leaves)

    assert not holds_teacher_leaf((state.params, state.batch_stats, state.opt_state))
    step = jax.jit(student_stage.make_train_step(s_mods, t_mods, student_stage.Objective("mag", GRANS), tx, AUG))
    b = _batches(1)[0]
    new_state, m = step(state, teacher, b, jax.random.key(3))
    assert int(new_state.step) == 1 and np.isfinite(m["loss"])
    # the step returns the same trees: no teacher variable or statistic joins the state on the way
    for name in ("params", "batch_stats", "opt_state"):
        assert jax.tree.structure(getattr(new_state, name)) == jax.tree.structure(getattr(state, name)), name
    assert not holds_teacher_leaf((new_state.params, new_state.batch_stats))
    # the teacher is read from the argument: another teacher gives another update
    other_state, _ = step(state, _perturbed(teacher, 14), b, jax.random.key(3))
    assert max(jax.tree.leaves(jax.tree.map(lambda a, c: float(jnp.max(jnp.abs(a - c))), other_state.params,
                                            new_state.params))) > 1e-4
    # inference mode: the teacher's outputs for 4 samples do not depend on the other 12 of the batch
    fwd = functools.partial(student_stage.teacher_forward, t_mods, decode=True, preact=False)
    x = jnp.asarray(b["image"], jnp.float32) / 255.0
    full, part = jax.jit(lambda t: (fwd(t, x), fwd(t, x[:4])))(teacher)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[:4], (full.logits, full.encodings, full.decodings)),
                                (part.logits, part.encodings, part.decodings), atol=1e-5, rtol=1e-5)


def _crd_steps(devices):
    """CRD + MAG student steps: memory banks and Z in the state, indices in the batch, sharded over devices."""
    from mgd_jax.data.contrast import ContrastSampler

    mesh = mesh_lib.make_mesh(devices)
    key = jax.random.key(0)
    sample = jnp.zeros((2, 16, 16, 1))
    t_model = get_model("resnet8", 10)
    an = GranularityAnalyzer(GRANS, 10)
    t_vars = t_model.init(key, sample)
    teacher = {"backbone": t_vars, "analyzer": an.init(key, jnp.zeros((1, 64)))["params"]}
    method = get_method("crd", nce_k=24, feat_dim=16)
    s_mods = student_stage.StudentModules(get_model("resnet8", 10), GranularityAnalyzer(GRANS, 10, False), method)
    t_mods = student_stage.TeacherModules(t_model, an)
    tx = optim.sgd(OPT, 2)
    obj = student_stage.Objective("mag", GRANS, w_method=0.8)
    state = mesh_lib.replicate(student_stage.init_state(s_mods, t_mods, teacher, tx, key, sample,
                                                        {"num_train": 64}), mesh)
    teacher = mesh_lib.replicate(teacher, mesh)
    step = jax.jit(student_stage.make_train_step(s_mods, t_mods, obj, tx, AUG))
    labels = np.random.default_rng(0).integers(0, 10, 64).astype(np.int32)
    sampler = ContrastSampler(labels, 24)
    base = mesh_lib.replicate(jax.random.key(7), mesh)
    for i, b in enumerate(_batches(3)):
        idx = np.arange(16 * i, 16 * (i + 1))
        b = {**b, "label": labels[idx], **sampler(idx, 0, 0, i)}
        state, _ = step(state, teacher, mesh_lib.shard_batch(b, mesh), base)
    return jax.device_get((state.params, state.batch_stats, state.method_state))


def test_crd_memory_four_devices_equal_one_device():
    _require_four_devices()
    one, four = _crd_steps(jax.devices()[:1]), _crd_steps(jax.devices()[:4])
    chex.assert_trees_all_close(one, four, atol=1e-5, rtol=1e-5)
    mem = one[2]["memory_v1"]
    np.testing.assert_allclose(np.linalg.norm(mem[:48], axis=1), 1.0, rtol=1e-5)  # the 48 rows seen were updated
