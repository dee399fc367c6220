"""``fsp``: FSP.  The init stage trains the student's feature layers on the FSP matrices of consecutive maps
(feat[:-1], equal channel counts only); the main stage has no L_method term (logits only)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import match_hw, require_equal_channels


def fsp_matrix(bot: jax.Array, top: jax.Array) -> jax.Array:
    bot, top = match_hw(bot, top)
    hw = bot.shape[1] * bot.shape[2]
    return jnp.einsum("bhwj,bhwi->bji", top, bot) / hw


def fsp(gs, gt) -> list[jax.Array]:
    out = []
    for i in range(len(gs) - 1):
        out.append(jnp.mean(jnp.square(fsp_matrix(gs[i], gs[i + 1]) - fsp_matrix(gt[i], gt[i + 1]))))
    return out


@register
@dataclasses.dataclass(frozen=True)
class FSP(Method):
    name: str = "fsp"
    init_trains_student: bool = True
    order = 12
    beta = 50.0  # RepDistiller's "-b 50"; moot: no main-stage term (FSP acts through its init stage)

    def check_pair(self, s_arch, t_arch, s, t):
        require_equal_channels(self.name, s_arch, t_arch, s.features[:-1], t.features[:-1])

    def init_loss(self, variables, s, t, train):
        return sum(fsp(s.features[:-1], t.features[:-1])), variables["state"]
