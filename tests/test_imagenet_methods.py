"""The ImageNet benchmark's pairs (ResNet-34 -> ResNet-18, ResNet-50 -> MobileNet) with every distillation method,
every student mode and the analyzer: each method builds and computes its loss on the pairs' real feature lists, a
pair a method cannot serve is refused in one line before training, and the student step (and init-stage step)
traces with every objective term.

Abstract evaluation (``jax.eval_shape``) on 32x32 / 16x16 inputs: initialising and compiling these networks on a
CPU costs seconds per kernel shape, and what is new here is the feature lists' shapes; the numerics of every
method and of the step are tested on the CIFAR zoo (test_methods_train.py, test_baselines_reference.py) and the
ImageNet models' outputs against torchvision (test_imagenet_torch.py).  One test compiles and runs real steps: a
ResNet-18 teacher's and a MobileNet student's (the backward pass through these networks)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar100, default
from mgd_jax import optim
from mgd_jax.analyzer import PAPER_GRANULARITIES, GranularityAnalyzer, parse_granularities
from mgd_jax.config_validation import validate_config
from mgd_jax.data.contrast import ContrastSampler
from mgd_jax.methods import MethodPairError, get_method, known_methods
from mgd_jax.models import get_model
from mgd_jax.stages import init_stage as I
from mgd_jax.stages import student as S

R34_R18 = ("resnet34_imagenet", "resnet18_imagenet")
R50_MV1 = ("resnet50_imagenet", "mobilenetv1_imagenet")
# What the second pair cannot do: its stage maps have different channel counts (256 / 512 / 1024 / 2048 against
# 128 / 256 / 512 / 1024; stems 64 against 32).  The first pair's are equal: every method serves it.
REFUSED = {
    R50_MV1: {"kdsvd": "layer 0 has 256 teacher channels but 128 student channels",
              "afd": "layer 0 has 256 teacher channels but 128 student channels",
              "fsp": "layer 0 has 64 teacher channels but 32 student channels"},
    R34_R18: {},
}
METHODS = [m for m in known_methods() if m != "none"]
GRANS = parse_granularities([(16, 2.0), (32, 8.0)])
AUG = ml_collections.ConfigDict(dict(pad=2, flip=True, mean=(0.3, 0.3, 0.3), std=(0.4, 0.4, 0.4)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(), gamma=0.1))


def _outputs(arch, size=32, batch=4):
    """(plain, preact) Outputs of ``arch`` on a batch of ``size`` x ``size`` images, abstractly."""
    model = get_model(arch, 10)
    x = jnp.zeros((batch, size, size, 3))
    shapes = S.output_shapes(model, x)
    return shapes[False], shapes[True]


@pytest.mark.parametrize("pair", [R34_R18, R50_MV1], ids=["r34_r18", "r50_mv1"])
def test_every_method_on_imagenet_pairs(pair):
    """Every method's pair check, init, loss (and init-stage loss) on the pair's feature shapes; the expected
    refusals name method, pair and reason."""
    t_arch, s_arch = pair
    s_outs, t_outs = _outputs(s_arch), _outputs(t_arch)
    assert [f.shape[1:] for f in s_outs[0].features[1:-1]] == [f.shape[1:] for f in s_outs[1].features[1:-1]]
    key = jax.random.key(0)
    batch = {"index": jnp.arange(4, dtype=jnp.int32), "contrast_idx": jnp.zeros((4, 33), jnp.int32),
             "label": jnp.arange(4, dtype=jnp.int32)}  # the labels a step's batch carries (DKD reads them)
    for name in METHODS:
        method = get_method(name, **({"nce_k": 32} if name == "crd" else {}))
        s_out, t_out = s_outs[method.init_student_preact], t_outs[method.teacher_preact]
        if name in REFUSED[pair]:
            with pytest.raises(MethodPairError) as e:
                method.check_pair(s_arch, t_arch, s_out, t_out)
            assert str(e.value) == f"method {name!r} cannot pair {t_arch} -> {s_arch}: {REFUSED[pair][name]}"
            continue
        method.check_pair(s_arch, t_arch, s_out, t_out)

        def run(s_out, t_out, method=method):
            v = method.init(key, s_out, t_out, {"num_train": 64})
            loss, _ = method.loss(v, s_out, t_out, batch, True)
            init_loss = None
            if method.has_init_stage:
                p = method.init_stage_params(key, s_out, t_out, {"num_train": 64})
                init_loss, _ = method.init_loss({"params": p, "state": v["state"]}, s_out, t_out, True)
            return loss, init_loss

        zeros = [jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), o) for o in (s_out, t_out)]
        loss, init_loss = jax.eval_shape(run, *zeros)
        assert (loss is None) == (name in ("kd", "abound", "fsp")), name
        assert loss is None or (loss.shape == () and loss.dtype == jnp.float32), name
        assert (init_loss is not None) == method.has_init_stage and (init_loss is None or init_loss.shape == ()), name


def test_pair_checks_through_the_config():
    """The run's own check (stages.student.check_pairs, before anything trains) on configs of these pairs: every
    method's three students (none, mag, mas) of ResNet-34 -> ResNet-18 in one run pass; for ResNet-50 ->
    MobileNet a refused method stops the run with its one line."""
    c = cifar100.get_config(f"{R34_R18[0]},{R34_R18[1]},kd,all")
    for name in METHODS:
        c.students.update(cifar100.get_config(f"{R34_R18[0]},{R34_R18[1]},{name},all").students)
    validate_config(c)
    assert len(c.students) == 3 * len(METHODS)
    S.check_pairs(c, 10, (32, 32, 3))
    c = cifar100.get_config(f"{R50_MV1[0]},{R50_MV1[1]},kdsvd,mas")
    validate_config(c)
    with pytest.raises(MethodPairError, match=r"^method 'kdsvd' cannot pair resnet50_imagenet -> "
                                              r"mobilenetv1_imagenet: layer 0 has 256 teacher channels but 128 "
                                              r"student channels$"):
        S.check_pairs(c, 10, (32, 32, 3))


def _abstract_setup(name, mode, t_arch, s_arch, size=16):
    """test_methods_train's setup, abstract: the student state and the teacher's variables as shapes."""
    method = get_method(name, **({"nce_k": 12, "feat_dim": 16} if name == "crd" else {}))
    run = default.student_run(name, mode, student_arch=s_arch)
    t_model, x, key = get_model(t_arch, 10), jnp.zeros((2, size, size, 3)), jax.random.key(0)
    analyzer = GranularityAnalyzer(GRANS, 10)

    def teacher_variables():
        v = t_model.init(key, x)
        return {"backbone": v, "analyzer": analyzer.init(key, t_model.apply(v, x)[1][-1][:1])["params"]}

    teacher = jax.eval_shape(teacher_variables)
    s_mods = S.StudentModules(get_model(s_arch, 10), None if run.granularity == "none" else
                              GranularityAnalyzer(GRANS, 10, False), method)
    t_mods = S.TeacherModules(t_model, analyzer)
    w = run.weights
    obj = S.Objective(run.granularity, GRANS, temperature=run.temperature, w_ce=w.ce, w_logit_kd=w.logit_kd,
                      w_method=w.method, w_granularity=w.granularity)
    tx = optim.sgd(OPT, 2)
    ctx = {"num_train": 40}
    state = jax.eval_shape(lambda t: S.init_state(s_mods, t_mods, t, tx, key, x, ctx), teacher)
    return method, s_mods, t_mods, obj, tx, teacher, state, ctx, x


# Every mode on each pair, with methods of every kind of feature: stage maps (hint, vid, abound's preact maps,
# factor's last map), pooled vectors (crd with its memory, rkd), logits only (kd); AB and FT with their init stage.
STEPS = [(R34_R18, "baseline", "hint"), (R34_R18, "none", "factor"), (R34_R18, "mag", "crd"), (R34_R18, "mas", "kd"),
         (R50_MV1, "baseline", "vid"), (R50_MV1, "none", "rkd"), (R50_MV1, "mag", "abound"), (R50_MV1, "mas", "crd")]


@pytest.mark.parametrize("pair,mode,name", STEPS, ids=[f"{p[1].split('_')[0]}-{m}-{n}" for p, m, n in STEPS])
def test_student_step_traces_every_term(pair, mode, name):
    """The student's train step (and the init stage's) on these pairs: every loss term of the mode is a float32
    scalar, the state comes back with its own structure and shapes."""
    method, s_mods, t_mods, obj, tx, teacher, state, ctx, x = _abstract_setup(name, mode, *pair)
    rng = np.random.default_rng(0)
    host = {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "label": rng.integers(0, 10, 8)}
    batch = {"image": host["image"], "label": host["label"].astype(np.int32)}
    if method.needs_contrast:
        batch.update(ContrastSampler(np.repeat(np.arange(10), 4).astype(np.int32), method.nce_k, method.mode)(
            np.arange(8), 0, 0, 0))
    key = jax.random.key(5)
    if method.has_init_stage:
        itx = optim.sgd(OPT, 2)
        istate = jax.eval_shape(lambda t, s: I.init_stage_state(s_mods, t_mods, t, s, itx, key, x, ctx), teacher, state)
        new_istate, m = jax.eval_shape(I.make_init_step(s_mods, t_mods, itx, AUG), istate, teacher, batch, key)
        assert m["loss/init"].shape == () and jax.tree.structure(new_istate) == jax.tree.structure(istate)
        state = jax.eval_shape(lambda i, s: I.finish_init_stage(s_mods, i, s, tx), istate, state)
    new_state, m = jax.eval_shape(S.make_train_step(s_mods, t_mods, obj, tx, AUG), state, teacher, batch, key)
    losses = {k for k in m if k.startswith("loss/")}
    # stages.student.objective_terms: MAS distils the logits towards the stable-excitation target instead
    expected = {"loss/ce"} | ({"loss/stable_excitation" if mode == "mas" else "loss/logit_kd"} if obj.w_logit_kd
                              else set())
    expected |= {"loss/method"} if name not in ("kd", "abound") else set()
    expected |= {f"loss/granularity/{g.name}" for g in GRANS} if mode in ("mag", "mas") else set()
    assert losses == expected, losses
    assert all(m[k].shape == () and m[k].dtype == jnp.float32 for k in losses | {"loss", "grad_norm"})
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(lambda a: (a.shape, a.dtype), state)


@pytest.mark.parametrize("arch,feature_dim", [("resnet18_imagenet", 512), ("resnet34_imagenet", 512),
                                              ("resnet50_imagenet", 2048), ("mobilenetv1_imagenet", 1024)])
def test_analyzer_granularities_on_the_penultimate_feature(arch, feature_dim):
    """The paper's tubes (64-d T=2, 256-d T=8) on each model's pooled feature, 1000 classes: the teacher's
    encoder d -> d -> dim and decoder dim -> d -> classes, the student's encoders only."""
    model = get_model(arch, 1000)
    x = jnp.zeros((2, 64, 64, 3))
    logits, feats = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))
    assert logits.shape == (2, 1000) and feats[-1].shape == (2, feature_dim)
    grans = parse_granularities(PAPER_GRANULARITIES)
    d = feature_dim
    teacher = GranularityAnalyzer(grans, 1000)
    params = jax.eval_shape(lambda: teacher.init(jax.random.key(0), jnp.zeros((1, d))))["params"]
    out = jax.eval_shape(lambda p: teacher.apply({"params": p}, jnp.zeros((2, d))), params)
    for g in grans:
        count = {part: sum(a.size for a in jax.tree.leaves(params[g.name][part])) for part in ("encoder", "decoder")}
        assert count == {"encoder": d * d + d + d * g.dim + g.dim, "decoder": g.dim * d + d + d * 1000 + 1000}
        assert out[g.name][0].shape == (2, g.dim) and out[g.name][1].shape == (2, 1000)
    student = GranularityAnalyzer(grans, 1000, with_decoders=False)
    s_params = jax.eval_shape(lambda: student.init(jax.random.key(0), jnp.zeros((1, d))))["params"]
    assert sum(a.size for a in jax.tree.leaves(s_params)) == sum(d * d + d + d * g.dim + g.dim for g in grans)


@pytest.mark.timeout(300)
def test_imagenet_models_take_real_training_steps():
    """The one test here that compiles and runs: the teacher's step on ResNet-18 (cross-entropy) and a MAS+KD student
    step of MobileNet (V1) against that teacher and its tubes, 2 steps each on 8 images of 16x16.  Every loss term
    and the gradient norm are finite, the gradient is not zero, and every parameter array of both networks moves (the
    backward pass through the ImageNet stems, basic blocks and depthwise blocks, not only their shapes).  Without
    weight decay, so that an array moves only if its gradient reaches it."""
    from mgd_jax.stages import teacher as T

    key, x = jax.random.key(0), jnp.zeros((2, 16, 16, 3))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
                "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(2)]
    tx = optim.sgd(ml_collections.ConfigDict({**OPT.to_dict(), "weight_decay": 0.0}), 2)

    def trained(step, state, *args):
        before = jax.device_get(state.params)
        for b in batches:
            state, m = step(state, *args[:-1], b, args[-1])
            m = jax.device_get(m)
            assert all(np.isfinite(v) for k, v in m.items() if k.startswith("loss") or k == "grad_norm"), m
            assert m["grad_norm"] > 0, m
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
        assert moved and all(moved), np.mean(moved)
        return state, m

    # initialised as one compiled program each (op by op, these networks' initialisers cost more than their steps)
    t_model = get_model(R34_R18[1], 10)
    t_state, _ = trained(jax.jit(T.make_train_step(t_model, tx, AUG)),
                         jax.jit(lambda k: T.init_state(t_model, tx, k, x))(key), key)
    analyzer = GranularityAnalyzer(GRANS, 10)
    feature_dim = jax.eval_shape(lambda: t_model.init_with_output(key, x)[0][1][-1]).shape[-1]
    teacher = {"backbone": {"params": t_state.params, "batch_stats": t_state.batch_stats},
               "analyzer": jax.jit(analyzer.init)(key, jnp.zeros((1, feature_dim)))["params"]}
    run = default.student_run("kd", "mas", student_arch=R50_MV1[1])
    s_mods = S.StudentModules(get_model(R50_MV1[1], 10), GranularityAnalyzer(GRANS, 10, False), get_method("kd"))
    t_mods = S.TeacherModules(t_model, analyzer)
    w = run.weights
    obj = S.Objective("mas", GRANS, temperature=run.temperature, w_ce=w.ce, w_logit_kd=w.logit_kd,
                      w_method=w.method, w_granularity=w.granularity)
    state = jax.jit(lambda t, k: S.init_state(s_mods, t_mods, t, tx, k, x, {"num_train": 16}))(teacher, key)
    _, m = trained(jax.jit(S.make_train_step(s_mods, t_mods, obj, tx, AUG)), state, teacher, key)
    assert {k for k in m if k.startswith("loss/")} == {
        "loss/ce", "loss/stable_excitation", "loss/granularity/16d_T2", "loss/granularity/32d_T8"}
