"""Wide ResNets of the reference zoo (``wrn.py``): wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (SPEC §6.2).

conv3x3(3->16) (no BN/ReLU); three NetworkBlocks of pre-activation BasicBlocks (16w, 32w, 64w; strides 1, 2, 2);
BN -> ReLU -> global average pool -> fc.  Features: raw stem output, the raw residual streams after each block,
the pooled vector.  preact: f1 <- block2's first bn1(f1), f2 <- block3's first bn1(f2), f3 <- final bn1(f3).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv, fusion_fence


class WideBasicBlock(nn.Module):
    out_planes: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        """-> (output, bn1(x)): the block's first BN of its input is the preact feature of the stream before it."""
        bn_x = BatchNorm(name="bn1")(x, train)
        act = nn.relu(bn_x)
        equal = x.shape[-1] == self.out_planes
        o = conv(self.out_planes, 3, self.stride, name="conv1")(act)
        o = nn.relu(BatchNorm(name="bn2")(o, train))
        o = conv(self.out_planes, 3, name="conv2")(o)
        shortcut = x if equal else conv(self.out_planes, 1, self.stride, 0, name="convShortcut")(act)
        return fusion_fence(shortcut + o, self.variables["params"]["bn2"]["scale"][0], train), bn_x


class NetworkBlock(nn.Module):
    n: int
    out_planes: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        first_bn = None
        for i in range(self.n):
            x, bn_x = WideBasicBlock(self.out_planes, self.stride if i == 0 else 1, name=f"layer_{i}")(x, train)
            first_bn = bn_x if i == 0 else first_bn
        return x, first_bn


class WideResNet(nn.Module):
    depth: int
    widen: int
    num_classes: int = 100

    @nn.compact
    def __call__(self, x, train: bool = False, preact: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        w = self.widen
        f0 = conv(16, 3, name="conv1")(x)
        f1, _ = NetworkBlock(n, 16 * w, 1, name="block1")(f0, train)
        f2, f1_bn = NetworkBlock(n, 32 * w, 2, name="block2")(f1, train)
        f3, f2_bn = NetworkBlock(n, 64 * w, 2, name="block3")(f2, train)
        f3_bn = BatchNorm(name="bn1")(f3, train)
        pooled = jnp.mean(nn.relu(f3_bn), axis=(1, 2))
        logits = Linear(self.num_classes, bias_init=nn.initializers.zeros, name="fc")(pooled)
        feats = [f0, f1_bn, f2_bn, f3_bn, pooled] if preact else [f0, f1, f2, f3, pooled]
        return logits, feats


def builders():
    cfgs = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
    return {k: (lambda num_classes, d=d, w=w: WideResNet(d, w, num_classes)) for k, (d, w) in cfgs.items()}
