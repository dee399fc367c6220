"""MobileNet (V1, Howard et al. 2017) as the ImageNet distillation benchmark uses it (the ResNet-50 -> MobileNet
pair of CRD's and mdistiller's ImageNet tables; mdistiller ``models/imagenet/mobilenetv1.py``), NHWC.

The reference is one ``nn.Sequential`` called ``model``, then ``fc``:
  model.0       conv_bn(3 -> 32, stride 2):   conv3x3 (no bias) -> BN -> ReLU
  model.1 .. 13 conv_dw(in -> out, stride):   depthwise conv3x3 (stride) -> BN -> ReLU -> conv1x1 -> BN -> ReLU
                with (out, stride) = (64, 1) (128, 2) (128, 1) (256, 2) (256, 1) (512, 2) (512, 1) x5 (1024, 2)
                (1024, 1)
  model.14      AvgPool2d(7)                  (global on the 7x7 map of a 224 input)
  fc            Linear(1024 -> 1000)
4,231,976 parameters with 1000 classes.  Our parameter names are the reference's state-dict names with each
numeric token joined to the name before it, at the top level: ``model.1.3.weight`` (block 1's pointwise conv) ->
``model_1_3/kernel``, ``model.1.4.running_var`` -> ``model_1_4`` (a BatchNorm) ``var``; ``fc``.  That is also the
key naming of the state_dict ``mgd_jax.export_torch`` writes for it (the model is not in torchvision).

Pooling: a global mean, which is the reference's AvgPool2d(7) whenever the last map is 7x7 (inputs 193..224);
on smaller inputs the reference fails (a map smaller than its window), ours still pools globally.

Initialisation: the reference sets none, so PyTorch's defaults: convs U(-1/sqrt(fan_in), +) (kaiming-uniform
a=sqrt(5); fan_in = 9 for a depthwise conv), BN weight 1 bias 0, Linear default.

Feature list (the zoo's convention; mdistiller's four stage features are entries 1..4): [stem (model.0's output,
32 x H/2), the outputs of model.3 (128 x H/4), model.5 (256 x H/8), model.11 (512 x H/16), model.13 (1024 x H/32),
pooled (1024)]; with ``preact=True`` the four stage entries are taken before their last ReLU (after the pointwise
BN), as mdistiller's ``preact_feats``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear, conv, torch_conv_default

# (out channels, stride) of the depthwise-separable blocks model.1 .. model.13
DW_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
             (512, 1), (1024, 2), (1024, 1))
FEATURE_BLOCKS = (3, 5, 11, 13)  # the blocks whose outputs are the stage features (mdistiller's feat1 .. feat4)


class MobileNetV1(nn.Module):
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        def conv_bn_relu(h, features, kernel, stride, groups, index, conv_pos):
            """``model.<index>.<conv_pos>`` conv -> ``model.<index>.<conv_pos + 1>`` BN; returns (pre, relu)."""
            pad = kernel // 2
            h = conv(features, kernel, stride, pad, groups=groups, kernel_init=torch_conv_default,
                     name=f"model_{index}_{conv_pos}")(h)
            h = BatchNorm(name=f"model_{index}_{conv_pos + 1}")(h, train)
            return h, nn.relu(h)

        _, x = conv_bn_relu(x, 32, 3, 2, 1, 0, 0)
        feats = [x]
        for index, (out, stride) in enumerate(DW_BLOCKS, start=1):
            _, x = conv_bn_relu(x, x.shape[-1], 3, stride, x.shape[-1], index, 0)  # depthwise
            pre, x = conv_bn_relu(x, out, 1, 1, 1, index, 3)  # pointwise
            if index in FEATURE_BLOCKS:
                feats.append(pre if preact else x)
        pooled = jnp.mean(x, axis=(1, 2))
        feats.append(pooled)
        return Linear(self.num_classes, name="fc")(pooled), feats


def builders():
    return {"mobilenetv1_imagenet": lambda num_classes: MobileNetV1(num_classes)}
