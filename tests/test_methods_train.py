"""Every baseline method trains (real steps, small inputs) on the default multi-device mesh (2 devices: one per
core on a 2-core machine; the batch split over them, state replicated), each method once and each student mode
at least once; pair checks refuse bad pairs; a method defined outside the package trains through the config path."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from conftest import xla_flags
from mgd_jax import optim
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.data.contrast import ContrastSampler
from mgd_jax.methods import MethodPairError, Outputs, get_method, known_methods
from mgd_jax.models import get_model
from mgd_jax.stages import init_stage as I
from mgd_jax.stages import student as S
from mgd_jax import precision
from mgd_jax.train import loop
from mgd_jax.train import mesh as mesh_lib

AUG = ml_collections.ConfigDict(dict(pad=2, flip=True, mean=(0.3, 0.3, 0.3), std=(0.4, 0.4, 0.4)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(), gamma=0.1))
GRANS = parse_granularities([(16, 2.0), (32, 8.0)])
METHODS = [m for m in known_methods() if m != "none"]
# Each method once, the student modes in turn (known_methods() order): every mode several times; 'mas' runs with
# the accelerator defaults (CRD among them).  A new method joins the rotation without an edit here.
MODES = ("baseline", "none", "mag", "mas")
MATRIX = [(name, MODES[i % len(MODES)]) for i, name in enumerate(known_methods())]


def _setup(method_name, mode, t_arch="resnet14", s_arch="resnet8", size=16, n_train=40, dtype=None, **options):
    """``mode``: a student mode (``default.STUDENT_MODES``); the objective's granularity mode and weights are the
    config's (``default.student_run``)."""
    if method_name == "crd":
        options = {"nce_k": 12, "feat_dim": 16, **options}
    method = get_method(method_name, **options)
    run = default.student_run(method_name, mode, student_arch=s_arch)
    t_model = precision.with_compute_dtype(get_model(t_arch, 10), dtype)
    x = jnp.zeros((2, size, size, 3))
    key = jax.random.key(0)
    an = GranularityAnalyzer(GRANS, 10)
    t_vars = t_model.init(key, x)
    d = t_model.apply(t_vars, x)[1][-1].shape[-1]
    teacher = {"backbone": t_vars, "analyzer": an.init(key, jnp.zeros((1, d)))["params"]}
    s_mods = S.StudentModules(precision.with_compute_dtype(get_model(s_arch, 10), dtype),
                              None if run.granularity == "none" else GranularityAnalyzer(GRANS, 10, False), method)
    t_mods = S.TeacherModules(t_model, an)
    w = run.weights
    obj = S.Objective(run.granularity, GRANS, temperature=run.temperature, w_ce=w.ce, w_logit_kd=w.logit_kd,
                      w_method=w.method, w_granularity=w.granularity)
    tx = optim.sgd(OPT, 2)
    ctx = {"num_train": n_train}
    state = S.init_state(s_mods, t_mods, teacher, tx, key, x, ctx)
    return method, s_mods, t_mods, obj, tx, teacher, state, ctx


N_TRAIN = 40
_rng = np.random.default_rng(0)
TRAIN = {"image": _rng.integers(0, 256, (N_TRAIN, 16, 16, 3), dtype=np.uint8),
         "label": _rng.integers(0, 10, N_TRAIN).astype(np.int32)}


def _host_batch(i, n=8, sampler=None, on_device=False):
    """Batch i of the training set: its rows, or (on_device) only their indices, as the loop sends them."""
    idx = np.arange(i * n, (i + 1) * n)
    b = {loop.ROWS: idx.astype(np.int32)} if on_device else {k: v[idx] for k, v in TRAIN.items()}
    if sampler is not None:
        b.update(sampler(idx, 0, 0, i))
    return b


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 2:
        pytest.fail("needs >= 2 devices (conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    return mesh_lib.make_mesh(jax.devices()[:2])


@pytest.mark.parametrize("name,mode", MATRIX)
def test_method_trains(name, mode, mesh):
    """Modes baseline / none / mag in float32 with host batches; mas with the GPU / TPU defaults: bfloat16
    compute, the training set resident on the devices (the step gets row indices and gathers; CRD's index and
    contrast indices ride along), donated state (``loop.gather_rows``).  A method with an init stage runs it."""
    accel = mode == "mas"
    method, s_mods, t_mods, obj, tx, teacher, state, ctx = _setup(name, mode, dtype="bfloat16" if accel else None)
    teacher, state = mesh_lib.replicate(teacher, mesh), mesh_lib.replicate(state, mesh)
    data = mesh_lib.replicate(TRAIN, mesh) if accel else None

    def _batch(i, sampler=None):
        return mesh_lib.shard_batch(_host_batch(i, sampler=sampler, on_device=accel), mesh)

    def compile_step(fn):
        if not accel:
            return jax.jit(fn)
        on_device = loop.gather_rows(fn)
        return lambda st, fr, b, k: on_device(st, fr, b, k, data)

    sampler = None
    if method.needs_contrast:
        sampler = ContrastSampler(TRAIN["label"], method.nce_k, method.mode)
    key = jax.random.key(5)
    if method.has_init_stage:
        itx = optim.sgd(OPT, 2)
        istate = mesh_lib.replicate(I.init_stage_state(s_mods, t_mods, jax.device_get(teacher), jax.device_get(state),
                                                       itx, key, jnp.zeros((2, 16, 16, 3)), ctx), mesh)
        istep = compile_step(I.make_init_step(s_mods, t_mods, itx, AUG))
        before = jax.tree.leaves(jax.device_get(istate.params))
        for i in range(2):
            istate, m = istep(istate, teacher, _batch(i), key)
            assert np.isfinite(float(m["loss/init"])) and float(m["loss/init"]) > 0
        assert any(not np.allclose(a, b) for a, b in zip(before, jax.tree.leaves(istate.params)))
        state = mesh_lib.replicate(I.finish_init_stage(s_mods, jax.device_get(istate), jax.device_get(state), tx),
                                   mesh)
    step = compile_step(S.make_train_step(s_mods, t_mods, obj, tx, AUG))
    before = jax.device_get(state.params)  # the step donates its state
    for i in range(2):
        state, m = step(state, teacher, _batch(i, sampler=sampler), key)
    losses = {k: float(v) for k, v in m.items() if k.startswith("loss")}
    assert all(np.isfinite(v) for v in losses.values()), losses
    assert np.isfinite(float(m["grad_norm"])), "non-finite gradient"
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params)), "non-finite parameters"
    has_method_loss = "loss/method" in losses
    assert has_method_loss == (name not in ("none", "kd", "abound", "fsp")), losses
    if obj.mode != "none":
        assert {"loss/granularity/16d_T2", "loss/granularity/32d_T8"} <= set(losses)
    if "method" in state.params:  # the method's own parameters are trained with the student
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before["method"]),
                                                           jax.tree.leaves(state.params["method"])))
    if name == "crd":
        st = state.method_state
        assert float(st["z_v1"]) > 0 and float(st["z_v2"]) > 0  # set by the first batch
        rows = np.asarray(st["memory_v1"][:16])
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)  # updated rows are unit


@pytest.mark.parametrize("name,t_arch,s_arch,match", [
    ("kdsvd", "wrn_40_2", "wrn_40_1", "method 'kdsvd' cannot pair wrn_40_2 -> wrn_40_1: layer 0 has 32 teacher "
                                      "channels but 16 student channels"),
    ("afd", "wrn_40_2", "wrn_40_1", "method 'afd' cannot pair wrn_40_2 -> wrn_40_1: layer 0 has 32"),
    ("fsp", "resnet32x4", "resnet8", "method 'fsp' cannot pair resnet32x4 -> resnet8: layer 0 has 32"),
    ("afd", "vgg13", "MobileNetV2", "method 'afd' cannot pair vgg13 -> MobileNetV2"),
])
def test_bad_pairs_are_refused(name, t_arch, s_arch, match):
    x = jnp.zeros((2, 32, 32, 3))
    outs = []
    for arch in (s_arch, t_arch):
        m = get_model(arch, 100)
        logits, feats = jax.eval_shape(lambda m=m: m.apply(m.init(jax.random.key(0), x), x))
        outs.append(Outputs(logits, feats))
    with pytest.raises(MethodPairError, match=match):
        get_method(name).check_pair(s_arch, t_arch, *outs)


@pytest.mark.parametrize("pair", default.README_PAIRS)
def test_every_method_on_readme_pair_shapes(pair):
    """Every method's init, loss (and init-stage loss) on the pair's real feature shapes (abstract evaluation;
    the backbones around them are the same for every method and are exercised by the tests above)."""
    t_arch, s_arch = pair
    x = jnp.zeros((4, 32, 32, 3))
    key = jax.random.key(0)
    outs = {}
    for who, arch in (("s", s_arch), ("t", t_arch)):
        shapes = S.output_shapes(get_model(arch, 100), x)
        for preact in (False, True):
            outs[who, preact] = shapes[preact]
    batch = {"index": jnp.arange(4, dtype=jnp.int32), "contrast_idx": jnp.zeros((4, 33), jnp.int32),
             "label": jnp.arange(4, dtype=jnp.int32)}  # the labels a step's batch carries (DKD reads them)
    for name in METHODS:
        method = get_method(name, **({"nce_k": 32} if name == "crd" else {}))
        s_out, t_out = outs["s", method.init_student_preact], outs["t", method.teacher_preact]
        try:
            method.check_pair(s_arch, t_arch, s_out, t_out)
        except MethodPairError:
            assert name in ("kdsvd", "afd", "fsp") and pair == ("wrn_40_2", "wrn_40_1"), (name, pair)
            continue

        def run(s_out=s_out, t_out=t_out, method=method):
            v = method.init(key, s_out, t_out, {"num_train": 64})
            loss, state = method.loss(v, s_out, t_out, batch, True)
            init_loss = None
            if method.has_init_stage:
                p = method.init_stage_params(key, s_out, t_out, {"num_train": 64})
                init_loss, _ = method.init_loss({"params": p, "state": v["state"]}, s_out, t_out, True)
            return loss, init_loss, state

        shapes = jax.eval_shape(lambda: run(*[jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), o)
                                              for o in (s_out, t_out)]))
        loss, init_loss, _ = shapes
        assert (loss is None) == (name in ("kd", "abound", "fsp")), name
        assert loss is None or loss.shape == ()
        assert init_loss is None or init_loss.shape == ()


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_contrast_sampler(mode):
    labels = np.repeat(np.arange(5), 20).astype(np.int32)  # 100 examples, 80 negatives each
    sampler = ContrastSampler(labels, k=50, mode=mode, seed=3)
    idx = np.array([0, 21, 99, 40])
    out = sampler(idx, epoch=2, pass_id=0, step=7)
    np.testing.assert_array_equal(out["index"], idx)
    ci = out["contrast_idx"]
    assert ci.shape == (4, 51)
    if mode == "exact":
        np.testing.assert_array_equal(ci[:, 0], idx)
    np.testing.assert_array_equal(labels[ci[:, 0]], labels[idx])  # the positive is of the same class
    for b, i in enumerate(idx):
        neg = ci[b, 1:]
        assert np.all(labels[neg] != labels[i])  # negatives only from other classes
        assert len(set(neg.tolist())) == 50  # without replacement while enough negatives exist
    again = sampler(idx, epoch=2, pass_id=0, step=7)
    np.testing.assert_array_equal(again["contrast_idx"], ci)  # a pure function of (seed, epoch, pass, step)
    assert not np.array_equal(sampler(idx, 2, 0, 8)["contrast_idx"], ci)
    big = ContrastSampler(labels, k=200, mode=mode)(idx, 0, 0, 0)["contrast_idx"]  # K > 80: with replacement
    assert big.shape == (4, 201) and np.all(labels[big[0, 1:]] != labels[0])


def test_kdsvd_on_two_devices_does_not_deadlock():
    """jaxlib 0.10's batched CPU SVD blocks XLA intra-op pool threads while it waits for its own sub-tasks on the
    same pool: with one device per core, two devices' SVDs at once deadlocked the KDSVD step forever (0% CPU).
    Run in a child process with a deadline, so a regression fails this test instead of hanging the suite."""
    import subprocess
    import sys

    code = (
        "import jax, numpy as np\n"
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec as P\n"
        "from mgd_jax.methods.kdsvd import kdsvd\n"
        "mesh = Mesh(np.array(jax.devices()), ('data',))\n"
        "sh = NamedSharding(mesh, P('data'))\n"
        "rng = np.random.default_rng(0)\n"
        "shapes = [(256, 8, 8, 16), (256, 4, 4, 32), (256, 2, 2, 64)]\n"
        "gs = [jax.device_put(rng.standard_normal(s).astype(np.float32), sh) for s in shapes]\n"
        "gt = [jax.device_put(rng.standard_normal(s).astype(np.float32), sh) for s in shapes]\n"
        "f = jax.jit(jax.value_and_grad(lambda a, b: sum(kdsvd(a, b))))\n"
        "for _ in range(10):\n"
        "    v, g = f(gs, gt)\n"
        "    jax.block_until_ready(g)\n"
        "print('ok', float(v))\n")
    env = {**__import__("os").environ, "XLA_FLAGS": xla_flags(2)}
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the KDSVD step on 2 CPU devices did not finish in 90 s (LAPACK thread-pool deadlock)")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
    assert np.isfinite(float(r.stdout.split()[1]))


def _readme_method_file() -> str:
    """The complete method file of docs/methods.md's "Adding a method"."""
    import pathlib
    import re

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    section = page.split("\n## Adding a method\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_new_method_is_one_file(smoke_workdir, tmp_path, monkeypatch):
    """docs/methods.md's example method: written as one new file into a copy of the package, ``known_methods()``
    lists it last (nothing else edited); loaded from its file, it trains a student through the config path
    (``configs/smoke.py``, ``default.student_run``, the pipeline's config checks; 1 epoch) on the smoke run's
    teacher and analyzer."""
    import importlib.util
    import json
    import os
    import shutil
    import subprocess
    import sys

    from configs import smoke
    from mgd_jax import pipeline
    from mgd_jax.methods import base

    source = _readme_method_file()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(root, "mgd_jax"), copy / "mgd_jax", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "mgd_jax" / "methods" / "pooled_l2.py").write_text(source)
    code = ("import mgd_jax.methods as m\n"
            "print(m.__file__)\n"
            "print(' '.join(m.known_methods()))\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(copy)}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    where, names = r.stdout.splitlines()
    assert where.startswith(str(copy))
    assert names.split() == [*known_methods(), "pooled_l2"]

    # in this process: the same file as a module of its own, registered while the test runs
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    path = tmp_path / "pooled_l2.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pooled_l2_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert known_methods()[-1] == "pooled_l2"

    smoke_dir, _ = smoke_workdir
    work = tmp_path / "w"
    for stage in ("teacher", "analyzer"):  # the smoke run's finished stages: only the new student trains
        shutil.copytree(os.path.join(smoke_dir, stage), work / stage)
    config = smoke.get_config()
    config.student.epochs, config.student.optimizer.milestones = 1, ()
    config.students = ml_collections.ConfigDict(
        {"l2_mag": default.student_run("pooled_l2", "mag", student_arch=config.student.arch)})
    assert config.students.l2_mag.weights.method == 10.0  # the file's beta
    summary = pipeline.train_and_evaluate(config, str(work), devices=jax.devices()[:1])
    assert [r["stage"] for r in summary["rows"]][-1] == "student l2_mag (pooled_l2 / mag)"
    lines = [json.loads(x) for x in (work / "students" / "l2_mag" / "metrics.jsonl").read_text().splitlines()]
    method_losses = [v for x in lines for k, v in x.items() if k.endswith("loss/method")]
    assert method_losses and all(np.isfinite(v) and v > 0 for v in method_losses), lines
