"""VGG with BatchNorm of the reference zoo (``vgg.py``): vgg8 (cfg S), vgg11 (A), vgg13 (B), vgg16 (D), vgg19 (E).

Five blocks of [conv3x3 (with bias) -> BN -> ReLU], the last ReLU of each block applied in forward; max-pool
between blocks 0-3 (none before block 4 at 32x32); global average pool; ``classifier``.  Features: the five
block outputs after ReLU and the pooled vector; preact gives blocks 1-4 before their ReLU.
Init: conv N(0, sqrt(2 / (k*k*out))), conv bias 0, BN 1/0, Linear N(0, 0.01), bias 0.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv

CFGS = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG(nn.Module):
    cfg: str
    num_classes: int = 100

    @nn.compact
    def __call__(self, x, train: bool = False, preact: bool = False):
        height = x.shape[1]
        feats, pre_feats = [], []
        for b, widths in enumerate(CFGS[self.cfg]):
            if b in (1, 2, 3):
                x = _max_pool(x)
            elif b == 4 and height == 64:
                x = _max_pool(x)
            for j, c in enumerate(widths):  # torch nn.Sequential indices: conv 3j, BN 3j+1, ReLU 3j+2
                if j:
                    x = nn.relu(x)
                x = conv(c, 3, use_bias=True, name=f"block{b}_{3 * j}")(x)
                x = BatchNorm(name=f"block{b}_{3 * j + 1}")(x, train)
            pre_feats.append(x)
            x = nn.relu(x)
            feats.append(x)
        pooled = jnp.mean(x, axis=(1, 2))
        normal = nn.initializers.normal(0.01)
        logits = Linear(self.num_classes, kernel_init=normal, bias_init=nn.initializers.zeros, name="classifier")(pooled)
        out = [feats[0]] + (pre_feats[1:] if preact else feats[1:]) + [pooled]
        return logits, out


def builders():
    names = {"vgg8": "S", "vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
    return {k: (lambda num_classes, c=c: VGG(c, num_classes)) for k, c in names.items()}
