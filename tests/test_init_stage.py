"""The AB / FSP / FT init stage (SPEC_BASELINES §3): only the student's feature modules (RepDistiller's
``get_feat_modules()``) train; the other modules are frozen in eval mode; the lr is the student's."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from mgd_jax import optim
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.methods import Outputs, factor, get_method
from mgd_jax.models import get_model, non_feature_modules
from mgd_jax.stages import init_stage as I
from mgd_jax.stages import student as S

AUG = ml_collections.ConfigDict(dict(pad=2, flip=True, mean=(0.3, 0.3, 0.3), std=(0.4, 0.4, 0.4)))
OPT = ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(), gamma=0.1))


def test_non_feature_modules_are_those_get_feat_modules_leaves_out():
    expected = {"resnet8": ("fc",), "ResNet50": ("linear",), "wrn_16_1": ("bn1", "fc"), "vgg8": ("classifier",),
                "MobileNetV2": ("conv2_0", "conv2_1", "classifier"), "ShuffleV1": ("fc",),
                "ShuffleV2": ("conv2", "bn2", "fc")}
    for arch, names in expected.items():
        model = get_model(arch, 10)
        assert non_feature_modules(model) == names, arch
        params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
        assert set(names) <= set(params), arch


def _batch(i, n=8, size=16):
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def test_init_stage_trains_feature_modules_only():
    """AB on a WRN student: its final BN (not a feature module) feeds AB's last preact map, so it must run with
    its running statistics and stay untouched, like the classifier.  (The other architectures differ only in
    their ``non_feature_modules``, checked above.)"""
    method_name, t_arch, s_arch = "abound", "wrn_16_1", "wrn_16_1"
    key = jax.random.key(0)
    x = jnp.zeros((2, 16, 16, 3))
    grans = parse_granularities([(16, 2.0)])
    t_model, an = get_model(t_arch, 10), GranularityAnalyzer(grans, 10)
    t_vars = t_model.init(key, x)
    teacher = {"backbone": t_vars, "analyzer": an.init(key, jnp.zeros((1, t_model.apply(t_vars, x)[1][-1].shape[-1])))
               ["params"]}
    s_mods = S.StudentModules(get_model(s_arch, 10), None, get_method(method_name))
    t_mods = S.TeacherModules(t_model, an)
    tx = optim.sgd(OPT, 2)
    student = S.init_state(s_mods, t_mods, teacher, tx, jax.random.key(1), x)
    # non-trivial running statistics, so that a train-mode pass would move them
    student = student.replace(batch_stats=jax.tree.map(lambda a: a + 0.5, student.batch_stats))
    frozen = non_feature_modules(s_mods.backbone)
    istate = I.init_stage_state(s_mods, t_mods, teacher, student, tx, key, x)
    assert not set(frozen) & set(istate.params["features"])  # outside the optimizer: no update, no weight decay
    step = jax.jit(I.make_init_step(s_mods, t_mods, tx, AUG))
    for i in range(2):
        istate, m = step(istate, teacher, _batch(i), key)
        assert np.isfinite(float(m["loss/init"]))
    final = I.finish_init_stage(s_mods, istate, student, tx)
    p0, p1 = student.params["backbone"], final.params["backbone"]
    b0, b1 = student.batch_stats["backbone"], final.batch_stats["backbone"]
    for name in frozen:  # bitwise unchanged: parameters and BN running statistics
        for a, b in zip(jax.tree.leaves(p0[name]), jax.tree.leaves(p1[name])):
            np.testing.assert_array_equal(a, b, err_msg=name)
        for a, b in zip(jax.tree.leaves(b0.get(name, {})), jax.tree.leaves(b1.get(name, {}))):
            np.testing.assert_array_equal(a, b, err_msg=name)
    features = [k for k in p0 if k not in frozen]
    assert all(any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0[k]), jax.tree.leaves(p1[k])))
               for k in features), "every feature module trains"
    assert any(not np.array_equal(a, b) for k in features if k in b0
               for a, b in zip(jax.tree.leaves(b0[k]), jax.tree.leaves(b1[k]))), "feature BNs run in train mode"


def test_init_stage_lr_is_the_students():
    lr = lambda method, arch: default.student_run(method, "mas", student_arch=arch).init.optimizer.lr  # noqa: E731
    for arch in default.LOW_LR_STUDENTS:
        assert lr("abound", arch) == lr("fsp", arch) == lr("factor", arch) == default.LOW_LR == 0.01
    assert lr("abound", "resnet8") == lr("fsp", "vgg8") == lr("factor", "vgg8") == default.STUDENT_LR == 0.05
    assert default.student_run("abound", "mas", student_arch="resnet8").init.epochs == 30
    assert lr("factor", "resnet20") == lr("factor", "wrn_16_2") == factor.RESNET_WRN_INIT_LR == 0.01
    with pytest.raises(ValueError, match="pass student_arch"):
        default.student_run("fsp", "none")


@pytest.mark.parametrize("name", ["abound", "factor", "fsp"])
def test_init_stage_params_are_inits(name):
    """``init_stage_params(key, ...)`` are, bitwise, the module ``init(key, ...)`` puts in the method state under
    ``init_params_key`` (AB's connectors, FT's paraphraser; FSP: none): the same key use."""
    key = jax.random.key(3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    method = get_method(name)
    outs = []
    for arch, preact in (("resnet8", method.init_student_preact), ("resnet8x4", method.teacher_preact)):
        m = get_model(arch, 10)
        outs.append(Outputs(*m.apply(m.init(jax.random.key(0), x), x, preact=preact)))
    got = method.init_stage_params(key, *outs, {"num_train": 8})
    state = method.init(key, *outs, {"num_train": 8})["state"]
    want = {} if method.init_params_key is None else state[method.init_params_key]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert bool(got) == (method.init_params_key is not None)
