"""``attention``: AT.  Squared differences of l2-normalised attention maps of the stage outputs, summed."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import attention_map, feature_maps, match_hw


def attention_layer(s: jax.Array, t: jax.Array) -> jax.Array:
    s, t = match_hw(s, t)
    return jnp.mean(jnp.square(attention_map(s) - attention_map(t)))


def attention(gs: Sequence[jax.Array], gt: Sequence[jax.Array]) -> list[jax.Array]:
    return [attention_layer(s, t) for s, t in zip(gs, gt)]


@register
@dataclasses.dataclass(frozen=True)
class Attention(Method):
    name: str = "attention"
    order = 3
    beta = 1000.0  # RepDistiller's "-b 1000"; the authors' MG script the same

    def loss(self, variables, s, t, batch, train):
        return sum(attention(feature_maps(s), feature_maps(t))), variables.get("state", {})
