"""Deep mutual learning and MDP-DML as a training mode."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dml
from mgd_jax import pipeline
from mgd_jax.config_validation import ConfigError, validate_config
from mgd_jax.stages.mutual import peer_kl


def test_peer_kl_is_torch_mean_reduction():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))

    def sm(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = sm(t), sm(s)
    np.testing.assert_allclose(peer_kl(jnp.asarray(s), jnp.asarray(t)), np.mean(p * (np.log(p) - np.log(q))),
                               rtol=1e-5)
    p2, q2 = sm(t / 2), sm(s / 2)
    np.testing.assert_allclose(peer_kl(jnp.asarray(s), jnp.asarray(t), 2.0),
                               4 * np.mean(p2 * (np.log(p2) - np.log(q2))), rtol=1e-5)
    g = jax.grad(lambda t_: peer_kl(jnp.asarray(s), t_))(jnp.asarray(t))
    np.testing.assert_array_equal(g, 0.0)  # the other peer is a detached target


@pytest.mark.parametrize("arg", ["digits", "digits,resnet8,resnet14,resnet8,mdp"])
def test_mutual_learning_runs(arg, tmp_path):
    c = dml.get_config(arg)
    c.data.image_size = 8
    c.data.train_limit = 128
    c.data.test_limit = 64
    c.progress = False
    c.mutual.epochs = 2
    c.mutual.optimizer.milestones = (1,)
    c.granularities = ((16, 2.0), (32, 8.0))
    summary = pipeline.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    peers = c.mutual.peers
    assert [r["model"] for r in summary["rows"]] == list(peers)
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "mutual", "metrics.jsonl"))]
    for i in range(len(peers)):
        assert np.isfinite(rows[-1][f"train/loss/peer{i}/mutual"]) and rows[-1][f"train/loss/peer{i}/mutual"] > 0
        assert 0 <= rows[-1][f"test/peer{i}/acc1"] <= 1
    assert not os.path.exists(os.path.join(tmp_path, "teacher"))


def test_mutual_config_errors():
    c = dml.get_config("digits,resnet8")
    with pytest.raises(ConfigError, match="at least 2 peers"):
        validate_config(c)
    c = dml.get_config("digits,resnet8,resnet9")
    with pytest.raises(ConfigError, match="unknown architecture 'resnet9'"):
        validate_config(c)
