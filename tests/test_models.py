"""Model zoo (CIFAR ResNets) and analyzer against the reference's measured statistics (fixtures/model_stats.json)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.models import get_model
from mgd_jax.models.layers import BatchNorm, Linear

STATS = json.loads((FIXTURES / "model_stats.json").read_text())
ARCHS = sorted(STATS)
CLASSIFIER = {"ResNet50": "linear", "vgg8": "classifier", "vgg11": "classifier", "vgg13": "classifier",
              "vgg16": "classifier", "vgg19": "classifier", "MobileNetV2": "classifier"}


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_shapes_and_counts(arch):
    ref = STATS[arch]
    model = get_model(arch, 100)
    x = jnp.zeros((2, 32, 32, 3))

    def run():  # two traces of the network: the initialization's forward pass, then one with preact=True
        plain, v = model.init_with_output(jax.random.key(0), x)
        return v, plain, model.apply(v, x, preact=True)

    v, (logits, feats), (logits_p, feats_p) = jax.eval_shape(run)
    assert _count(v["params"]) == ref["total"]
    assert _count(v["params"][CLASSIFIER.get(arch, "fc")]) == ref["classifier"]
    assert logits.shape == tuple(ref["out"])

    def nchw(s):
        return tuple(s) if len(s) == 2 else (s[0], s[3], s[1], s[2])

    assert [nchw(f.shape) for f in feats] == [tuple(s) for s in ref["feats"]]
    assert [nchw(f.shape) for f in feats_p] == [tuple(s) for s in ref["preact_feats"]]
    assert feats[-1].shape[-1] == ref["feat_dim"]
    # BN running statistics: 2 vectors of C per BN layer (the torch count also has num_batches_tracked)
    n_bn = len(jax.tree.leaves(v["batch_stats"])) // 2
    assert _count(v["batch_stats"]) + n_bn == ref["buffers"]


def test_preact_features_are_pre_relu_sums():
    model = get_model("resnet8", 10)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    v = model.init(jax.random.key(0), x)
    _, f = model.apply(v, x, train=False)
    _, fp = model.apply(v, x, train=False, preact=True)
    for a, b in zip(f[1:4], fp[1:4]):
        np.testing.assert_allclose(a, jnp.maximum(b, 0), rtol=1e-6, atol=1e-6)
        assert float(jnp.min(b)) < 0  # really before the ReLU
    np.testing.assert_allclose(f[0], fp[0])
    np.testing.assert_allclose(f[-1], fp[-1])


def test_initialisation_follows_reference():
    model = get_model("resnet56", 100)
    v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    k = v["params"]["layer3_0"]["conv2"]["kernel"]  # 3x3x64x64, kaiming normal fan_out: std sqrt(2 / (9*64))
    assert abs(float(jnp.std(k)) / np.sqrt(2 / (9 * 64)) - 1) < 0.03
    assert abs(float(jnp.mean(k))) < 0.01
    bn = v["params"]["layer3_0"]["bn1"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    fc = v["params"]["fc"]  # torch Linear default: U(-1/sqrt(64), 1/sqrt(64))
    for p in (fc["kernel"], fc["bias"]):
        assert float(jnp.max(jnp.abs(p))) <= 1 / 8 and float(jnp.max(jnp.abs(p))) > 0.9 / 8


def test_batchnorm_matches_pytorch_semantics():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(6, 5, 5, 4)).astype(np.float32)
    bn = BatchNorm()
    v = bn.init(jax.random.key(0), x, train=False)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    mean = x.mean((0, 1, 2))
    var_b = x.var((0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var_b + 1e-5), rtol=1e-4, atol=1e-4)
    n = 6 * 5 * 5
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var_b * n / (n - 1), rtol=1e-5)
    y_eval = bn.apply({**v, "batch_stats": upd["batch_stats"]}, x, train=False)
    np.testing.assert_allclose(y_eval, (x - 0.1 * mean) / np.sqrt(upd["batch_stats"]["var"] + 1e-5), rtol=1e-4,
                               atol=1e-4)


def test_family_initialisations():
    """(Each init jitted: one program per model compiles faster than its ops one by one, 12 s instead of 20 s.)"""
    x = jnp.zeros((1, 32, 32, 3))
    wrn = jax.jit(get_model("wrn_16_2", 100).init)(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(wrn["fc"]["bias"], 0.0)  # WRN: fc bias 0
    k = wrn["block3"]["layer_1"]["conv2"]["kernel"]
    assert abs(float(jnp.std(k)) / np.sqrt(2 / (9 * 128)) - 1) < 0.03
    vgg = jax.jit(get_model("vgg8", 100).init)(jax.random.key(0), x)["params"]
    assert abs(float(jnp.std(vgg["classifier"]["kernel"])) / 0.01 - 1) < 0.05  # Linear N(0, 0.01)
    np.testing.assert_array_equal(vgg["block2_0"]["bias"], 0.0)  # conv bias 0
    shuf = jax.jit(get_model("ShuffleV2", 100).init)(jax.random.key(0), x)["params"]
    k = shuf["layer2_1"]["conv1"]["kernel"]  # default torch conv init: U(+-1/sqrt(fan_in)), fan_in = 116
    bound = 1 / np.sqrt(116)
    assert float(jnp.max(jnp.abs(k))) <= bound and float(jnp.max(jnp.abs(k))) > 0.95 * bound
    mob = jax.jit(get_model("MobileNetV2", 100).init)(jax.random.key(0), x)["params"]
    k = mob["blocks_3_0"]["conv_3"]["kernel"]  # depthwise 3x3 of 96 channels: N(0, sqrt(2 / (9 * 96)))
    assert k.shape == (3, 3, 1, 96) and abs(float(jnp.std(k)) / np.sqrt(2 / (9 * 96)) - 1) < 0.1


def test_channel_shuffle_matches_nchw_reference():
    from mgd_jax.models.layers import channel_shuffle
    x = np.arange(2 * 3 * 3 * 12, dtype=np.float32).reshape(2, 3, 3, 12)
    nchw = x.transpose(0, 3, 1, 2)
    ref = nchw.reshape(2, 3, 4, 3, 3).transpose(0, 2, 1, 3, 4).reshape(2, 12, 3, 3).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(channel_shuffle(jnp.asarray(x), 3), ref)


@pytest.mark.parametrize("arch", ["wrn_16_1", "vgg8", "ShuffleV1", "ShuffleV2", "ResNet50"])
def test_preact_features_relate_to_features(arch):
    model = get_model(arch, 10)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    v = model.init(jax.random.key(0), x)
    _, f = model.apply(v, x)
    _, fp = model.apply(v, x, preact=True)
    np.testing.assert_allclose(f[-1], fp[-1], rtol=1e-5, atol=1e-6)
    assert any(float(jnp.min(b)) < 0 for b in fp[1:-1])  # some preact features are before a ReLU
    if arch in ("vgg8", "ShuffleV1", "ResNet50"):
        for a, b in zip(f[1:-1], fp[1:-1]):
            np.testing.assert_allclose(a, jnp.maximum(b, 0), rtol=1e-5, atol=1e-5)


def test_linear_is_torch_linear():
    lin = Linear(3)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    v = lin.init(jax.random.key(0), x)
    np.testing.assert_allclose(lin.apply(v, x), x @ v["params"]["kernel"] + v["params"]["bias"], rtol=1e-6)


@pytest.mark.parametrize("arch", ["resnet8", "resnet8x4", "resnet14x05", "resnet20x0375"])
def test_analyzer_tube_counts(arch):
    ref = STATS[arch]["tubes"]
    d = STATS[arch]["feat_dim"]
    an = GranularityAnalyzer(parse_granularities([(64, 2.0), (256, 8.0)]), 100)
    p = an.init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    assert _count(p["64d_T2"]["encoder"]) == ref["ak_encoder"]
    assert _count(p["64d_T2"]["decoder"]) == ref["ak_decoder"]
    assert _count(p["256d_T8"]["encoder"]) == ref["dk_encoder"]
    assert _count(p["256d_T8"]["decoder"]) == ref["dk_decoder"]
    student_side = GranularityAnalyzer(parse_granularities([(64, 2.0), (256, 8.0)]), 100, with_decoders=False)
    ps = student_side.init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    assert _count(ps) == ref["ak_encoder"] + ref["dk_encoder"]


def test_analyzer_any_number_of_granularities():
    grans = parse_granularities([(8, 1.0), (16, 2.0), (32, 4.0)])
    an = GranularityAnalyzer(grans, 10)
    h = jax.random.normal(jax.random.key(0), (3, 20))
    v = an.init(jax.random.key(1), h)
    out = an.apply(v, h)
    assert {k: (e.shape, d.shape) for k, (e, d) in out.items()} == {
        "8d_T1": ((3, 8), (3, 10)), "16d_T2": ((3, 16), (3, 10)), "32d_T4": ((3, 32), (3, 10))}
    enc_only = an.apply(v, h, decode=False)
    assert all(d is None for _, d in enc_only.values())
    np.testing.assert_allclose(enc_only["8d_T1"][0], out["8d_T1"][0])


@pytest.mark.parametrize("spec,match", [
    ([(0, 2.0)], "dim must be a positive integer"),
    ([(-64, 2.0)], "dim must be a positive integer"),
    ([(64, 0.0)], "temperature must be > 0"),
    ([(64, -1.0)], "temperature must be > 0"),
    ([(64,)], "must be \\(dim, temperature\\)"),
    ([], "must not be empty"),
    ([(64, 2.0), (64, 2.0)], "distinct"),
])
def test_bad_granularities(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_granularities(spec)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9'"):
        get_model("resnet9", 100)


def _textbook_bn(x, scale, bias):
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def test_batchnorm_backward_matches_autodiff_and_float64():
    """The written-out backward of training BatchNorm against (a) autodiff of the textbook formula and (b) central
    finite differences of a float64 numpy BatchNorm, on data whose mean is far from 0 (|mean| = 50 std)."""
    from mgd_jax.models.layers import batch_norm_train
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4, 3, 3, 5)) * 0.5 + 25.0).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)

    def loss(f):
        return lambda x, s, b: jnp.sum(jnp.tanh(f(x, s, b)) * w)

    ours = jax.grad(loss(lambda x, s, b: batch_norm_train(x, s, b, 1e-5)[0]), (0, 1, 2))(x, scale, bias)
    auto = jax.grad(loss(_textbook_bn), (0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, auto):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

    def np_loss(x64, s64, b64):
        mean = x64.mean((0, 1, 2))
        var = ((x64 - mean) ** 2).mean((0, 1, 2))
        return float(np.sum(np.tanh((x64 - mean) / np.sqrt(var + 1e-5) * s64 + b64) * w))

    x64, s64, b64 = x.astype(np.float64), scale.astype(np.float64), bias.astype(np.float64)
    h = 1e-6
    for idx in [(0, 0, 0, 0), (3, 2, 1, 4), (1, 1, 2, 2)]:
        e = np.zeros_like(x64)
        e[idx] = h
        fd = (np_loss(x64 + e, s64, b64) - np_loss(x64 - e, s64, b64)) / (2 * h)
        np.testing.assert_allclose(ours[0][idx], fd, rtol=1e-3, atol=1e-3)
    for c in range(5):
        e = np.zeros(5)
        e[c] = h
        fd_s = (np_loss(x64, s64 + e, b64) - np_loss(x64, s64 - e, b64)) / (2 * h)
        fd_b = (np_loss(x64, s64, b64 + e) - np_loss(x64, s64, b64 - e)) / (2 * h)
        np.testing.assert_allclose(ours[1][c], fd_s, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours[2][c], fd_b, rtol=1e-4, atol=1e-4)


def test_batchnorm_backward_is_one_all_reduce_on_a_sharded_batch():
    """On a batch sharded over the devices: forward 2 all-reduces (mean, then variance: two-pass), backward 1
    (both sums stacked; XLA's autodiff of the textbook form needs 2 there); gradients equal the unsharded ones."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec as P

    from mgd_jax.models.layers import batch_norm_train
    from mgd_jax.train import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(jax.devices())
    x = np.random.default_rng(2).normal(1.0, 2.0, size=(4 * len(jax.devices()), 4, 4, 8)).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P(mesh.axis_names[0])))
    scale, bias = jnp.full((8,), 1.5), jnp.full((8,), 0.25)
    f = jax.jit(jax.grad(lambda x, s, b: jnp.sum(jnp.sin(batch_norm_train(x, s, b, 1e-5)[0])), (0, 1, 2)))
    if len(jax.devices()) > 1:
        hlo = f.lower(xs, scale, bias).compile().as_text()
        assert len(re.findall(r" all-reduce(?:-start)?\(", hlo)) == 3, hlo  # autodiff of the textbook form: 4
    for a, b in zip(f(xs, scale, bias), f(x, scale, bias)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batchnorm_backward_in_bfloat16_keeps_dtypes_and_is_close_to_float32():
    """Mixed precision casts BatchNorm's input and parameters to bfloat16: every gradient comes back in its
    primal's dtype (a custom_vjp must), within bfloat16 rounding of the float32 gradients; statistics are not
    differentiable."""
    from mgd_jax.models.layers import batch_norm_train
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, size=(8, 4, 4, 6)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)

    def loss(x, s, b):
        return jnp.sum(batch_norm_train(x, s, b, 1e-5)[0].astype(jnp.float32) * w)

    g32 = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    g16 = jax.grad(loss, (0, 1, 2))(*(jnp.asarray(a, jnp.bfloat16) for a in (x, scale, bias)))
    assert [g.dtype for g in g16] == [jnp.bfloat16] * 3
    for a, b in zip(g16, g32):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.05 * float(np.abs(b).max()))
    stats_grad = jax.grad(lambda x: jnp.sum(batch_norm_train(x, scale, bias, 1e-5)[1]))(x)
    np.testing.assert_array_equal(stats_grad, 0.0)
