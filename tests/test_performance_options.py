"""Options for speed: bfloat16 compute (float32 master weights), one CPU device per core."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mgd_jax import optim, precision
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.methods import get_method
from mgd_jax.models import get_model
from mgd_jax.stages import student as student_stage

AUG = ml_collections.ConfigDict(dict(pad=2, flip=True, mean=(0.3,), std=(0.4,)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(1,), gamma=0.1))
GRANS = parse_granularities([(16, 2.0), (32, 8.0)])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)  # one compile per dtype for the tests below (the step donates nothing)
def _student_step(dtype):
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8),
             "label": rng.integers(0, 10, size=(16,)).astype(np.int32)}
    sample = jnp.zeros((2, 16, 16, 1))
    t_model = precision.with_compute_dtype(get_model("resnet14", 10), dtype)
    an = GranularityAnalyzer(GRANS, 10)
    t_vars = t_model.init(key, sample)
    tubes = an.init(jax.random.key(1), jnp.zeros((1, 64)))["params"]
    teacher = {"backbone": t_vars, "analyzer": tubes}
    s_mods = student_stage.StudentModules(precision.with_compute_dtype(get_model("resnet8", 10), dtype),
                                          GranularityAnalyzer(GRANS, 10, False), get_method("kd"))
    t_mods = student_stage.TeacherModules(t_model, an)
    tx = optim.sgd(OPT, 2)
    state = student_stage.init_state(s_mods, t_mods, teacher, tx, key, sample)
    obj = student_stage.Objective("mas", GRANS, w_ce=0.2, w_logit_kd=0.8)
    step = jax.jit(student_stage.make_train_step(s_mods, t_mods, obj, tx, AUG))
    new_state, metrics = step(state, teacher, batch, jax.random.key(2))
    return state, new_state, jax.device_get(metrics), step, (state, teacher, batch, jax.random.key(2))


def test_bfloat16_step_keeps_float32_state_and_matches_float32_loss():
    s0, s32, m32, _, _ = _student_step(None)
    _, s16, m16, _, _ = _student_step("bfloat16")
    for leaf in jax.tree.leaves((s16.params, s16.batch_stats, s16.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    # README: every loss term and the gradient norm within bfloat16's rounding, 2^-8 (8 significant bits) = 0.39%
    # relative.  Measured: loss terms <= 0.078% (granularity/16d_T2), gradient norm 0.27%; accuracies equal.
    for k, v in m32.items():
        assert np.isfinite(m16[k]), k
        if k.startswith("acc"):  # a bf16 rounding may flip a near tie: at most one of the 16 samples
            np.testing.assert_allclose(m16[k], v, rtol=0, atol=1 / 16, err_msg=k)
        else:
            np.testing.assert_allclose(m16[k], v, rtol=2.0 ** -8, atol=0, err_msg=k)
    # the update itself: bf16 and f32 steps move the weights the same way
    d32 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, s32.params, s0.params))
    d16 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, s16.params, s0.params))
    cos = sum(float(jnp.vdot(a, b)) for a, b in zip(d32, d16)) / np.sqrt(
        sum(float(jnp.vdot(a, a)) for a in d32) * sum(float(jnp.vdot(b, b)) for b in d16))
    assert cos > 0.99, cos  # measured 0.9965


def test_bfloat16_convolutions_run_in_bfloat16():
    _, _, _, step, args = _student_step("bfloat16")
    text = step.lower(*args).as_text()
    conv_lines = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert conv_lines and all("bf16" in line for line in conv_lines)
    _, _, _, step32, args32 = _student_step(None)
    assert "bf16" not in step32.lower(*args32).as_text()


def test_unknown_precision_is_refused():
    import pytest
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.with_compute_dtype(get_model("resnet8", 10), "fp8")


def _device_count(env_flags, code_prefix=""):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if env_flags is not None:
        env["XLA_FLAGS"] = env_flags
    code = (code_prefix + "from mgd_jax.train import cpu; n = cpu.configure_host_devices(); import jax; "
            "print(n, jax.local_device_count(), cpu.num_cores())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    return [None if w == "None" else int(w) for w in out.stdout.split()]


def test_one_cpu_device_per_core_unless_xla_flags_says_otherwise():
    set_n, devices, cores = _device_count(None)
    assert set_n == cores and devices == cores
    set_n, devices, _ = _device_count("--xla_force_host_platform_device_count=3")
    assert set_n is None and devices == 3
    # too late once a backend has started: nothing is changed (and nothing pretends it was)
    set_n, devices, _ = _device_count(None, "import jax; jax.devices(); ")
    assert set_n is None and devices == 1


def _final_states(workdir):
    """Every stage's latest (final) checkpointed state, as written."""
    import orbax.checkpoint as ocp

    from mgd_jax.train import checkpoint as ckpt_lib

    out = {}
    for stage in ("teacher", "analyzer", "students/mas_kd"):
        ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
        try:
            step = ck.latest.latest_step()
            out[stage] = (step, ck.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
                          ["state"])
        finally:
            ck.close()
    return out


def test_device_resident_data_trains_like_the_host_path(smoke_workdir, tmp_path, monkeypatch):
    """data.on_device=True (rows gathered inside the jitted step) reproduces the host data path's run: every step
    gets row indices (no images), and each stage ends with the host run's parameters (float32 noise at most) and
    summary."""
    from configs import smoke
    from mgd_jax import pipeline
    from mgd_jax.data import load_dataset
    from mgd_jax.train import loop

    host_work, host = smoke_workdir
    config = smoke.get_config()
    config.data.on_device = True
    real_gather, batches = loop.gather_rows, []

    def gather_rows(step):  # the loop's device-resident steps, recording what each is fed
        gathered = real_gather(step)

        def fed_rows(state, frozen, batch, key, data):
            batches.append((sorted(batch), np.asarray(jax.device_get(batch[loop.ROWS]))))
            return gathered(state, frozen, batch, key, data)
        return fed_rows

    monkeypatch.setattr(loop, "gather_rows", gather_rows)
    resident = pipeline.train_and_evaluate(config, str(tmp_path / "w"), devices=jax.devices()[:1])
    n = len(load_dataset(config.data).train_labels)
    steps = {stage: step for stage, (step, _) in _final_states(host_work).items()}
    assert len(batches) == sum(steps.values()) > 0, (len(batches), steps)  # every step of every stage
    for keys, rows in batches:
        assert keys == [loop.ROWS] and rows.dtype == np.int32 and len(set(rows.tolist())) == len(rows) > 0
        assert 0 <= rows.min() and rows.max() < n
    got, want = _final_states(str(tmp_path / "w")), _final_states(host_work)
    for stage in want:
        assert got[stage][0] == want[stage][0], stage
        for a, b in zip(jax.tree.leaves(got[stage][1]), jax.tree.leaves(want[stage][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=stage)
    assert [r["stage"] for r in resident["rows"]] == [r["stage"] for r in host["rows"]]
    for a, b in zip(resident["rows"], host["rows"]):
        for k, v in b.items():
            if isinstance(v, float):
                np.testing.assert_allclose(a[k], v, rtol=1e-4, atol=1e-4, err_msg=f"{b['stage']} {k}")
            else:
                assert a[k] == v, (b["stage"], k)  # best_epoch, the stage's name


def test_gather_rows_step_equals_the_row_step():
    from mgd_jax.train import loop
    from mgd_jax.train import mesh as mesh_lib

    def step(state, frozen, batch, key):
        x = batch["image"].astype(jnp.float32) * frozen + jax.random.normal(key, ())
        return state + jnp.sum(x * batch["label"][:, None, None, None]), {"m": jnp.mean(x)}

    mesh = mesh_lib.make_mesh(jax.devices())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(40,)).astype(np.int32)
    idx = rng.permutation(40)[:8].astype(np.int32)
    data = mesh_lib.replicate({"image": images, "label": labels}, mesh)
    key = jax.random.key(3)
    want = jax.jit(step)(jnp.float32(1), 2.0, mesh_lib.shard_batch({"image": images[idx], "label": labels[idx]},
                                                                     mesh), key)
    got = loop.gather_rows(step)(jnp.float32(1), 2.0, mesh_lib.shard_batch({loop.ROWS: idx}, mesh), key, data)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1]["m"], want[1]["m"], rtol=1e-6)

    # the rest of the batch reaches the step as it is: CRD's 'index' (its memory rows) and 'contrast_idx'
    def crd_like(state, frozen, batch, key):
        return state + jnp.sum(batch["index"]) + jnp.sum(batch["contrast_idx"]), {"m": jnp.mean(batch["image"])}

    extras = {"index": idx + 100, "contrast_idx": np.stack([idx, idx + 1], 1)}
    got = loop.gather_rows(crd_like)(jnp.float32(0), 2.0, mesh_lib.shard_batch({loop.ROWS: idx, **extras}, mesh),
                                     key, data)
    assert float(got[0]) == float(np.sum(idx + 100) + np.sum(np.stack([idx, idx + 1], 1)))


def _teacher_step_hlo(fence: bool, monkeypatch):
    from mgd_jax.models import resnet
    from mgd_jax.stages import teacher as teacher_stage

    if not fence:
        monkeypatch.setattr(resnet, "fusion_fence", lambda x, guard, train: x)
    model = get_model("resnet20", 10)
    tx = optim.sgd(OPT, 2)
    state = teacher_stage.init_state(model, tx, jax.random.key(0), jnp.zeros((2, 16, 16, 1)))
    batch = {"image": np.zeros((8, 16, 16, 1), np.uint8), "label": np.zeros((8,), np.int32)}
    step = jax.jit(teacher_stage.make_train_step(model, tx, AUG))
    out = step(state, batch, jax.random.key(1))
    return step.lower(state, batch, jax.random.key(1)).compile().as_text(), out


def _max_fusion_operands(hlo, prefix):
    import re
    counts = [line.split(" fusion(", 1)[1].split("), kind", 1)[0].count("%")
              for line in hlo.splitlines() if re.match(rf"\s*(ROOT )?%{prefix}[.\d]* = ", line)]
    return max(counts, default=0)


def test_fusion_fence_stops_residual_recompute_and_keeps_the_step(monkeypatch):
    """Without the fence XLA:CPU recomputes the residual chain inside the weight-gradient transposes (many
    operands per fusion); with it each transpose reads stored activations.  Values stay the same."""
    fenced_hlo, (fenced_state, fenced_m) = _teacher_step_hlo(True, monkeypatch)
    plain_hlo, (plain_state, plain_m) = _teacher_step_hlo(False, monkeypatch)
    if jax.default_backend() == "cpu":
        assert _max_fusion_operands(plain_hlo, "transpose_copy_fusion") > 1.5 * _max_fusion_operands(
            fenced_hlo, "transpose_copy_fusion")
    for k in plain_m:
        np.testing.assert_allclose(fenced_m[k], plain_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(fenced_state.params), jax.tree.leaves(plain_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
