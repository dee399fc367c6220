"""``afd``: AFD (attention-based feature distillation, AberHu's zoo).  Per stage map, a teacher-driven channel
attention weighs the normalised map differences (equal map shapes only)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import TorchConv, feature_maps, require_equal_channels


def afd(fm_s: jax.Array, fm_t: jax.Array, rho: jax.Array, eps: float = 1e-6) -> jax.Array:
    """rho: [B, C] channel attention (sums to 1 over C)."""
    def n(f):
        return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=(1, 2), keepdims=True)) + eps)

    per_c = jnp.mean(jnp.square(n(fm_s) - n(fm_t)), axis=(1, 2))  # [B, C]
    return jnp.mean(jnp.sum(rho * per_c, axis=1))


class AFDAttention(nn.Module):
    """Channel attention: GAP -> 1x1 conv (C -> C*att_f) -> ReLU -> 1x1 conv -> sigmoid, normalised over C."""

    channels: int
    att_f: float = 1.0

    @nn.compact
    def __call__(self, fm_t):
        mid = int(self.channels * self.att_f)
        kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        g = jnp.mean(fm_t, axis=(1, 2), keepdims=True)
        g = nn.relu(TorchConv(mid, (1, 1), kernel_init=kaiming, bias_init=nn.initializers.zeros, name="conv0")(g))
        g = TorchConv(self.channels, (1, 1), kernel_init=kaiming, bias_init=nn.initializers.zeros, name="conv1")(g)
        rho = jax.nn.sigmoid(g.reshape(g.shape[0], -1))
        return rho / jnp.sum(rho, axis=1, keepdims=True)


@register
@dataclasses.dataclass(frozen=True)
class AFD(Method):
    name: str = "afd"
    att_f: float = 1.0
    order = 15
    # Not in RepDistiller: AberHu's zoo uses lambda = 500 on the *mean* of 3 layer losses; ours sums the layers.
    beta = 500.0 / 3.0

    def check_pair(self, s_arch, t_arch, s, t):
        require_equal_channels(self.name, s_arch, t_arch, feature_maps(s), feature_maps(t), spatial=True)

    def init(self, key, s, t, ctx=None):
        keys = jax.random.split(key, len(feature_maps(t)))
        return {"params": {f"layer{i}": AFDAttention(b.shape[-1], self.att_f).init(k, b)["params"]
                           for i, (b, k) in enumerate(zip(feature_maps(t), keys))}, "state": {}}

    def loss(self, variables, s, t, batch, train):
        total = 0.0
        for i, (a, b) in enumerate(zip(feature_maps(s), feature_maps(t))):
            rho = AFDAttention(b.shape[-1], self.att_f).apply({"params": variables["params"][f"layer{i}"]}, b)
            total = total + afd(a, b, rho)
        return total, {}
