"""ShuffleNet v1 (groups 3) and v2 (net size 1) of the reference zoo (SPEC §6.2).  PyTorch default init."""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, channel_shuffle, conv, torch_conv_default


def _conv(*a, **k):
    return conv(*a, kernel_init=torch_conv_default, **k)


class ShuffleV1Block(nn.Module):
    out: int
    stride: int
    groups: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        inp = x.shape[-1]
        mid = self.out // 4
        g = 1 if inp == 24 else self.groups
        o = nn.relu(BatchNorm(name="bn1")(_conv(mid, 1, padding=0, groups=g, name="conv1")(x), train))
        o = channel_shuffle(o, g)
        o = nn.relu(BatchNorm(name="bn2")(_conv(mid, 3, self.stride, groups=mid, name="conv2")(o), train))
        o = BatchNorm(name="bn3")(_conv(self.out, 1, padding=0, groups=self.groups, name="conv3")(o), train)
        if self.stride == 2:
            res = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
            pre = jnp.concatenate([o, res], axis=-1)
        else:
            pre = o + x
        return nn.relu(pre), pre


class ShuffleV1(nn.Module):
    num_classes: int = 100
    out_planes: tuple = (240, 480, 960)
    blocks: tuple = (4, 8, 4)
    groups: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False, preact: bool = False):
        x = nn.relu(BatchNorm(name="bn1")(_conv(24, 1, padding=0, name="conv1")(x), train))
        feats = [x]
        for s, (planes, n) in enumerate(zip(self.out_planes, self.blocks)):
            for i in range(n):
                out = planes - x.shape[-1] if i == 0 else planes  # stride-2 blocks concatenate the shortcut
                x, pre = ShuffleV1Block(out, 2 if i == 0 else 1, self.groups, name=f"layer{s + 1}_{i}")(x, train)
            feats.append(pre if preact else x)
        pooled = jnp.mean(x, axis=(1, 2))
        feats.append(pooled)
        return Linear(self.num_classes, name="fc")(pooled), feats


class ShuffleV2Down(nn.Module):
    out: int

    @nn.compact
    def __call__(self, x, train: bool):
        inp, mid = x.shape[-1], self.out // 2
        left = BatchNorm(name="bn1")(_conv(inp, 3, 2, groups=inp, name="conv1")(x), train)
        left = nn.relu(BatchNorm(name="bn2")(_conv(mid, 1, padding=0, name="conv2")(left), train))
        right = nn.relu(BatchNorm(name="bn3")(_conv(mid, 1, padding=0, name="conv3")(x), train))
        right = BatchNorm(name="bn4")(_conv(mid, 3, 2, groups=mid, name="conv4")(right), train)
        right = nn.relu(BatchNorm(name="bn5")(_conv(mid, 1, padding=0, name="conv5")(right), train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleV2Basic(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1] // 2
        x1, x2 = x[..., :c], x[..., c:]
        o = nn.relu(BatchNorm(name="bn1")(_conv(c, 1, padding=0, name="conv1")(x2), train))
        o = BatchNorm(name="bn2")(_conv(c, 3, groups=c, name="conv2")(o), train)
        pre_branch = BatchNorm(name="bn3")(_conv(c, 1, padding=0, name="conv3")(o), train)
        out = channel_shuffle(jnp.concatenate([x1, nn.relu(pre_branch)], axis=-1), 2)
        pre = jnp.concatenate([x1, pre_branch], axis=-1)  # the reference's preact: no shuffle
        return out, pre


class ShuffleV2(nn.Module):
    num_classes: int = 100
    out_channels: tuple = (116, 232, 464, 1024)
    blocks: tuple = (3, 7, 3)

    @nn.compact
    def __call__(self, x, train: bool = False, preact: bool = False):
        x = nn.relu(BatchNorm(name="bn1")(_conv(24, 1, padding=0, name="conv1")(x), train))
        feats = [x]
        for s, (ch, n) in enumerate(zip(self.out_channels[:3], self.blocks)):
            x = ShuffleV2Down(ch, name=f"layer{s + 1}_0")(x, train)
            for i in range(n):
                x, pre = ShuffleV2Basic(name=f"layer{s + 1}_{i + 1}")(x, train)
            feats.append(pre if preact else x)
        x = nn.relu(BatchNorm(name="bn2")(_conv(self.out_channels[3], 1, padding=0, name="conv2")(x), train))
        pooled = jnp.mean(x, axis=(1, 2))
        feats.append(pooled)
        return Linear(self.num_classes, name="fc")(pooled), feats


def builders():
    return {"ShuffleV1": lambda num_classes: ShuffleV1(num_classes),
            "ShuffleV2": lambda num_classes: ShuffleV2(num_classes)}
