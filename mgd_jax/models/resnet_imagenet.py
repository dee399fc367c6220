"""ImageNet ResNets: torchvision's ResNet-18 / 34 / 50 (``torchvision.models.resnet``), NHWC.

Structure (He et al. 2016 as torchvision builds it, "ResNet v1.5"): conv7x7(3->64, stride 2, pad 3) -> BN -> ReLU
-> max-pool 3x3 stride 2 pad 1; four stages of 64 / 128 / 256 / 512 planes (strides 1, 2, 2, 2) of BasicBlocks
([2, 2, 2, 2] for 18, [3, 4, 6, 3] for 34) or Bottlenecks ([3, 4, 6, 3] for 50, expansion 4, the stride on the
3x3 conv); a block's shortcut is conv1x1 + BN when the stride or the width changes; global average pool; ``fc``.
Parameter counts equal torchvision's: 11,689,512 / 21,797,672 / 25,557,032 with 1000 classes.

Module names are torchvision's state-dict names with a numeric token joined to the name before it
(``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``), so ``mgd_jax.import_torch`` maps a torchvision
``state_dict`` key by key and ``mgd_jax.export_torch`` writes one back.

Initialisation is torchvision's (``ResNet.__init__``, ``zero_init_residual=False``): convs kaiming-normal,
fan_out, ReLU gain; BN weight 1, bias 0; ``fc`` PyTorch's Linear default.

Feature list (the zoo's convention, as mdistiller's ImageNet ResNet orders it): [stem (after the stem's ReLU,
before the max-pool: 64 x H/2), stage 1..4 outputs, pooled (512, or 2048 for ResNet-50)]; with ``preact=True``
a stage's entry is its last block's residual sum before the final ReLU (the stem and the pooled vector are the
same either way).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock``: conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(BatchNorm(name="bn1")(conv(self.planes, 3, self.stride, name="conv1")(x), train))
        out = BatchNorm(name="bn2")(conv(self.planes, 3, name="conv2")(out), train)
        shortcut = _shortcut(x, self.planes, self.stride, train)
        pre = out + shortcut
        return nn.relu(pre), pre


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck``: conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv1x1 (x4) -> BN,
    + shortcut, ReLU."""

    planes: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(BatchNorm(name="bn1")(conv(self.planes, 1, padding=0, name="conv1")(x), train))
        out = nn.relu(BatchNorm(name="bn2")(conv(self.planes, 3, self.stride, name="conv2")(out), train))
        out = BatchNorm(name="bn3")(conv(4 * self.planes, 1, padding=0, name="conv3")(out), train)
        pre = out + _shortcut(x, 4 * self.planes, self.stride, train)
        return nn.relu(pre), pre


def _shortcut(x, out_channels: int, stride: int, train: bool):
    """The identity, or torchvision's ``downsample`` (conv1x1 with the block's stride -> BN) where the shape
    changes.  Called inside a block's compact ``__call__``: the layers belong to the block."""
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    x = conv(out_channels, 1, stride, padding=0, name="downsample_0")(x)
    return BatchNorm(name="downsample_1")(x, train)


class ImageNetResNet(nn.Module):
    block: type  # BasicBlock or Bottleneck
    layers: Sequence[int]
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        x = nn.relu(BatchNorm(name="bn1")(conv(64, 7, 2, name="conv1")(x), train))
        feats = [x]
        # torchvision's MaxPool2d(3, 2, 1): the padding is -inf, never a maximum
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), self.layers)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                x, pre = self.block(planes, stride, name=f"layer{stage + 1}_{i}")(x, train)
            feats.append(pre if preact else x)
        pooled = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
        feats.append(pooled)
        return Linear(self.num_classes, name="fc")(pooled), feats


# name -> (block, blocks per stage): torchvision.models.resnet18 / resnet34 / resnet50
_RESNETS = {
    "resnet18_imagenet": (BasicBlock, (2, 2, 2, 2)),
    "resnet34_imagenet": (BasicBlock, (3, 4, 6, 3)),
    "resnet50_imagenet": (Bottleneck, (3, 4, 6, 3)),
}
# our name -> torchvision's builder name (torchvision.models.<name>(num_classes=...) has the same state_dict keys)
TORCHVISION_NAMES = {name: name.removesuffix("_imagenet") for name in _RESNETS}


def builders():
    return {name: (lambda num_classes, b=b, n=n: ImageNetResNet(b, n, num_classes)) for name, (b, n) in _RESNETS.items()}
