"""``dist``: DIST, knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

With y = softmax(z / tau): the inter-class relation is 1 - the mean over samples of the Pearson correlation
between a student row and the teacher's row; the intra-class relation the same over columns (each class across the
batch); loss = tau^2 (beta inter + gamma intra).  Pearson's correlation is the authors' (hunto's ``dist_kd.py``):
the cosine of the centred vectors, ``<a, b> / (||a|| ||b|| + 1e-8)``.  The intra-class term correlates over the
whole (global) batch of a step, on any number of devices.

A logit method: it replaces the objective's logit-KD term (their CIFAR recipe: CE 1 + 2 DIST, under every
protocol) and its teacher logits are the stable-excitation target in mode ``mas``.  Not a KL divergence:
``logit_standardization`` leaves it alone.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.losses import _up
from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import safe_norm

PEARSON_EPS = 1e-8


def pearson_rows(a: jax.Array, b: jax.Array, eps: float = PEARSON_EPS) -> jax.Array:
    """Pearson correlation of each row of a with the same row of b: [N, M] x [N, M] -> [N]."""
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    return jnp.sum(a * b, axis=1) / (safe_norm(a, axis=1) * safe_norm(b, axis=1) + eps)


def dist_loss(student_logits: jax.Array, teacher_logits: jax.Array, beta: float, gamma: float,
              tau: float) -> jax.Array:
    """``tau^2 (beta inter + gamma intra)`` of [B, K] logits (at least float32; the teacher side a constant)."""
    t = float(tau)
    ys = jax.nn.softmax(_up(student_logits) / t, axis=-1)
    yt = jax.nn.softmax(_up(teacher_logits) / t, axis=-1)
    inter = 1.0 - jnp.mean(pearson_rows(ys, yt))
    intra = 1.0 - jnp.mean(pearson_rows(ys.T, yt.T))
    return t * t * (beta * inter + gamma * intra)


@register
@dataclasses.dataclass(frozen=True)
class DIST(Method):
    name: str = "dist"
    inter_weight: float = 1.0  # the paper's beta
    intra_weight: float = 1.0  # the paper's gamma
    tau: float = 4.0
    order = 17
    beta = 2.0  # the authors' CIFAR-100 recipe: CE 1 + 2 DIST (beta = gamma = 1, tau = 4)
    config_options = ("inter_weight", "intra_weight", "tau")
    logit_method = True

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"dist: tau must be > 0, got {self.tau}")
        if not (self.inter_weight >= 0 and self.intra_weight >= 0):
            raise ValueError(f"dist: inter_weight and intra_weight must be >= 0, got {self.inter_weight} and "
                             f"{self.intra_weight}")

    def loss_weights(self, protocol: str) -> dict[str, float]:
        super().loss_weights(protocol)  # checks the protocol's name
        return dict(ce=1.0, logit_kd=0.0, method=self.beta)  # DIST replaces the logit-KD term under every protocol

    def loss(self, variables, s, t, batch, train):
        return dist_loss(s.logits, t.logits, self.inter_weight, self.intra_weight, self.tau), variables.get("state", {})
