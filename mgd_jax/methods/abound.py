"""``abound``: AB (activation boundaries).  The init stage trains connectors and the student's feature layers on
the preact stage maps; the main stage has no L_method term (logits only)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, MethodPairError, register
from mgd_jax.methods.common import ConvReg, can_regress, feature_maps


def ab(gs, gt, margin: float = 1.0) -> list[jax.Array]:
    n = len(gs)
    out = []
    for i, (s, t) in enumerate(zip(gs, gt)):
        loss = jnp.sum(jnp.square(s + margin) * ((s > -margin) & (t <= 0)) +
                       jnp.square(s - margin) * ((s <= margin) & (t > 0)))
        out.append(loss * 2.0 ** (i - n + 1) / s.shape[0] * 3 / 1000)
    return out


@register
@dataclasses.dataclass(frozen=True)
class AB(Method):
    name: str = "abound"
    init_params_key: str = "connector"
    teacher_preact: bool = True
    init_student_preact: bool = True
    init_trains_student: bool = True
    order = 13
    beta = 1.0  # RepDistiller's "-b 1"; moot: no main-stage term (AB acts through its init stage)

    def _connector(self, a, b):
        """ConvReg without ReLU onto the teacher's map, or None where the shapes already match."""
        if a.shape[-1] == b.shape[-1] and a.shape[1] == b.shape[1]:
            return None
        return ConvReg(b.shape[-1], b.shape[1], b.shape[2], use_relu=False)

    def _init_connectors(self, key, s, t):
        params, stats = {}, {}
        for i, (a, b) in enumerate(zip(feature_maps(s), feature_maps(t))):
            c = self._connector(a, b)
            if c is not None:
                v = c.init(jax.random.fold_in(key, i), a, False)
                params[f"layer{i}"], stats[f"layer{i}"] = v["params"], v["batch_stats"]
        return params, stats

    def check_pair(self, s_arch, t_arch, s, t):
        for a, b in zip(feature_maps(s), feature_maps(t)):
            hs, ht = a.shape[1], b.shape[1]
            if not can_regress(hs, ht):
                raise MethodPairError(f"method 'abound' cannot pair {t_arch} -> {s_arch}: a {hs}x{hs} student map "
                                      f"cannot be connected to a {ht}x{ht} teacher map")

    def init(self, key, s, t, ctx=None):
        params, stats = self._init_connectors(key, s, t)
        # connectors are trained in the init stage only: in the main stage they are frozen state
        return {"params": {}, "state": {"connector": params, "batch_stats": stats}}

    def init_stage_params(self, key, s, t, ctx=None):
        return self._init_connectors(key, s, t)[0]

    def init_loss(self, variables, s, t, train):
        outs, new_stats = [], {}
        for i, (a, b) in enumerate(zip(feature_maps(s), feature_maps(t))):
            c = self._connector(a, b)
            if c is None:
                outs.append(a)
                continue
            o, upd = c.apply({"params": variables["params"][f"layer{i}"],
                              "batch_stats": variables["state"]["batch_stats"][f"layer{i}"]}, a, train,
                             mutable=["batch_stats"])
            outs.append(o)
            new_stats[f"layer{i}"] = upd["batch_stats"]
        return sum(ab(outs, feature_maps(t))), {**variables["state"], "batch_stats": new_stats}
