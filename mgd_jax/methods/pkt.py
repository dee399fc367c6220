"""``pkt``: probabilistic knowledge transfer of the pooled features (cosine-similarity distributions, KL)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register


def pkt(fs: jax.Array, ft: jax.Array, eps: float = 1e-7) -> jax.Array:
    def probs(x):
        x = x / (jnp.linalg.norm(x, axis=1, keepdims=True) + eps)
        x = jnp.nan_to_num(x, nan=0.0)
        s = (x @ x.T + 1.0) / 2.0
        return s / jnp.sum(s, axis=1, keepdims=True)

    ps, pt = probs(fs.reshape(fs.shape[0], -1)), probs(ft.reshape(ft.shape[0], -1))
    return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


@register
@dataclasses.dataclass(frozen=True)
class PKT(Method):
    name: str = "pkt"
    order = 9
    beta = 30000.0  # RepDistiller's "-b 30000" (no MG script)

    def loss(self, variables, s, t, batch, train):
        return pkt(s.features[-1], t.features[-1]), {}
