"""``nst``: NST.  Polynomial-kernel MMD between the channels' spatial distributions of the stage maps."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import feature_maps, l2n, match_hw


def nst_layer(s: jax.Array, t: jax.Array) -> jax.Array:
    s, t = match_hw(s, t)

    def chans(f):  # [B, C, HW], each channel's spatial vector normalised
        return l2n(f.reshape(f.shape[0], -1, f.shape[-1]).transpose(0, 2, 1), axis=2)

    s, t = chans(s), chans(t)

    def k(a, b):
        return jnp.square(jnp.einsum("bik,bjk->bij", a, b))

    return jnp.mean(k(t, t)) + jnp.mean(k(s, s)) - 2 * jnp.mean(k(s, t))


def nst(gs, gt) -> list[jax.Array]:
    return [nst_layer(s, t) for s, t in zip(gs, gt)]


@register
@dataclasses.dataclass(frozen=True)
class NST(Method):
    name: str = "nst"
    order = 10
    beta = 50.0  # RepDistiller's "-b 50" (no MG script)

    def loss(self, variables, s, t, batch, train):
        return sum(nst(feature_maps(s), feature_maps(t))), {}
