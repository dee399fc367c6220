"""``rkd``: RKD.  Distances (x25) and angles (x50) between the pooled features of a batch, smooth-L1."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import l2n


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    d = jnp.abs(a - b)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


def _pdist(e: jax.Array) -> jax.Array:
    sq = jnp.sum(e * e, axis=1)
    d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, 1e-12))
    return d * (1.0 - jnp.eye(e.shape[0], dtype=e.dtype))


def _normalised_dist(e):
    d = _pdist(e)
    pos = d > 0
    return d / (jnp.sum(jnp.where(pos, d, 0.0)) / jnp.sum(pos))


def _angles(e):
    diff = e[None, :, :] - e[:, None, :]  # [anchor i, j, D] = e_j - e_i
    u = l2n(diff, axis=2)
    return jnp.einsum("ijd,ikd->ijk", u, u).reshape(-1)


def rkd(fs: jax.Array, ft: jax.Array, w_dist: float = 25.0, w_angle: float = 50.0) -> jax.Array:
    fs, ft = fs.reshape(fs.shape[0], -1), ft.reshape(ft.shape[0], -1)
    loss = 0.0
    if w_dist:
        loss = loss + w_dist * smooth_l1(_normalised_dist(fs), _normalised_dist(ft))
    if w_angle:
        loss = loss + w_angle * smooth_l1(_angles(fs), _angles(ft))
    return loss


@register
@dataclasses.dataclass(frozen=True)
class RKD(Method):
    name: str = "rkd"
    w_dist: float = 25.0
    w_angle: float = 50.0
    order = 8
    beta = 1.0  # RepDistiller's "-b 1" (no MG script: the scripts' CE 1 / KD 1)

    def loss(self, variables, s, t, batch, train):
        return rkd(s.features[-1], t.features[-1], self.w_dist, self.w_angle), {}
