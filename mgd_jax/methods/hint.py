"""``hint``: FitNet.  ConvReg(student feat[hint_layer]) regressed onto the teacher's feat[hint_layer] (MSE)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, MethodPairError, register
from mgd_jax.methods.common import ConvReg, can_regress


def hint_mse(regressed: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(regressed - target))


@register
@dataclasses.dataclass(frozen=True)
class Hint(Method):
    name: str = "hint"
    hint_layer: int = 2
    order = 2
    beta = 100.0  # RepDistiller's "-b 100"; the authors' MG script the same

    def _reg(self, t):
        return ConvReg(t.shape[-1], t.shape[1], t.shape[2])

    def check_pair(self, s_arch, t_arch, s, t):
        hs, ht = s.features[self.hint_layer].shape[1], t.features[self.hint_layer].shape[1]
        if not can_regress(hs, ht):
            raise MethodPairError(f"method 'hint' cannot pair {t_arch} -> {s_arch}: student map {hs}x{hs} "
                                  f"cannot be regressed to the teacher's {ht}x{ht}")

    def init(self, key, s, t, ctx=None):
        fs, ft = s.features[self.hint_layer], t.features[self.hint_layer]
        v = self._reg(ft).init(key, fs, False)
        return {"params": v["params"], "state": {"batch_stats": v["batch_stats"]}}

    def loss(self, variables, s, t, batch, train):
        fs, ft = s.features[self.hint_layer], t.features[self.hint_layer]
        out, upd = self._reg(ft).apply({"params": variables["params"], **variables["state"]}, fs, train,
                                       mutable=["batch_stats"])
        return hint_mse(out, ft), {"batch_stats": upd["batch_stats"]}
