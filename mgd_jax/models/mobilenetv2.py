"""MobileNetV2 (half width, ``mobile_half``) of the reference zoo (``mobilenetv2.py``, SPEC §6.2).

conv3x3(3->16, stride 2) -> BN -> ReLU; inverted residuals (t, c, n, s) with c x 0.5; conv1x1 -> 1280 -> BN ->
ReLU; global average pool; ``classifier``.  Features: stem, after groups 1, 2, 4, 6, pooled; ``preact`` ignored.
Init: conv N(0, sqrt(2 / (k*k*out))), BN 1/0, Linear N(0, 0.01), bias 0.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    out: int
    stride: int
    expand: int

    @nn.compact
    def __call__(self, x, train: bool):
        inp = x.shape[-1]
        hidden = inp * self.expand  # the 1x1 expansion exists even for expand = 1
        o = nn.relu(BatchNorm(name="conv_1")(conv(hidden, 1, padding=0, name="conv_0")(x), train))
        o = nn.relu(BatchNorm(name="conv_4")(conv(hidden, 3, self.stride, groups=hidden, name="conv_3")(o), train))
        o = BatchNorm(name="conv_7")(conv(self.out, 1, padding=0, name="conv_6")(o), train)
        return x + o if self.stride == 1 and inp == self.out else o


class MobileNetV2(nn.Module):
    num_classes: int = 100
    expand: int = 6
    width: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False, preact: bool = False):
        del preact  # the reference ignores it
        x = nn.relu(BatchNorm(name="conv1_1")(conv(int(32 * self.width), 3, 2, name="conv1_0")(x), train))
        feats = [x]
        for g, (t, c, n, s) in enumerate(SETTINGS):
            t = t if g == 0 else self.expand
            for i in range(n):
                x = InvertedResidual(int(c * self.width), s if i == 0 else 1, t, name=f"blocks_{g}_{i}")(x, train)
            if g in (1, 2, 4, 6):
                feats.append(x)
        x = nn.relu(BatchNorm(name="conv2_1")(conv(1280, 1, padding=0, name="conv2_0")(x), train))
        pooled = jnp.mean(x, axis=(1, 2))  # AvgPool2d(2, ceil_mode) on the 2x2 map
        feats.append(pooled)
        normal = nn.initializers.normal(0.01)
        logits = Linear(self.num_classes, kernel_init=normal, bias_init=nn.initializers.zeros, name="classifier")(pooled)
        return logits, feats


def builders():
    return {"MobileNetV2": lambda num_classes: MobileNetV2(num_classes)}
