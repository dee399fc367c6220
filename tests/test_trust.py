"""What a run promises beyond its numbers: non-finite gradients and parameters stop it, a full disk is one line,
a changed config never continues an old run, float16 is refused, and errors keep their cause."""
import errno
import json
import os
import pickle
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import smoke
from mgd_jax import pipeline
from mgd_jax.config_validation import ConfigError, validate_config
from mgd_jax.train import checkpoint as ckpt_lib
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.loop import StageSpec, fit
from mgd_jax.train.metrics import NonFiniteLossError


# --- non-finite gradients / parameters (item 3) ----------------------------------------------------------------
def _toy_fit(tmp_path, step_fn, every=1, epochs=2, n=8):
    """The real loop on a three-weight 'model', batch 4 (n=8: 2 steps per epoch)."""
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    images = np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1))  # row i: i + 1
    ds = types.SimpleNamespace(train_images=images.copy(), train_labels=np.zeros(n, np.int32))
    state = mesh_lib.replicate({"w": jnp.full((3,), -1.0), "step": jnp.zeros((), jnp.int32)}, mesh)
    spec = StageSpec(name="toy", directory=str(tmp_path / "toy"), num_epochs=epochs, batch_size=4, seed=0,
                     meta={"stage": "toy"}, passes=[("toy", jax.jit(step_fn))],
                     evaluate=lambda s: {"acc1": 0.5}, improve=lambda b, m, e: (m, ["all"]),
                     export=lambda s, prev, imp: {"w": s["w"]}, checkpoint_every_steps=every, progress=False)
    return fit(spec, state, None, ds, mesh, {"w": np.zeros(3, np.float32)}), spec


def _latest_w(tmp_path):
    ck = ckpt_lib.StageCheckpoints(os.path.join(tmp_path, "toy", "checkpoints"))
    try:
        step = ck.latest.latest_step()
        if step is None:
            return None, None
        return step, ck.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        ck.close()


def test_nan_gradient_with_a_finite_loss_stops_the_run(tmp_path):
    """sqrt behind a where: the loss is 0 (finite) for negative weights, its gradient NaN; the NaN weights then
    keep the loss at 0.  Before the fix the loop only looked at the loss and checkpointed NaN weights."""
    def step(state, frozen, batch, key):
        def loss_fn(w):
            w = jnp.where(state["step"] >= 2, w, 1.0)  # steps 1-2: loss 3, gradient 0; from step 3 on: NaN
            return jnp.sum(jnp.where(w > 0, jnp.sqrt(w), 0.0))

        loss, g = jax.value_and_grad(loss_fn)(state["w"])
        return ({"w": state["w"] - 0.1 * g, "step": state["step"] + 1},
                {"loss": loss, "grad_norm": jnp.linalg.norm(g)})

    with pytest.raises(NonFiniteLossError, match=r"toy: gradient norm 'grad_norm' became nan at step 3 "):
        _toy_fit(tmp_path, step)
    step_no, latest = _latest_w(tmp_path)
    assert step_no == 2 and np.all(np.isfinite(latest["w"]))  # the last good step stays the latest


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    """A step whose logged loss and gradient norm stay finite but whose update writes inf (e.g. a buggy
    custom optimizer): refused at the checkpoint instead of becoming the 'last good' state."""
    def step(state, frozen, batch, key):
        w = jnp.where(state["step"] >= 1, jnp.inf, state["w"])
        return {"w": w, "step": state["step"] + 1}, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    with pytest.raises(NonFiniteLossError, match="toy: the trained state became non-finite by step 2"):
        _toy_fit(tmp_path, step, every=2, n=12)  # 3 steps per epoch: a mid-epoch checkpoint after step 2
    assert _latest_w(tmp_path)[0] is None


def test_the_finite_checks_find_any_non_finite_float():
    """The checks before a save: an export (a host copy) with numpy; a state on the mesh with numpy on the CPU
    backend (its arrays are in host memory) unless a leaf is sharded, and with the jitted reduction on an
    accelerator (run here too).  Any inf / NaN in a float leaf (bfloat16 included) fails each; integer and PRNG-key
    leaves are not floats."""
    import ml_dtypes

    from mgd_jax.train import mesh as mesh_lib
    from mgd_jax.train.loop import _all_finite, _host_finite, _state_finite

    tree = {"w": np.ones((2, 3), np.float32), "bn": {"mean": np.zeros(3, ml_dtypes.bfloat16)},
            "count": np.array([7], np.int32)}
    mesh = mesh_lib.make_mesh(jax.devices()[:2])
    for leaf, bad in ((None, None), ("w", np.inf), ("w", np.nan), ("bn", -np.inf)):
        t = jax.tree.map(np.array, tree)
        if leaf:
            (t[leaf] if leaf == "w" else t[leaf]["mean"])[-1] = bad
        on_mesh = {**mesh_lib.replicate(t, mesh), "key": jax.random.key(0)}
        assert _host_finite(t) is _state_finite(on_mesh) is bool(_all_finite(on_mesh)) is (leaf is None), (leaf, bad)
    # a leaf split over the devices: its non-finite value on the second device only is found (not one replica read)
    halves = np.array([1.0, np.inf], np.float32)
    sharded = jax.device_put(halves, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.DATA)))
    assert not sharded.is_fully_replicated and not _state_finite({"w": sharded})
    assert _state_finite({"w": jax.device_put(np.ones(2, np.float32), sharded.sharding)})


# --- a full disk (item 5) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/d/0.zarr\": [OS error 28: No space left on device]"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_full_disk_is_one_line_and_the_rerun_resumes_exactly(tmp_path, monkeypatch, capsys, error):
    """The rows' images differ (row i is i + 1) and the step is not commutative over batches, so a rerun that
    starts again from step 0 is told apart by where it says it resumes, and one that resumes at the wrong batch
    (or redoes one) by its parameters."""
    def step(state, frozen, batch, key):
        w = state["w"] * 0.9 + 0.01 * jnp.sum(batch["image"].astype(jnp.float32))
        return {"w": w, "step": state["step"] + 1}, {"loss": jnp.sum(w), "grad_norm": jnp.float32(1.0)}

    (_, want, _), _ = _toy_fit(tmp_path / "ref", step)
    _, want_latest = _latest_w(tmp_path / "ref")
    original, calls = ocp.CheckpointManager.save, []

    def save_then_fail(self, *args, **kwargs):  # the third save writes part of its step, then the disk is full
        calls.append(1)
        out = original(self, *args, **kwargs)
        if len(calls) == 3:
            self.wait_until_finished()
            raise error
        return out

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_then_fail)
    with pytest.raises(ckpt_lib.DiskFullError) as e:
        _toy_fit(tmp_path / "w", step)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "w" / "toy" / "checkpoints") in msg, msg
    assert "needs about 0.0 MiB" in msg and "rerun the same command: it resumes" in msg, msg
    assert isinstance(e.value.__cause__, type(error))  # the cause stays chained
    # the saves: step 1's latest, epoch 1's best, then step 2's latest fails: step 1 is the last complete one
    assert _latest_w(tmp_path / "w")[0] == 1
    monkeypatch.setattr(ocp.CheckpointManager, "save", original)
    capsys.readouterr()
    (_, got, _), _ = _toy_fit(tmp_path / "w", step)  # space freed: the same command resumes
    assert "[toy] resuming at epoch 1, pass 1, batch 1\n" in capsys.readouterr().out  # after step 1, not from 0
    _, got_latest = _latest_w(tmp_path / "w")
    np.testing.assert_array_equal(jax.device_get(got["w"]), jax.device_get(want["w"]))
    np.testing.assert_array_equal(got_latest["w"], want_latest["w"])


def test_other_save_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise TypeError("a programming error inside the save")

    def step(state, frozen, batch, key):
        return state, {"loss": jnp.float32(0.0), "grad_norm": jnp.float32(0.0)}

    monkeypatch.setattr(ocp.CheckpointManager, "save", boom)
    with pytest.raises(TypeError, match="programming error"):
        _toy_fit(tmp_path, step)


# --- float16 (item 5) ---------------------------------------------------------------------------------------------
def test_float16_is_refused():
    c = smoke.get_config()
    c.precision = "float16"
    with pytest.raises(ConfigError, match="config.precision='float16': float16 needs loss scaling"):
        validate_config(c)


def test_evaluate_uses_the_runs_precision(smoke_workdir, monkeypatch):
    from mgd_jax import evaluate, precision

    work, _ = smoke_workdir
    seen = []
    original = precision.with_compute_dtype
    monkeypatch.setattr(precision, "with_compute_dtype", lambda m, d: seen.append(d) or original(m, d))
    cfg_path = os.path.join(work, "config.json")
    saved = open(cfg_path).read()
    try:
        c = json.loads(saved)
        c["precision"] = "bfloat16"
        with open(cfg_path, "w") as f:
            json.dump(c, f)
        out = evaluate.evaluate_stage(work, "students/mas_kd")
    finally:
        with open(cfg_path, "w") as f:
            f.write(saved)
    assert seen == ["bfloat16"] and 0 <= out["model"]["top1"] <= 1


# --- a changed config never continues an old run (item 4) ---------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("students.mas_kd.weights.granularity", 0.5),
    ("students.mas_kd.temperature", 3.0),
    ("students.mas_kd.weights.logit_kd", 0.7),
    ("teacher.optimizer.lr", 0.1),
    ("analyzer.optimizer.momentum", 0.5),
    ("seed", 3),
    ("granularities", ((16, 2.0), (32, 4.0))),
    ("student.optimizer.weight_decay", 1e-4),
    ("students.mas_kd.method", "attention"),
    ("students.mas_kd.granularity", "mag"),
])
def test_a_changed_config_is_refused_naming_the_field(smoke_workdir, field, value, tmp_path):
    work = str(tmp_path / "w")
    shutil.copytree(smoke_workdir[0], work)  # a copy: a regression would train the shared workdir further
    c = smoke.get_config()
    node = c
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    before = open(os.path.join(work, "config.json")).read()
    with pytest.raises(ckpt_lib.StageMismatchError, match=f"was written for (config\\.)?{field.split('.')[-1]}|"
                                                          f"config\\.{field}="):
        pipeline.train_and_evaluate(c, work, devices=jax.devices()[:1])
    assert open(os.path.join(work, "config.json")).read() == before  # written only after every check passed


@pytest.mark.parametrize("field,value", [("data.on_device", True), ("checkpoint.every_steps", 7),
                                         ("eval_batch_size", 33), ("progress", True), ("checkpoint.keep", 3)])
def test_settings_that_do_not_change_results_resume(smoke_workdir, field, value, tmp_path, monkeypatch):
    """How data reaches the devices, checkpoint cadence, evaluation batching and progress display do not change
    a stage's numbers: a finished workdir with them changed is accepted and nothing is trained again."""
    work = str(tmp_path / "w")
    shutil.copytree(smoke_workdir[0], work)
    c = smoke.get_config()
    node = c
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    original = pipeline.mesh_lib.shard_batch

    def no_training(rows, mesh):
        assert "mask" in rows, "a finished stage was trained again"
        return original(rows, mesh)

    monkeypatch.setattr(pipeline.mesh_lib, "shard_batch", no_training)
    summary = pipeline.train_and_evaluate(c, work, devices=jax.devices()[:1])
    assert summary["rows"] == smoke_workdir[1]["rows"]


# --- the kill window inside a save: orbax has written the new step, our manifest not yet (item 1) --------------
class _Killed(BaseException):
    pass


def test_a_kill_before_the_manifest_keeps_the_previous_step(tmp_path, monkeypatch):
    """orbax's max_to_keep deleted the previous best inside the save, before our commit mark: a kill there
    left no complete best at all (and the analyzer then exported every tube from the wrong epoch)."""
    d = str(tmp_path / "checkpoints")
    ck = ckpt_lib.StageCheckpoints(d, keep=1)
    ck.save_best(1, {"w": np.ones(3, np.float32)}, {"epoch": 1})
    ck.save_latest(10, {"w": np.ones(3, np.float32)}, {"epoch": 1})

    def killed(step_dir):
        raise _Killed(step_dir)

    monkeypatch.setattr(ckpt_lib, "write_manifest", killed)
    with pytest.raises(_Killed):
        ck.save_best(2, {"w": np.full(3, 2.0, np.float32)}, {"epoch": 2})
    with pytest.raises(_Killed):
        ck.save_latest(20, {"w": np.full(3, 2.0, np.float32)}, {"epoch": 2})
    ck.close()
    monkeypatch.undo()
    again = ckpt_lib.StageCheckpoints(d, keep=1)  # the restart: the uncommitted steps are removed
    try:
        assert again.best.latest_step() == 1 and again.latest.latest_step() == 10
        w, meta = again.restore_best({"w": np.zeros(3, np.float32)})
        np.testing.assert_array_equal(w["w"], 1.0)
        again.save_best(2, {"w": np.full(3, 2.0, np.float32)}, {"epoch": 2})  # committed, then the old one goes
        assert sorted(os.listdir(os.path.join(d, "best"))) == ["2"]
    finally:
        again.close()


# --- metrics of a redone epoch --------------------------------------------------------------------------------------
def test_metrics_of_redone_epochs_and_a_cut_line_are_dropped(tmp_path):
    from mgd_jax.train.metrics import MetricWriter, read_jsonl

    w = MetricWriter(str(tmp_path), tensorboard=False)
    for e in range(3):
        w.write(e, {"x": e})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "x"')  # a kill (or a full disk) in the middle of a line
    MetricWriter(str(tmp_path), tensorboard=False, start_epoch=2).close()  # resuming after epoch 2
    assert [r["epoch"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_non_finite_gradient_norms_of_every_stage_are_found():
    from mgd_jax.train.loop import _first_nonfinite

    for name in ("grad_norm", "grad_norm/16d_T2", "peer1/grad_norm", "loss/peer0/ce"):
        m = {"loss": jnp.float32(1.0), "peer0/grad_norm": jnp.float32(1.0), name: jnp.float32(np.nan)}
        assert _first_nonfinite([(7, 4, m)]) == (7, name, pytest.approx(np.nan, nan_ok=True))
    assert _first_nonfinite([(7, 4, {"acc1": jnp.float32(np.nan), "loss": jnp.float32(1.0)})]) is None


# --- errors keep their cause and do not swallow programming errors (item 6) ---------------------------------------
def test_import_torch_keeps_the_cause_and_lets_bugs_through(tmp_path, monkeypatch):
    from _requires import need

    torch = need("torch")

    from mgd_jax import import_torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = str(tmp_path / "evil.pth")
    torch.save({"a": Evil()}, path)
    with pytest.raises(import_torch.CheckpointImportError, match="unsupported GLOBAL posix.system") as e:
        import_torch.load_torch_file(path)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        import_torch.load_torch_file(path)


def test_tfds_errors_keep_the_cause_and_let_bugs_through(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from mgd_jax.data import sources

    with pytest.raises(sources.DatasetNotFoundError, match="is not built in") as e:
        sources.load_tfds("cifar100", str(tmp_path))
    assert e.value.__cause__ is not None
    monkeypatch.setattr(tfds, "data_source", lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        sources.load_tfds("cifar100", str(tmp_path))
