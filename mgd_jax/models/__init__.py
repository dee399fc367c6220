"""Model zoo: ``get_model(name, num_classes)`` -> a linen module.

``module.apply(variables, x_nhwc, train=..., preact=...)`` returns ``(logits, features)`` where ``features`` is
the reference's ``is_feat`` list (last entry: the globally pooled penultimate vector).
"""
from __future__ import annotations

from flax import linen as nn

from mgd_jax.models import mobilenetv2, resnet, resnetv2, shufflenet, vgg, wrn

_REGISTRY = {}
for _family in (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenet):
    _REGISTRY.update(_family.builders())

ARCHITECTURES = tuple(_REGISTRY)


def get_model(name: str, num_classes: int) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _REGISTRY[name](int(num_classes))
