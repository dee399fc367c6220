"""ResNet50 of the reference zoo (``resnetv2.py``): ImageNet Bottleneck ResNet adapted to 32x32 inputs (SPEC §6.2).

Stem conv3x3(3->64) -> BN -> ReLU (no max-pool); Bottleneck stages 64/128/256/512 x4, strides 1/2/2/2, blocks
[3, 4, 6, 3]; global average pool; ``linear``.  Features [stem, stage1..4, pooled]; preact: pre-ReLU sums.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv, fusion_fence


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(BatchNorm(name="bn1")(conv(self.planes, 1, padding=0, name="conv1")(x), train))
        out = nn.relu(BatchNorm(name="bn2")(conv(self.planes, 3, self.stride, name="conv2")(out), train))
        out = BatchNorm(name="bn3")(conv(4 * self.planes, 1, padding=0, name="conv3")(out), train)
        if self.stride != 1 or x.shape[-1] != 4 * self.planes:
            x = BatchNorm(name="shortcut_1")(conv(4 * self.planes, 1, self.stride, 0, name="shortcut_0")(x), train)
        pre = out + x
        return fusion_fence(nn.relu(pre), self.variables["params"]["bn3"]["scale"][0], train), pre


class ResNet50(nn.Module):
    num_classes: int = 100
    blocks: tuple = (3, 4, 6, 3)

    @nn.compact
    def __call__(self, x, train: bool = False, preact: bool = False):
        x = nn.relu(BatchNorm(name="bn1")(conv(64, 3, name="conv1")(x), train))
        feats = [x]
        for s, (planes, stride, n) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), self.blocks)):
            for i in range(n):
                x, pre = Bottleneck(planes, stride if i == 0 else 1, name=f"layer{s + 1}_{i}")(x, train)
            feats.append(pre if preact else x)
        pooled = jnp.mean(x, axis=(1, 2))
        feats.append(pooled)
        return Linear(self.num_classes, name="linear")(pooled), feats


def builders():
    return {"ResNet50": lambda num_classes: ResNet50(num_classes)}
