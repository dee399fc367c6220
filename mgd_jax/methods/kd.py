"""``kd``: Hinton KD.  It has no L_method term: it lives in the student objective's logit-KD term (T = 4)."""
from __future__ import annotations

import dataclasses

from mgd_jax.methods.base import Method, register


@register
@dataclasses.dataclass(frozen=True)
class KD(Method):
    name: str = "kd"
    order = 1

    def loss_weights(self, protocol: str) -> dict[str, float]:
        super().loss_weights(protocol)  # checks the protocol's name
        if protocol == "mg":
            return dict(ce=0.2, logit_kd=0.8, method=1.0)  # the authors' cifar100_kd.sh: CE 0.2, KD 0.8
        return dict(ce=0.1, logit_kd=0.9, method=0.0)  # RepDistiller's KD: "-r 0.1 -a 0.9 -b 0"
