"""``similarity``: SP.  Batch similarity matrices of the last conv maps."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import l2n


def similarity(fs: jax.Array, ft: jax.Array) -> jax.Array:
    b = fs.shape[0]
    gs = l2n(fs.reshape(b, -1) @ fs.reshape(b, -1).T, axis=1)
    gt = l2n(ft.reshape(b, -1) @ ft.reshape(b, -1).T, axis=1)
    return jnp.sum(jnp.square(gt - gs)) / (b * b)


@register
@dataclasses.dataclass(frozen=True)
class Similarity(Method):
    name: str = "similarity"
    order = 4
    beta = 3000.0  # RepDistiller's "-b 3000"; the authors' MG script the same

    def loss(self, variables, s, t, batch, train):
        return similarity(s.features[-2], t.features[-2]), variables.get("state", {})
