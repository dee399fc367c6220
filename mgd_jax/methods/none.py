"""``none``: a student trained without a teacher (CE only, under every protocol)."""
from __future__ import annotations

import dataclasses

from mgd_jax.methods.base import Method, register


@register
@dataclasses.dataclass(frozen=True)
class NoDistillation(Method):
    name: str = "none"
    order = 0

    def loss_weights(self, protocol: str) -> dict[str, float]:
        super().loss_weights(protocol)  # checks the protocol's name
        return dict(ce=1.0, logit_kd=0.0, method=0.0)
