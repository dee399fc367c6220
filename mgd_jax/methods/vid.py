"""``vid``: VID.  Per stage map, a 1x1-conv regressor predicts the teacher's map and a learnt per-channel
variance scores it (Gaussian likelihood)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import TorchConv, feature_maps, match_hw, per_layer_init

# softplus^-1(5 - 1e-5): the reference's initial variance 5 (after its + 1e-5), in float32
VID_LOG_SCALE_INIT = float(np.float32(np.log(np.exp(5.0 - 1e-5) - 1.0)))


def vid_layer(mu: jax.Array, t: jax.Array, log_scale: jax.Array) -> jax.Array:
    var = jax.nn.softplus(log_scale) + 1e-5
    return jnp.mean(0.5 * (jnp.square(mu - t) / var + jnp.log(var)))


class VIDRegressor(nn.Module):
    """1x1 convs s_C -> t_C -> t_C -> t_C (no bias) and a per-channel log_scale (trained with the student)."""

    t_channels: int
    log_scale_init: float

    @nn.compact
    def __call__(self, x):
        h = nn.relu(TorchConv(self.t_channels, (1, 1), use_bias=False, name="conv0")(x))
        h = nn.relu(TorchConv(self.t_channels, (1, 1), use_bias=False, name="conv1")(h))
        mu = TorchConv(self.t_channels, (1, 1), use_bias=False, name="conv2")(h)
        log_scale = self.param("log_scale", nn.initializers.constant(self.log_scale_init), (self.t_channels,))
        return mu, log_scale


@register
@dataclasses.dataclass(frozen=True)
class VID(Method):
    name: str = "vid"
    order = 6
    beta = 1.0  # RepDistiller's "-b 1"; the authors' MG script the same

    def init(self, key, s, t, ctx=None):
        pairs = [match_hw(a, b) for a, b in zip(feature_maps(s), feature_maps(t))]
        return {"params": per_layer_init(lambda i, a, b: VIDRegressor(b.shape[-1], VID_LOG_SCALE_INIT), key, pairs),
                "state": {}}

    def loss(self, variables, s, t, batch, train):
        total = 0.0
        for i, (a, b) in enumerate(zip(feature_maps(s), feature_maps(t))):
            a, b = match_hw(a, b)
            mu, log_scale = VIDRegressor(b.shape[-1], VID_LOG_SCALE_INIT).apply(
                {"params": variables["params"][f"layer{i}"]}, a)
            total = total + vid_layer(mu, b, log_scale)
        return total, {}
