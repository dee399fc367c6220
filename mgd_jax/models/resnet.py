"""CIFAR ResNets of the reference zoo (resnet8 ... resnet110, resnet8x4, resnet32x4, the x05 / x0375 variants).

SPEC §6.2: stem conv3x3 -> BN -> ReLU; three stages of BasicBlocks (strides 1, 2, 2); global average pool; fc.
Feature list: [stem, stage1, stage2, stage3, pooled]; with ``preact=True`` the stage outputs are the last
block's sum *before* its ReLU.  Layout NHWC.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv, fusion_fence


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out = conv(self.planes, 3, self.stride, name="conv1")(x)
        out = nn.relu(BatchNorm(name="bn1")(out, train))
        out = conv(self.planes, 3, name="conv2")(out)
        out = BatchNorm(name="bn2")(out, train)
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = conv(self.planes, 1, self.stride, padding=0, name="downsample_0")(x)
            x = BatchNorm(name="downsample_1")(x, train)
        preact = out + x
        return fusion_fence(nn.relu(preact), self.variables["params"]["bn2"]["scale"][0], train), preact


class CifarResNet(nn.Module):
    depth: int
    filters: Sequence[int]
    num_classes: int = 100

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        n = (self.depth - 2) // 6
        x = conv(self.filters[0], 3, name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        feats = [x]
        for stage, (planes, stride) in enumerate(zip(self.filters[1:], (1, 2, 2))):
            for i in range(n):
                x, pre = BasicBlock(planes, stride if i == 0 else 1, name=f"layer{stage + 1}_{i}")(x, train)
            feats.append(pre if preact else x)
        pooled = jnp.mean(x, axis=(1, 2))  # AvgPool2d(8) on the 8x8 map of a 32x32 input
        feats.append(pooled)
        logits = Linear(self.num_classes, name="fc")(pooled)
        return logits, feats


_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
    "resnet14x05": (14, (8, 8, 16, 32)),
    "resnet20x05": (20, (8, 8, 16, 32)),
    "resnet20x0375": (20, (6, 6, 12, 24)),
}


def builders():
    return {name: (lambda num_classes, d=d, f=f: CifarResNet(d, f, num_classes)) for name, (d, f) in _RESNETS.items()}
