"""SPEC §10 golden values (authors' PyTorch losses, float64) reproduced by our pure loss functions."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from mgd_jax import losses
from mgd_jax.analyzer import Granularity
from mgd_jax.methods import Outputs
from mgd_jax.stages import student

GOLD = json.loads((FIXTURES / "golden_losses.json").read_text())


def _inputs():
    i = np.arange(8, dtype=np.float64)[:, None]
    c = np.arange(100, dtype=np.float64)[None]
    k64 = np.arange(64, dtype=np.float64)[None]
    k256 = np.arange(256, dtype=np.float64)[None]
    return dict(
        zs=3 * np.sin(0.7 * i + 0.13 * c + 0.5), zt=4 * np.cos(0.3 * i - 0.07 * c),
        y=(7 * np.arange(8) + 3) % 100,
        eas=2 * np.sin(0.5 * i + 0.21 * k64), eat=2 * np.cos(0.4 * i + 0.17 * k64 + 1),
        eds=1.5 * np.sin(0.9 * i + 0.05 * k256), edt=2.5 * np.cos(0.2 * i + 0.11 * k256),
        Da=3 * np.sin(0.25 * i + 0.19 * c), Dd=2 * np.cos(0.6 * i + 0.03 * c + 2))


def _values(dtype):
    x = {k: (jnp.asarray(v, dtype) if k != "y" else jnp.asarray(v, jnp.int32)) for k, v in _inputs().items()}
    grans = (Granularity(64, 2.0), Granularity(256, 8.0))
    out = {
        "ce": losses.cross_entropy(x["zs"], x["y"]),
        "logit_kd_mag": losses.logit_kd(x["zs"], x["zt"], 4.0),
        "logit_kd_mas": losses.logit_kd(x["zs"], losses.stable_excitation_target(x["zt"], [x["Da"], x["Dd"]]), 4.0),
        "granularity_64_T2": losses.granularity_kl(x["eas"], x["eat"], 2.0),
        "granularity_256_T8": losses.granularity_kl(x["eds"], x["edt"], 8.0),
        "tube_loss_64_T2": losses.tube_loss(x["Da"], x["zt"], x["y"], 2.0),
        "tube_loss_256_T8": losses.tube_loss(x["Dd"], x["zt"], x["y"], 8.0),
    }
    s = Outputs(x["zs"], [], {"64d_T2": x["eas"], "256d_T8": x["eds"]})
    t = Outputs(x["zt"], [], {"64d_T2": x["eat"], "256d_T8": x["edt"]}, {"64d_T2": x["Da"], "256d_T8": x["Dd"]})
    for mode in ("mag", "mas"):
        obj = student.Objective(mode, grans, temperature=4.0, w_ce=0.2, w_logit_kd=0.8)
        terms = student.objective_terms(obj, s, t, x["y"], None)
        out[f"{mode}_total_kd_weights"] = student.total_loss(terms)
    return out


@pytest.mark.parametrize("key", sorted(k for k in GOLD if not k.startswith("_")))
def test_golden_float64(key):
    with jax.enable_x64(True):
        got = float(_values(jnp.float64)[key])
    # The golden values carry 10 significant digits (SPEC §10), so their own rounding is up to 4.8e-10
    # relative (tube_loss_64_T2 = 10.36535569); measured: <= 3.7e-10 (that one), <= 9e-11 for the others.
    # 1e-9 is 2x that rounding bound, as tight as those digits allow.  Any one of the five loss functions
    # computed in float32 fails it on some key (with the former 1e-6 only granularity_kl's did).
    assert got == pytest.approx(GOLD[key], rel=1e-9, abs=0)


@pytest.mark.parametrize("key", sorted(k for k in GOLD if not k.startswith("_")))
def test_golden_float32(key):
    got = _values(jnp.float32)[key]
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(GOLD[key], rel=1e-5)


def test_mas_terms_named_and_mag_uses_raw_logits():
    x = {k: jnp.asarray(v, jnp.float32) for k, v in _inputs().items()}
    grans = (Granularity(64, 2.0), Granularity(256, 8.0))
    s = Outputs(x["zs"], [], {"64d_T2": x["eas"], "256d_T8": x["eds"]})
    t = Outputs(x["zt"], [], {"64d_T2": x["eat"], "256d_T8": x["edt"]}, {"64d_T2": x["Da"], "256d_T8": x["Dd"]})
    y = jnp.asarray(_inputs()["y"])
    mas = student.objective_terms(student.Objective("mas", grans), s, t, y, None)
    assert set(mas) == {"ce", "stable_excitation", "granularity/64d_T2", "granularity/256d_T8"}
    none = student.objective_terms(student.Objective("none", grans), s, t, y, jnp.float32(0.5))
    assert set(none) == {"ce", "logit_kd", "method"}
    # a zero weight removes the term entirely (no teacher work is traced for it)
    ce_only = student.objective_terms(student.Objective("none", grans, w_logit_kd=0.0), s, t, y, None)
    assert set(ce_only) == {"ce"}


def test_kd_gradient_matches_numpy_reference():
    """d/dz_s of T^2 KL(p_t || q_s) / B = T (q_s - p_t) / B."""
    rng = np.random.default_rng(0)
    zs, zt, T = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)), 3.0
    g = jax.grad(lambda a: losses.logit_kd(a, jnp.asarray(zt, jnp.float32), T))(jnp.asarray(zs, jnp.float32))

    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(g, T * (softmax(zs / T) - softmax(zt / T)) / 5, rtol=1e-5, atol=1e-7)


def test_topk_correct():
    logits = jnp.asarray([[0.1, 0.5, 0.2, 0.9], [3.0, 1.0, 2.0, 0.0]])
    labels = jnp.asarray([1, 3])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1), [0.0, 0.0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2), [1.0, 0.0])
    np.testing.assert_array_equal(losses.topk_correct(logits, labels, 4), [1.0, 1.0])
