"""Model zoo: ``get_model(name, num_classes)`` -> a linen module.

``module.apply(variables, x_nhwc, train=..., preact=...)`` returns ``(logits, features)`` where ``features`` is
the reference's ``is_feat`` list (last entry: the globally pooled penultimate vector).

Two families of input: the CIFAR zoo of the reference (32x32 images, 100 classes in its experiments) and the
ImageNet models of the large-scale benchmark (``IMAGENET_ARCHITECTURES``: torchvision's ResNet-18 / 34 / 50 and
the benchmark's MobileNet(V1); 224x224 images, 1000 classes), each named with an ``_imagenet`` suffix so that
none can be taken for a CIFAR model (``ResNet50`` is the reference's CIFAR-stem ResNet-50).
"""
from __future__ import annotations

from flax import linen as nn

from mgd_jax.models import mobilenetv1, mobilenetv2, resnet, resnet_imagenet, resnetv2, shufflenet, vgg, wrn

_REGISTRY = {}
for _family in (resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenet, resnet_imagenet, mobilenetv1):
    _REGISTRY.update(_family.builders())

ARCHITECTURES = tuple(_REGISTRY)
IMAGENET_ARCHITECTURES = tuple(resnet_imagenet.builders()) + tuple(mobilenetv1.builders())
# The class count an architecture's reference checkpoints have: ImageNet-1k's 1000, CIFAR-100's 100.
IMAGENET_CLASSES, CIFAR_CLASSES = 1000, 100

# Architectures the reference trains with a lower learning rate (0.01 instead of 0.05 as students; its DML and
# transfer scripts likewise): the MobileNet / ShuffleNet family.
LOW_LR_ARCHITECTURES = ("MobileNetV2", "ShuffleV1", "ShuffleV2")

# Top-level modules (parameter names) that RepDistiller's ``get_feat_modules()`` leaves out of the student's
# "feature modules": the classifier, and for WRN the final BN, for MobileNetV2 the last 1x1 conv + BN, for
# ShuffleV2 the last 1x1 conv + BN.  The AB / FSP init stage trains the other modules only and runs these
# frozen, in eval mode (SPEC_BASELINES §3; mgd_jax/stages/student.py).
NON_FEATURE_MODULES = {
    resnet.CifarResNet: ("fc",),
    resnetv2.ResNet50: ("linear",),
    wrn.WideResNet: ("bn1", "fc"),
    vgg.VGG: ("classifier",),
    mobilenetv2.MobileNetV2: ("conv2_0", "conv2_1", "classifier"),
    shufflenet.ShuffleV1: ("fc",),
    shufflenet.ShuffleV2: ("conv2", "bn2", "fc"),
    resnet_imagenet.ImageNetResNet: ("fc",),
    mobilenetv1.MobileNetV1: ("fc",),
}
CLASSIFIER_NAMES = ("fc", "linear", "classifier")  # the last entry of each NON_FEATURE_MODULES row


def classifier_name(params) -> str:
    """The top-level parameter name of a zoo backbone's classifier (``fc``, ``linear`` or ``classifier``)."""
    for name in CLASSIFIER_NAMES:
        if name in params:
            return name
    raise ValueError(f"no classifier among the parameters {sorted(params)}; known names: {', '.join(CLASSIFIER_NAMES)}")


def get_model(name: str, num_classes: int) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _REGISTRY[name](int(num_classes))


def reference_num_classes(name: str) -> int:
    """The class count of ``name``'s reference checkpoints: 1000 for an ImageNet model, else 100 (CIFAR-100)."""
    return IMAGENET_CLASSES if name in IMAGENET_ARCHITECTURES else CIFAR_CLASSES


def non_feature_modules(model) -> tuple[str, ...]:
    """The top-level parameter names of ``model`` (a zoo module, or one wrapped by ``precision``) that are not
    feature modules: see ``NON_FEATURE_MODULES``."""
    module = getattr(model, "module", model)  # precision.MixedPrecision wraps the flax module
    for cls, names in NON_FEATURE_MODULES.items():
        if isinstance(module, cls):
            return names
    raise ValueError(f"no feature-module split known for {type(module).__name__}")
