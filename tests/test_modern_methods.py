"""The methods after the paper (DKD, DIST, logit standardization, ReviewKD, OFD) and how they meet the modes.

Each pure loss against a numpy re-implementation of its published formula written here (float64 numpy; JAX in
float64 and in float32), on ordinary logits and the edge cases: one class per batch, a certain (one-hot) teacher,
1000 classes, logits of scale 50.  The student objective: a logit method reads the stable-excitation target in
mode mas and replaces the logit-KD term, logit standardization reaches every logit-level KL, the warm-ups read
the step's epoch.  Training: every new method with every student mode through the smoke config on 2 devices
(``slow``)."""
import math
import os
import shutil
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import test_methods_train
from configs import cifar100, default, smoke
from mgd_jax import losses, optim
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.config_validation import validate_config
from mgd_jax.methods import MethodPairError, Outputs, get_method, known_methods
from mgd_jax.methods.dist import dist_loss
from mgd_jax.methods.dkd import dkd_loss
from mgd_jax.models import get_model
from mgd_jax.stages import student as S

F32_RTOL = 1e-5  # float32 against the float64 reference
F64_RTOL = 1e-10  # float64 against the float64 reference: the same formula up to rounding
# ReviewKD's and OFD's BatchNorms take their batch statistics in float32 also for float64 inputs (models/layers.py):
# measured 2e-8 relative; 1e-6 leaves a 50x margin.
F64_BN_RTOL = 1e-6


# --- numpy references of the published formulas ------------------------------------------------------------------
def np_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p, q):
    """sum_c p (log p - log q) per row, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(axis=-1)


def np_dkd(zs, zt, y, alpha, beta, T):
    """Zhao et al. 2022, eqs. 1-4: binary (target, rest) KL and the KL over the non-target classes (target removed,
    renormalised), (alpha TCKD + beta NCKD) T^2, batch mean."""
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    rows = np.arange(len(y))
    mask = np.ones_like(ps, bool)
    mask[rows, y] = False
    bs = np.stack([ps[rows, y], np.where(mask, ps, 0).sum(1)], 1)
    bt = np.stack([pt[rows, y], np.where(mask, pt, 0).sum(1)], 1)
    tckd = np_kl(bt, bs)
    qs = np.where(mask, ps, 0) / bs[:, 1:]
    qt = np.where(mask, pt, 0) / bt[:, 1:]
    nckd = np_kl(qt, np.where(mask, qs, 1.0))
    return (alpha * tckd.mean() + beta * nckd.mean()) * T * T


def np_pearson_rows(a, b, eps=1e-8):
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.sqrt((a * a).sum(1)) * np.sqrt((b * b).sum(1)) + eps)


def np_dist(zs, zt, beta, gamma, tau):
    """Huang et al. 2022: tau^2 (beta (1 - mean_i rho(Y_s[i], Y_t[i])) + gamma (1 - mean_j rho(Y_s[:, j], Y_t[:, j])))."""
    ys, yt = np_softmax(zs / tau), np_softmax(zt / tau)
    return tau ** 2 * (beta * (1 - np_pearson_rows(ys, yt).mean()) + gamma * (1 - np_pearson_rows(ys.T, yt.T).mean()))


def np_standardize(z):
    """Sun et al. 2024: (z - mean) / (std + 1e-7), std with Bessel's correction."""
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def np_kd(zs, zt, T):
    return np_kl(np_softmax(zt / T), np_softmax(zs / T)).mean() * T * T


# --- inputs: ordinary logits and the edge cases -------------------------------------------------------------------
def _case(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    b, k = 16, 10
    if name == "ordinary":
        zs, zt, y = 3 * rng.standard_normal((b, k)), 3 * rng.standard_normal((b, k)), rng.integers(0, k, b)
    elif name == "one_class_per_batch":  # every label the same class, which the teacher favours everywhere
        y = np.full(b, 3)
        zs, zt = 2 * rng.standard_normal((b, k)), 2 * rng.standard_normal((b, k))
        zt[:, 3] += 4.0
    elif name == "one_hot_teacher":  # softmax(zt / T) exactly one-hot in float32 for T <= 4 (exp(-125) is 0 there)
        y = rng.integers(0, k, b)
        zs, zt = 3 * rng.standard_normal((b, k)), 500.0 * np.eye(k)[y]
    elif name == "1000_classes":
        b, k = 8, 1000
        zs, zt, y = 3 * rng.standard_normal((b, k)), 3 * rng.standard_normal((b, k)), rng.integers(0, k, b)
    elif name == "scale_50":
        zs, zt, y = 50 * rng.standard_normal((b, k)), 50 * rng.standard_normal((b, k)), rng.integers(0, k, b)
    else:
        raise ValueError(name)
    return zs.astype(np.float64), zt.astype(np.float64), y.astype(np.int32)


CASES = ("ordinary", "one_class_per_batch", "one_hot_teacher", "1000_classes", "scale_50")


def _jax(fn, dtype, *arrays):
    """fn on the arrays cast to ``dtype`` (float64 under enable_x64); integer arrays stay int32."""
    def cast(a):
        return jnp.asarray(a, jnp.int32) if a.dtype.kind == "i" else jnp.asarray(a, dtype)

    if dtype == jnp.float64:
        with jax.enable_x64(True):
            return float(fn(*map(cast, arrays)))
    return float(fn(*map(cast, arrays)))


def _close(got, want, rtol):
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_loss_against_numpy(case, dtype, alpha, beta, T):
    zs, zt, y = _case(case)
    got = _jax(lambda a, b, c: dkd_loss(a, b, c, alpha, beta, T), dtype, zs, zt, y)
    _close(got, np_dkd(zs, zt, y, alpha, beta, T), F64_RTOL if dtype == jnp.float64 else F32_RTOL)


def test_dkd_parts():
    """alpha and beta weigh TCKD and NCKD: the loss is linear in them; a student equal to its teacher has 0."""
    zs, zt, y = _case("ordinary")
    tckd, nckd = dkd_loss(zs, zt, y, 1.0, 0.0, 4.0), dkd_loss(zs, zt, y, 0.0, 1.0, 4.0)
    np.testing.assert_allclose(dkd_loss(zs, zt, y, 2.0, 3.0, 4.0), 2 * tckd + 3 * nckd, rtol=1e-5)
    assert float(tckd) > 0 and float(nckd) > 0
    assert abs(float(dkd_loss(zt, zt, y, 1.0, 8.0, 4.0))) < 1e-5


@pytest.mark.parametrize("case", ["one_hot_teacher", "scale_50", "1000_classes"])
def test_dkd_gradient_is_finite(case):
    zs, zt, y = _case(case)
    g = jax.grad(lambda a: dkd_loss(a, jnp.asarray(zt, jnp.float32), y, 1.0, 8.0, 4.0))(jnp.asarray(zs, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_loss_against_numpy(case, dtype, beta, gamma, tau):
    zs, zt, _ = _case(case)
    got = _jax(lambda a, b: dist_loss(a, b, beta, gamma, tau), dtype, zs, zt)
    _close(got, np_dist(zs, zt, beta, gamma, tau), F64_RTOL if dtype == jnp.float64 else F32_RTOL)


def test_dist_edge_rows_and_gradient():
    """A batch of one (every column constant: zero-norm centred vectors) and identical rows keep the loss finite
    and its gradient finite, as the authors' eps makes them (correlation 0 there); student = teacher gives 0."""
    zs, zt, _ = _case("ordinary")
    for a, b in ((zs[:1], zt[:1]), (np.repeat(zs[:1], 4, 0), np.repeat(zt[:1], 4, 0))):
        _close(_jax(lambda u, v: dist_loss(u, v, 1.0, 1.0, 4.0), jnp.float64, a, b), np_dist(a, b, 1.0, 1.0, 4.0),
               F64_RTOL)
        g = jax.grad(lambda u: dist_loss(u, jnp.asarray(b, jnp.float32), 1.0, 1.0, 4.0))(jnp.asarray(a, jnp.float32))
        assert np.all(np.isfinite(np.asarray(g)))
    assert abs(float(dist_loss(zt, zt, 1.0, 1.0, 4.0))) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
def test_standardize_and_logit_kd_against_numpy(case, dtype):
    """``standardize`` (z-score, unbiased std, + 1e-7) and ``logit_kd(..., standardize=True)`` = KD of the z-scored
    logits; ``standardize=False`` is the plain KD term."""
    zs, zt, _ = _case(case)
    rtol = F64_RTOL if dtype == jnp.float64 else F32_RTOL
    ctx = jax.enable_x64(True) if dtype == jnp.float64 else jax.enable_x64(False)
    with ctx:
        got = np.asarray(losses.standardize(jnp.asarray(zs, dtype)), np.float64)
    want = np_standardize(zs)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    for T in (2.0, 4.0):
        _close(_jax(lambda a, b: losses.logit_kd(a, b, T, standardize=True), dtype, zs, zt),
               np_kd(np_standardize(zs), np_standardize(zt), T), rtol)
        _close(_jax(lambda a, b: losses.logit_kd(a, b, T), dtype, zs, zt), np_kd(zs, zt, T), rtol)


def test_standardize_of_equal_logits():
    """A row of equal logits (std 0) standardizes to zeros with a finite (zero) gradient; scale and shift of a row
    do not change its standardized logits (up to the 1e-7)."""
    z = jnp.asarray([[2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    out = losses.standardize(z)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    g = jax.grad(lambda a: jnp.sum(losses.standardize(a) * jnp.arange(4.0)))(z)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(losses.standardize(50 * z[1:] - 7)), np.asarray(out[1:]), rtol=1e-6)
    assert losses.standardize(z.astype(jnp.bfloat16)).dtype == jnp.float32


def test_dkd_masks_the_target_as_its_authors():
    """NCKD's masking is the authors' (mdistiller): the target's logit / T lowered by 1000.  Where a teacher's target
    logit exceeds the others by 1000 T or more (never for real logits) that leaves the target in; the loss then
    equals the numpy formula with that shift, not the exactly masked one."""
    zs, _, y = _case("ordinary")
    zt = 1000.0 * np.eye(zs.shape[1])[y]  # T = 1: the shifted target logit ties the others
    rows = np.arange(len(y))
    gt = np.eye(zs.shape[1])[y]
    pt = np_softmax(zt - 1000 * gt)
    zs_shift = zs - 1000 * gt
    m = zs_shift.max(1, keepdims=True)
    log_ps = zs_shift - m - np.log(np.exp(zs_shift - m).sum(1, keepdims=True))  # exp(-1000) is 0 in float64 too
    nckd = (pt * (np.log(pt) - log_ps)).sum(1).mean()
    assert pt[rows, y].min() > 0.09  # the target is in the teacher's "non-target" distribution
    with jax.enable_x64(True):
        got = float(dkd_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y), 0.0, 1.0, 1.0))
    np.testing.assert_allclose(got, nckd, rtol=F64_RTOL)


# --- ReviewKD and OFD: the whole loss of given features and parameters against numpy ------------------------------
def np_adaptive_pool(x, h, w):
    """NHWC; PyTorch's adaptive_avg_pool2d bins [floor(i H / h), ceil((i + 1) H / h))."""
    H, W = x.shape[1:3]
    out = np.zeros((x.shape[0], h, w, x.shape[3]))
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


def np_nearest(x, h, w):
    rows = [int(np.floor(i * x.shape[1] / h)) for i in range(h)]
    cols = [int(np.floor(j * x.shape[2] / w)) for j in range(w)]
    return x[:, rows][:, :, cols]


def np_bn_train(x, p, eps=1e-5):
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_conv(x, kernel, pad, bias=None):
    """NHWC x HWIO, stride 1, zero padding."""
    kh, kw = kernel.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    H, W = x.shape[1] + 2 * pad - kh + 1, x.shape[2] + 2 * pad - kw + 1
    out = sum(xp[:, i:i + H, j:j + W] @ kernel[i, j] for i in range(kh) for j in range(kw))
    return out if bias is None else out + bias


def np_hcl(fs_list, ft_list):
    """Chen et al. 2021's HCL as mdistiller: (MSE + sum_l 2^-k MSE of the l x l pools, l in 4, 2, 1 below the map's
    height) / (1 + sum of those weights), summed over levels."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        loss, tot, cnt = ((fs - ft) ** 2).mean(), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[1]:
                continue
            cnt /= 2
            loss += ((np_adaptive_pool(fs, size, size) - np_adaptive_pool(ft, size, size)) ** 2).mean() * cnt
            tot += cnt
        total += loss / tot
    return total


def np_review(student_levels, teacher_levels, params):
    """ABF from deep to shallow (1x1 conv + BN; fusion with the upsampled deeper level by a sigmoid attention over
    the concatenation; nearest resize to the teacher's size; 3x3 conv + BN), then HCL; BN with batch statistics."""
    n = len(student_levels)
    outs, residual = [None] * n, None
    for i in reversed(range(n)):
        p = {k: jax.tree.map(np.asarray, v) for k, v in params[f"abf{i}"].items()}
        x = np_bn_train(np_conv(student_levels[i], p["conv1"]["kernel"], 0), p["bn1"])
        if i < n - 1:
            r = np_nearest(residual, *x.shape[1:3])
            z = 1 / (1 + np.exp(-np_conv(np.concatenate([x, r], -1), p["att_conv"]["kernel"], 0,
                                         p["att_conv"]["bias"])))
            x = x * z[..., :1] + r * z[..., 1:]
        x = np_nearest(x, *teacher_levels[i].shape[1:3])
        residual = x
        outs[i] = np_bn_train(np_conv(x, p["conv2"]["kernel"], 1), p["bn2"])
    return np_hcl(outs, teacher_levels)


def np_margin(gamma, beta):
    """Heo et al. 2019: E[x | x < 0] of N(beta, gamma^2), -3 |gamma| where P(x < 0) <= 0.001."""
    out = []
    for g, m in zip(np.abs(gamma), beta):
        cdf = 0.5 * (1 + math.erf(-m / g / math.sqrt(2)))
        out.append(-g * math.exp(-(m / g) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m if cdf > 0.001 else -3 * g)
    return np.asarray(out)


def np_ofd(student_maps, teacher_maps, params, margins):
    """Connector (1x1 conv + BN) on the student map, teacher map pooled to its size, partial L2 with the margin
    (mdistiller's three cases), summed over C, H, W, batch mean, stage i of n weighed 2^-(n - 1 - i)."""
    n, total = len(student_maps), 0.0
    for i, (a, b) in enumerate(zip(student_maps, teacher_maps)):
        p = {k: jax.tree.map(np.asarray, v) for k, v in params[f"layer{i}"].items()}
        s = np_bn_train(np_conv(a, p["conv"]["kernel"], 0), p["bn"])
        t = np_adaptive_pool(b, *s.shape[1:3])
        m = margins[i]
        loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
                + (s - t) ** 2 * (t > 0))
        total += np.abs(loss).sum() / s.shape[0] / 2 ** (n - i - 1)
    return total


def _feature_outputs(seed, shapes, pooled, b=4):
    """Outputs with random stage maps of ``shapes`` (H, C) and a pooled vector of width ``pooled``."""
    rng = np.random.default_rng(seed)
    maps = [rng.standard_normal((b, h, h, c)) for h, c in shapes]
    return Outputs(jnp.zeros((b, 10)), [np.zeros((b, 8, 8, 3)), *maps, rng.standard_normal((b, pooled))])


FEATURE_PAIRS = {  # (student maps, pooled), (teacher maps, pooled): equal sizes; the teacher's maps twice as large
    "equal_sizes": (([(8, 4), (4, 8), (2, 16)], 16), ([(8, 6), (4, 12), (2, 24)], 24)),
    "teacher_larger": (([(4, 4), (2, 8), (1, 16)], 16), ([(8, 6), (4, 12), (2, 24)], 24)),
}


def _cast_outputs(o, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), o)


# The whole losses with their modules compile their ops eagerly (~15 s of CPU each): slow.  The fast tier has the
# pure pieces (HCL, the partial L2, the margin, the nearest resize) below.
FEATURE_CASES = [(shapes, dtype) for shapes in FEATURE_PAIRS for dtype in (jnp.float32, jnp.float64)]


@pytest.mark.slow
@pytest.mark.parametrize("shapes,dtype", FEATURE_CASES, ids=lambda x: getattr(x, "__name__", x))
def test_review_loss_against_numpy(shapes, dtype):
    (s_shapes, s_pool), (t_shapes, t_pool) = FEATURE_PAIRS[shapes]
    s, t = _feature_outputs(1, s_shapes, s_pool), _feature_outputs(2, t_shapes, t_pool)
    method = get_method("review")
    ctx = jax.enable_x64(True) if dtype == jnp.float64 else jax.enable_x64(False)
    with ctx:
        sd, td = _cast_outputs(s, dtype), _cast_outputs(t, dtype)
        v = method.init(jax.random.key(0), sd, td)
        v = jax.tree.map(lambda a: jnp.asarray(a, dtype), v)
        got, new_state = method.loss(v, sd, td, {"label": jnp.zeros(4, jnp.int32)}, True)
        got = float(got)
    levels = lambda o: [np.asarray(f, np.float64) for f in o.features[1:-1]] + [  # noqa: E731
        np.asarray(o.features[-1], np.float64)[:, None, None, :]]
    want = np_review(levels(s), levels(t), v["params"])
    assert set(v["params"]) == {"abf0", "abf1", "abf2", "abf3"} and "att_conv" not in v["params"]["abf3"]
    _close(got, want, F64_BN_RTOL if dtype == jnp.float64 else F32_RTOL)
    assert set(new_state["batch_stats"]) == set(v["params"])


def test_hcl_pyramid_levels():
    """HCL's pyramid: an 8x8 map adds its 4x4, 2x2, 1x1 pools (weights 1/2, 1/4, 1/8 over a total of 15/8), a
    2x2 map only the 1x1 (2/3 and 1/3 of 1 + 1/2), a 1x1 map none."""
    from mgd_jax.methods.review import hcl

    rng = np.random.default_rng(0)
    for h in (8, 4, 2, 1):
        fs, ft = rng.standard_normal((3, h, h, 5)), rng.standard_normal((3, h, h, 5))
        _close(float(hcl([jnp.asarray(fs, jnp.float32)], [jnp.asarray(ft, jnp.float32)])), np_hcl([fs], [ft]),
               F32_RTOL)
    fs, ft = rng.standard_normal((3, 2, 2, 5)), rng.standard_normal((3, 2, 2, 5))
    full, top = ((fs - ft) ** 2).mean(), ((fs.mean((1, 2)) - ft.mean((1, 2))) ** 2).mean()
    _close(float(hcl([jnp.asarray(fs)], [jnp.asarray(ft)])), (full + top / 2) / 1.5, F32_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("shapes,dtype", FEATURE_CASES, ids=lambda x: getattr(x, "__name__", x))
def test_ofd_loss_against_numpy(shapes, dtype):
    (s_shapes, s_pool), (t_shapes, t_pool) = FEATURE_PAIRS[shapes]
    s, t = _feature_outputs(3, s_shapes, s_pool), _feature_outputs(4, t_shapes, t_pool)
    rng = np.random.default_rng(5)
    margins = [-np.abs(rng.standard_normal(c)) for _, c in t_shapes]
    method = get_method("ofd")
    ctx = jax.enable_x64(True) if dtype == jnp.float64 else jax.enable_x64(False)
    with ctx:
        sd, td = _cast_outputs(s, dtype), _cast_outputs(t, dtype)
        v = method.init(jax.random.key(0), sd, td)
        v = jax.tree.map(lambda a: jnp.asarray(a, dtype), v)
        v["state"]["margin"] = {f"layer{i}": jnp.asarray(m, dtype) for i, m in enumerate(margins)}
        got, new_state = method.loss(v, sd, td, {"label": jnp.zeros(4, jnp.int32)}, True)
        got = float(got)
    want = np_ofd([np.asarray(f, np.float64) for f in s.features[1:-1]],
                  [np.asarray(f, np.float64) for f in t.features[1:-1]], v["params"], margins)
    _close(got, want, F64_BN_RTOL if dtype == jnp.float64 else F32_RTOL)
    np.testing.assert_array_equal(np.asarray(new_state["margin"]["layer2"]), np.asarray(margins[2], np.float32)
                                  if dtype == jnp.float32 else margins[2])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_ofd_partial_l2_against_numpy(dtype):
    """mdistiller's three cases, teacher responses around the margin and zero included."""
    from mgd_jax.methods.ofd import ofd_partial_l2

    rng = np.random.default_rng(7)
    src, tgt = rng.standard_normal((4, 3, 3, 5)), rng.standard_normal((4, 3, 3, 5))
    margin = -np.abs(rng.standard_normal(5))
    tgt[0, 0, 0] = margin  # t = m exactly
    tgt[1, 0, 0] = 0.0
    s_, t_ = src, tgt
    want = (((s_ - margin) ** 2 * ((s_ > margin) & (t_ <= margin)) + (s_ - t_) ** 2 * ((s_ > t_) & (t_ > margin)
             & (t_ <= 0)) + (s_ - t_) ** 2 * (t_ > 0)).sum() / 4)
    got = _jax(ofd_partial_l2, dtype, src, tgt, margin)
    _close(got, want, F64_RTOL if dtype == jnp.float64 else F32_RTOL)
    # the partial L2 of Heo et al.: target max(t, m), counted where s > target or the target is positive
    target = np.maximum(tgt, margin)
    _close(got, (((src - target) ** 2) * ((src > target) | (target > 0))).sum() / 4,
           F64_RTOL if dtype == jnp.float64 else F32_RTOL)


def test_nearest_resize_and_adaptive_pool_against_numpy():
    from mgd_jax.methods.common import adaptive_avg_pool, nearest_resize

    x = np.random.default_rng(8).standard_normal((2, 6, 4, 3))
    for h, w in ((3, 2), (12, 8), (5, 7), (1, 1)):
        np.testing.assert_array_equal(np.asarray(nearest_resize(jnp.asarray(x, jnp.float32), h, w)),
                                      np_nearest(x, h, w).astype(np.float32))
        np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x, jnp.float32), (h, w))),
                                   np_adaptive_pool(x, h, w), rtol=1e-5, atol=1e-6)


def test_ofd_margin_against_numpy():
    from mgd_jax.methods.ofd import bn_margin

    gamma = np.array([1.0, 0.5, -2.0, 0.3, 1.0, 4.0])
    beta = np.array([0.0, 1.0, -1.0, 2.0, 3.2, -10.0])  # P(x < 0) of N(3.2, 1) < 0.001: -3 |gamma|
    with jax.enable_x64(True):
        got = np.asarray(bn_margin(jnp.asarray(gamma), jnp.asarray(beta)))
    np.testing.assert_allclose(got, np_margin(gamma, beta), rtol=F64_RTOL)
    assert got[4] == -3.0 and np.all(got < 0)
    np.testing.assert_allclose(np.asarray(bn_margin(jnp.asarray(gamma, jnp.float32), jnp.asarray(beta, jnp.float32))),
                               np_margin(gamma, beta), rtol=F32_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("t_arch,s_arch", [("resnet14", "resnet8"), ("wrn_16_2", "wrn_16_1"), ("vgg11", "vgg8"),
                                           ("ResNet50", "resnet8"), ("resnet18_imagenet", "resnet18_imagenet")])
def test_ofd_margins_come_from_the_teachers_bn_before_relu(t_arch, s_arch):
    """The student step's ctx carries the teacher: OFD's margins are those of the BatchNorms whose output (plus the
    shortcut, in a residual block) the teacher's pre-ReLU stage maps are, one per stage map, of its width."""
    from mgd_jax.methods.ofd import bn_margin

    key, x = jax.random.key(0), jnp.zeros((2, 16, 16, 3))
    t_model, s_model = get_model(t_arch, 10), get_model(s_arch, 10)
    t_vars = t_model.init(key, x)
    # distinct BN parameters, so that a margin taken from the wrong BatchNorm differs
    t_vars = {**t_vars, "params": jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.01 * (zlib.crc32(jax.tree_util.keystr(p).encode()) % 97) if p[-1].key in ("scale", "bias") else a,
        t_vars["params"])}
    s_out = Outputs(*s_model.apply(s_model.init(key, x), x, preact=True))
    t_out = Outputs(*t_model.apply(t_vars, x, preact=True))
    v = get_method("ofd").init(key, s_out, t_out, {"teacher_model": t_model, "teacher_variables": t_vars})
    margins = v["state"]["margin"]
    n = min(len(s_out.features) - 2, len(t_out.features) - 2)
    assert len(margins) == n
    p = t_vars["params"]
    expect = {"resnet14": lambda: [p["layer1_1"]["bn2"], p["layer2_1"]["bn2"], p["layer3_1"]["bn2"]],
              "wrn_16_2": lambda: [p["block2"]["layer_0"]["bn1"], p["block3"]["layer_0"]["bn1"], p["bn1"]],
              "vgg11": lambda: [p["block1_1"], p["block2_4"], p["block3_4"], p["block4_4"]],
              "ResNet50": lambda: [p["layer2_3"]["bn3"], p["layer3_5"]["bn3"], p["layer4_2"]["bn3"]],  # last 3 of 4
              "resnet18_imagenet": lambda: [p[f"layer{s}_1"]["bn2"] for s in (1, 2, 3, 4)]}[t_arch]()
    for i, bn in enumerate(expect):
        np.testing.assert_allclose(np.asarray(margins[f"layer{i}"]), np.asarray(bn_margin(bn["scale"], bn["bias"])))
        assert margins[f"layer{i}"].shape == (t_out.features[1:-1][len(t_out.features) - 2 - n + i].shape[-1],)


def test_review_and_ofd_refuse_the_pairs_they_cannot_serve():
    """One line each, naming method, pair and reason: ReviewKD needs as many stage maps in both networks; OFD a
    teacher whose stage ReLUs follow one BatchNorm each."""
    x = jnp.zeros((2, 32, 32, 3))

    def outs(arch, preact):
        return S.output_shapes(get_model(arch, 100), x)[preact]

    with pytest.raises(MethodPairError, match=r"^method 'review' cannot pair vgg13 -> resnet20: the teacher has 4 "
                                              r"stage maps but the student 3$"):
        get_method("review").check_pair("resnet20", "vgg13", outs("resnet20", False), outs("vgg13", True))
    for teacher in ("ShuffleV2", "MobileNetV2"):
        with pytest.raises(MethodPairError, match=rf"^method 'ofd' cannot pair {teacher} -> resnet20: no single "
                                                  r"BatchNorm before the teacher's stage ReLUs to take the margin from$"):
            get_method("ofd").check_pair("resnet20", teacher, outs("resnet20", True), outs(teacher, True))
    c = cifar100.get_config("vgg13,resnet20,review,mas")
    validate_config(c)
    with pytest.raises(MethodPairError, match="^method 'review' cannot pair vgg13 -> resnet20"):
        S.check_pairs(c, 100, (32, 32, 3))


@pytest.mark.parametrize("pair,weight", [(("resnet56", "resnet20"), 0.6), (("resnet110", "resnet32"), 1.0),
                                         (("resnet32x4", "resnet8x4"), 5.0), (("wrn_40_2", "wrn_16_2"), 5.0),
                                         (("resnet32x4", "ShuffleV2"), 8.0), (("vgg13", "vgg8"), 1.0)])
def test_review_weight_per_pair(pair, weight):
    """The authors' CIFAR-100 script's --kd-loss-weight per pair (mdistiller's default 1 elsewhere); logit KD 1 under
    the MG scripts' protocol like every feature method, none in 'baseline'."""
    c = _cifar100_config(*pair, methods=("review",))
    for run in c.students.values():
        assert run.weights.method == weight and run.weights.ce == 1.0
        assert run.weights.logit_kd == (0.0 if run.protocol == "repdistiller" else 1.0)
        assert dict(run.method_options) == {"warmup_epochs": 20}


@pytest.mark.parametrize("method,option,value,message", [
    ("dkd", "temperature", 0.0, "dkd: temperature must be > 0, got 0.0"),
    ("dkd", "nckd_beta", -1.0, "dkd: alpha and nckd_beta must be >= 0, got 1.0 and -1.0"),
    ("dkd", "warmup_epochs", -2, "dkd: warmup_epochs must be an integer >= 0 (0: none), got -2"),
    ("dist", "tau", -4.0, "dist: tau must be > 0, got -4.0"),
    ("review", "warmup_epochs", -1, "review: warmup_epochs must be an integer >= 0 (0: none), got -1"),
    ("ofd", "connector_kernel", 2, "ofd: connector_kernel must be an odd integer >= 1 (the map keeps its size), got 2"),
])
def test_bad_method_options_are_one_line_config_errors(method, option, value, message):
    from mgd_jax.errors import ConfigError

    c = cifar100.get_config(f"resnet56,resnet20,{method},mas")
    c.students[f"{method}_mas"].method_options[option] = value
    with pytest.raises(ConfigError) as e:
        validate_config(c)
    assert str(e.value) == f"config.students.{method}_mas.method_options: {message}"


def test_ofd_weights():
    c = _cifar100_config("resnet32x4", "resnet8x4", methods=("ofd",))
    for run in c.students.values():
        assert (run.weights.ce, run.weights.method) == (1.0, 1e-3)
        assert run.weights.logit_kd == (0.0 if run.protocol == "repdistiller" else 1.0)
        assert dict(run.method_options) == {"connector_kernel": 1}


# --- the student objective: targets, standardization, warm-up ----------------------------------------------------
NEW_METHODS = ("dkd", "dist", "review", "ofd")
LOGIT_METHODS = ("dkd", "dist")
GRANS = parse_granularities([(16, 2.0), (32, 8.0)])


def _outputs(seed=0, b=6, k=10):
    rng = np.random.default_rng(seed)
    zs, zt, d1, d2 = (3 * rng.standard_normal((b, k)) for _ in range(4))
    y = rng.integers(0, k, b).astype(np.int32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    s = Outputs(f32(zs), [])
    t = Outputs(f32(zt), [], {}, {"16d_T2": f32(d1), "32d_T8": f32(d2)})
    return s, t, zs, zt, (zt + d1 + d2) / 3, y


@pytest.mark.parametrize("standardization", [False, True])
@pytest.mark.parametrize("mode", ["none", "mag", "mas"])
@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_logit_method_reads_the_objective_target(name, mode, standardization):
    """A logit method's loss reads the stable-excitation target in mode mas (the teacher's logits otherwise), and
    logit standardization z-scores both sides of DKD (a KL) but not of DIST (a correlation)."""
    s, t, zs, zt, stable, y = _outputs()
    target = stable if mode == "mas" else zt
    method = get_method(name)
    obj = S.Objective(mode, GRANS, w_logit_kd=0.0, logit_standardization=standardization)
    got, _ = method.loss({"params": {}, "state": {}}, *S.method_inputs(method, obj, s, t), {"label": jnp.asarray(y)},
                         True)
    if name == "dkd":
        a, b = (np_standardize(zs), np_standardize(target)) if standardization else (zs, target)
        want = np_dkd(a, b, y, 1.0, 8.0, 4.0)
    else:
        want = np_dist(zs, target, 1.0, 1.0, 4.0)
    np.testing.assert_allclose(float(got), want, rtol=F32_RTOL)


@pytest.mark.parametrize("mode", ["none", "mag", "mas"])
def test_logit_standardization_reaches_the_kd_term(mode):
    """``logit_standardization``: the KD term (mag / none) and the stable-excitation term (mas) distil z-scored
    student logits towards the z-scored target; CE and the granularity terms are unchanged."""
    s, t, zs, zt, stable, y = _outputs(1)
    rng = np.random.default_rng(2)
    enc = {g.name: jnp.asarray(rng.standard_normal((6, g.dim)), jnp.float32) for g in GRANS}
    s, t = s.replace(encodings=enc), t.replace(encodings={k: v[::-1] for k, v in enc.items()})
    target = stable if mode == "mas" else zt
    terms = {flag: S.objective_terms(S.Objective(mode, GRANS, temperature=2.0, logit_standardization=flag), s, t,
                                     jnp.asarray(y), None) for flag in (False, True)}
    key = "stable_excitation" if mode == "mas" else "logit_kd"
    np.testing.assert_allclose(float(terms[True][key][1]), np_kd(np_standardize(zs), np_standardize(target), 2.0),
                               rtol=F32_RTOL)
    np.testing.assert_allclose(float(terms[False][key][1]), np_kd(zs, target, 2.0), rtol=F32_RTOL)
    for k in terms[False]:
        if k != key:
            assert float(terms[True][k][1]) == float(terms[False][k][1]), k


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_step_tells_the_method_its_epoch():
    """The student step computes the 1-based epoch from its step count (``Objective.steps_per_epoch``): DKD's
    warm-up min(epoch / 20, 1) is 1/20 in epoch 1 and 1 from epoch 20 on (same parameters, same batch)."""
    aug = ml_collections.ConfigDict(dict(pad=0, flip=False, mean=(0.3, 0.3, 0.3), std=(0.4, 0.4, 0.4)))
    key = jax.random.key(0)
    x = jnp.zeros((2, 8, 8, 3))
    t_model, an = get_model("resnet8", 10), GranularityAnalyzer(GRANS, 10)
    t_vars = t_model.init(key, x)
    teacher = {"backbone": t_vars, "analyzer": an.init(key, jnp.zeros((1, 64)))["params"]}
    s_mods = S.StudentModules(get_model("resnet8", 10), None, get_method("dkd"))
    t_mods = S.TeacherModules(t_model, an)
    tx = optim.sgd(ml_collections.ConfigDict(dict(lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(),
                                                  gamma=0.1)), 3)
    obj = S.Objective("none", GRANS, w_logit_kd=0.0, steps_per_epoch=3)
    state = S.init_state(s_mods, t_mods, teacher, tx, key, x)
    step = jax.jit(S.make_train_step(s_mods, t_mods, obj, tx, aug))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 8, 8, 3)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    got = {}
    for s in (0, 2, 3, 56, 57, 300):  # epochs 1, 1, 2, 19, 20, 101
        _, m = step(state.replace(step=jnp.int32(s)), teacher, batch, key)
        got[s] = float(m["loss/method"])
    full = got[300]
    np.testing.assert_allclose([got[s] / full for s in (0, 2, 3, 56, 57)], [1 / 20, 1 / 20, 2 / 20, 19 / 20, 1.0],
                               rtol=1e-5)


# --- configs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair,beta", [(("resnet56", "resnet20"), 2.0), (("resnet110", "resnet32"), 2.0),
                                       (("vgg13", "vgg8"), 6.0), (("vgg13", "MobileNetV2"), 6.0),
                                       (("wrn_40_2", "wrn_16_2"), 6.0), (("wrn_40_2", "wrn_40_1"), 6.0),
                                       (("wrn_40_2", "ShuffleV1"), 8.0), (("resnet32x4", "resnet8x4"), 8.0),
                                       (("resnet110", "resnet20"), 8.0)])
def test_dkd_beta_per_pair(pair, beta):
    """mdistiller's configs/cifar100/dkd/*.yaml (8 where a pair's file sets none); CE 1 + DKD in every mode."""
    c = cifar100.get_config(",".join(pair) + ",dkd,all")
    c.students.update(cifar100.get_config(",".join(pair) + ",dkd,baseline").students)
    validate_config(c)
    assert set(c.students) == {"dkd_none", "dkd_mag", "dkd_mas", "dkd_baseline"}
    for run in c.students.values():
        assert run.method_options.nckd_beta == beta
        assert (run.method_options.alpha, run.method_options.temperature, run.method_options.warmup_epochs) == \
            (1.0, 4.0, 20)
        assert (run.weights.ce, run.weights.logit_kd, run.weights.method) == (1.0, 0.0, 1.0)


def test_dist_weights():
    c = cifar100.get_config("resnet56,resnet20,dist,all")
    for run in c.students.values():
        assert (run.weights.ce, run.weights.logit_kd, run.weights.method) == (1.0, 0.0, 2.0)
        assert dict(run.method_options) == {"inter_weight": 1.0, "intra_weight": 1.0, "tau": 4.0}


def _cifar100_config(t_arch, s_arch, methods=NEW_METHODS):
    """configs/cifar100.py's config of the pair with every mode of each method in ``methods`` (all + baseline)."""
    c = cifar100.get_config(f"{t_arch},{s_arch},{methods[0]},all")
    for method in methods:
        for mode in ("all", "baseline"):
            c.students.update(cifar100.get_config(f"{t_arch},{s_arch},{method},{mode}").students)
    return c


def test_cifar100_config_takes_the_new_methods():
    """configs/cifar100.py builds and validates every mode of each new method on the paper's pairs (with logit
    standardization on too)."""
    for t_arch, s_arch in default.README_PAIRS:
        c = _cifar100_config(t_arch, s_arch)
        c.student.logit_standardization = True
        validate_config(c)
        assert len(c.students) == 4 * len(NEW_METHODS)
    assert set(NEW_METHODS) <= set(known_methods())


def test_the_sweep_takes_the_new_methods():
    """One sweep workdir's config holds every new method x mode (the config file's students merged); the table's
    protocol column says what a logit method's students optimise."""
    from mgd_jax import sweep

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modes = ["baseline", "none", "mag", "mas"]
    c, names = sweep.run_config(os.path.join(root, "configs", "cifar100.py"), ("resnet56", "resnet20"),
                                list(NEW_METHODS), modes, 0)
    validate_config(c)
    assert sorted(names.values()) == sorted(f"{m}_{mode}" for m in NEW_METHODS for mode in modes)
    assert sweep.protocol("dkd", "mas") == "CE + DKD to the stable excitation + granularity KL (MAS)"
    assert sweep.protocol("dist", "baseline") == "CE + 2 DIST (the authors' recipe)"


@pytest.mark.slow
@pytest.mark.parametrize("pair", default.README_PAIRS, ids=lambda p: "_".join(p))
def test_the_run_pair_check_passes_the_new_methods_on_the_paper_pairs(pair):
    """The run's own pair check (before any data is read) passes every new method on every pair of the table."""
    S.check_pairs(_cifar100_config(*pair), 100, (32, 32, 3))


# --- training: every new method x every mode through the smoke config on 2 devices --------------------------------
def _smoke_students(method):
    """The smoke config's students for ``method``: mode 'all' (none, mag, mas) and 'baseline', fused in one run."""
    c = smoke.get_config(f"resnet8,resnet8,{method},all")
    c.students.update(smoke.get_config(f"resnet8,resnet8,{method},baseline").students)
    return c


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("method", [*NEW_METHODS, "kd+ls"])
def test_new_method_trains_every_mode(method, smoke_workdir, tmp_path):
    """``train.py --config=configs/smoke.py:resnet8,resnet8,<method>,all`` (none, mag, mas) plus 'baseline', the
    four students fused in one group on 2 devices, 1 epoch each from the smoke run's teacher and analyzer (device-
    resident data for every other method); ``kd+ls``: KD with ``student.logit_standardization``.  Every student
    logs finite loss terms of its mode (the method's term where it has one) and a test accuracy."""
    import json

    from mgd_jax import pipeline

    name = method.split("+")[0]
    c = _smoke_students(name)
    c.student.epochs, c.student.optimizer.milestones = 1, ()
    c.data.on_device = (NEW_METHODS + ("kd+ls",)).index(method) % 2 == 0
    if method == "kd+ls":
        c.student.logit_standardization = True
    validate_config(c)
    src, _ = smoke_workdir
    work = tmp_path / "w"
    for stage in ("teacher", "analyzer"):
        shutil.copytree(os.path.join(src, stage), work / stage)
    summary = pipeline.train_and_evaluate(c, str(work), devices=jax.devices()[:2])
    rows = {r["stage"]: r for r in summary["rows"]}
    for student, run in c.students.items():
        row = rows[f"student {student} ({name} / {run.granularity if run.protocol == 'mg' else 'baseline'})"]
        assert row["best_acc1"] is not None
        (line,) = [json.loads(x) for x in (work / "students" / student / "metrics.jsonl").read_text().splitlines()]
        terms = {k.split("/", 2)[-1] for k in line if k.startswith("train/loss/")}
        want = {"ce"}
        if run.weights.logit_kd:
            want.add("stable_excitation" if run.granularity == "mas" else "logit_kd")
        if name != "kd":
            want.add("method")
        if run.granularity != "none":
            want |= {"granularity/16d_T2", "granularity/32d_T8"}
        assert terms == want, (student, terms)
        assert all(np.isfinite(v) for k, v in line.items() if isinstance(v, float)), line


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [n for n in NEW_METHODS if dict(test_methods_train.MATRIX)[n] != "mas"])
def test_new_method_steps_in_bfloat16_with_device_resident_data(name):
    """test_methods_train's step test in mode mas, which runs with the accelerator defaults: bfloat16 compute, the
    training set resident on the 2 devices (rows gathered inside the step), donated state; finite losses and
    gradients, the method's own parameters trained.  For the new methods its rotation of modes gives another mode
    (a method it already runs in mode mas is not run twice)."""
    from mgd_jax.train import mesh as mesh_lib

    test_methods_train.test_method_trains(name, "mas", mesh_lib.make_mesh(jax.devices()[:2]))
