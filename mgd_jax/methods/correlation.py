"""``correlation``: CC (the authors' variant).  Both pooled features through trainable Linear(d -> 128)
embeddings; the loss correlates consecutive samples' embedding differences."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.models.layers import Linear


def correlation(es: jax.Array, et: jax.Array) -> jax.Array:
    d = jnp.abs(es - et)
    return jnp.sum(d[:-1] * d[1:]) / (es.shape[0] - 1)


@register
@dataclasses.dataclass(frozen=True)
class Correlation(Method):
    name: str = "correlation"
    feat_dim: int = 128
    order = 5
    beta = 0.02  # RepDistiller's "-b 0.02" (no MG script)

    def init(self, key, s, t, ctx=None):
        k1, k2 = jax.random.split(key)
        lin = Linear(self.feat_dim)
        return {"params": {"embed_s": lin.init(k1, s.features[-1])["params"],
                           "embed_t": lin.init(k2, t.features[-1])["params"]}, "state": {}}

    def loss(self, variables, s, t, batch, train):
        lin = Linear(self.feat_dim)
        p = variables["params"]
        return correlation(lin.apply({"params": p["embed_s"]}, s.features[-1]),
                           lin.apply({"params": p["embed_t"]}, t.features[-1])), {}
