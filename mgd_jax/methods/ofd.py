"""``ofd``: overhaul of feature distillation (Heo et al., ICCV 2019), as mdistiller's CIFAR setup runs it.

Pre-ReLU stage maps of both networks; each student map goes through a connector (1x1 conv + BN, He-normal init)
onto the teacher's channels; the teacher's map is average-pooled to the student's size.  The teacher's responses
below a per-channel margin m count as m, with m = E[x | x < 0] of the Gaussian N(beta, gamma^2) that the
BatchNorm before the stage's ReLU gives (gamma its scale, beta its bias; -3 |gamma| where P(x < 0) <= 0.001).  Partial
L2 (mdistiller ``feat_loss``): (s - m)^2 where s > m >= t, (s - t)^2 where s > t > m and t <= 0, (s - t)^2 where
t > 0; summed over channels and positions, averaged over the batch; the stage at depth i from the last weighed
2^-i.  Loss weight 1e-3, CE 1 (mdistiller's CIFAR config, OFD.LOSS.FEAT_WEIGHT / CE_WEIGHT).

With different stage counts the last ones pair up (mdistiller's ``_align_list``), each with its own teacher
stage's margin.  The margin needs the teacher's BatchNorm before each stage's ReLU (``bn_before_relu``): known for
the CIFAR ResNets, ResNet50, WRNs, VGGs, ShuffleV1 and the ImageNet ResNets / MobileNet; a ShuffleV2 or
MobileNetV2 teacher is refused (``MethodPairError``).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.losses import _up
from mgd_jax.methods.base import Method, MethodPairError, register
from mgd_jax.methods.common import TorchConv, adaptive_avg_pool, feature_maps
from mgd_jax.models import get_model, mobilenetv1, resnet, resnet_imagenet, resnetv2, shufflenet, vgg, wrn
from mgd_jax.models.layers import BatchNorm


def _last_block(params: dict, prefix: str) -> dict:
    """The parameters of the last block ``<prefix>_<i>`` (largest i)."""
    return params[max((k for k in params if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit()),
                      key=lambda k: int(k[len(prefix) + 1:]))]


def _bn_paths(module, params: dict) -> list[dict] | None:
    """The BatchNorm parameters ({'scale', 'bias'}) before the ReLU of each stage map, or None for a family not in
    ``MARGIN_FAMILIES`` (mdistiller's ``get_bn_before_relu``)."""
    if isinstance(module, resnet.CifarResNet):
        return [_last_block(params, f"layer{s}")["bn2"] for s in (1, 2, 3)]
    if isinstance(module, resnetv2.ResNet50):
        return [_last_block(params, f"layer{s}")["bn3"] for s in (1, 2, 3, 4)]
    if isinstance(module, resnet_imagenet.ImageNetResNet):
        blocks = [_last_block(params, f"layer{s}") for s in (1, 2, 3, 4)]
        return [b["bn3"] if "bn3" in b else b["bn2"] for b in blocks]
    if isinstance(module, wrn.WideResNet):
        return [params["block2"]["layer_0"]["bn1"], params["block3"]["layer_0"]["bn1"], params["bn1"]]
    if isinstance(module, vgg.VGG):
        return [params[f"block{b}_{3 * (len(vgg.CFGS[module.cfg][b]) - 1) + 1}"] for b in (1, 2, 3, 4)]
    if isinstance(module, shufflenet.ShuffleV1):
        return [_last_block(params, f"layer{s}")["bn3"] for s in (1, 2, 3)]
    if isinstance(module, mobilenetv1.MobileNetV1):
        return [params[f"model_{i}_4"] for i in mobilenetv1.FEATURE_BLOCKS]
    return None


# The families whose BatchNorm before each stage ReLU ``_bn_paths`` knows.
MARGIN_FAMILIES = (resnet.CifarResNet, resnetv2.ResNet50, resnet_imagenet.ImageNetResNet, wrn.WideResNet, vgg.VGG,
                   shufflenet.ShuffleV1, mobilenetv1.MobileNetV1)


def bn_margin(scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Per channel: E[x | x < 0] for x ~ N(bias, scale^2), or -3 |scale| where P(x < 0) <= 0.001 (OFD's margin)."""
    s, m = jnp.abs(_up(scale)), _up(bias)
    safe = jnp.where(s > 0, s, 1.0)
    cdf = jax.scipy.stats.norm.cdf(-m / safe)
    ok = (s > 0) & (cdf > 0.001)
    expect = -s * jnp.exp(-jnp.square(m / safe) / 2) / math.sqrt(2 * math.pi) / jnp.where(ok, cdf, 1.0) + m
    return jnp.where(ok, expect, -3.0 * s)


def teacher_margins(model, variables) -> list[jax.Array]:
    """The margin of each stage map of a zoo teacher (``model`` possibly wrapped by ``precision``)."""
    module = getattr(model, "module", model)
    bns = _bn_paths(module, variables["params"])
    if bns is None:
        raise ValueError(f"OFD knows no BatchNorm before the stage ReLUs of {type(module).__name__}")
    return [bn_margin(b["scale"], b["bias"]) for b in bns]


def ofd_partial_l2(source: jax.Array, target: jax.Array, margin: jax.Array) -> jax.Array:
    """mdistiller's ``feat_loss`` of NHWC maps (margin [C]): summed over C, H, W, mean over the batch."""
    loss = (jnp.square(source - margin) * ((source > margin) & (target <= margin))
            + jnp.square(source - target) * ((source > target) & (target > margin) & (target <= 0))
            + jnp.square(source - target) * (target > 0))
    return jnp.sum(jnp.abs(loss)) / source.shape[0]


class Connector(nn.Module):
    """conv k x k (no bias, N(0, sqrt(2 / (k k out)))) -> BN onto the teacher's channels."""

    channels: int
    kernel: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        k = self.kernel
        init = nn.initializers.normal(math.sqrt(2.0 / (k * k * self.channels)))
        x = TorchConv(self.channels, (k, k), padding=(k - 1) // 2, use_bias=False, kernel_init=init, name="conv")(x)
        return BatchNorm(name="bn")(x, train)


@register
@dataclasses.dataclass(frozen=True)
class OFD(Method):
    name: str = "ofd"
    teacher_preact: bool = True
    student_preact: bool = True
    connector_kernel: int = 1  # OFD.CONNECTOR.KERNEL_SIZE
    order = 19
    beta = 1e-3  # mdistiller OFD.LOSS.FEAT_WEIGHT (CE_WEIGHT 1)
    config_options = ("connector_kernel",)

    def __post_init__(self):
        k = self.connector_kernel
        if not (isinstance(k, int) and k >= 1 and k % 2):
            raise ValueError(f"ofd: connector_kernel must be an odd integer >= 1 (the map keeps its size), got {k!r}")

    def check_pair(self, s_arch, t_arch, s, t):
        if not isinstance(get_model(t_arch, 1), MARGIN_FAMILIES):
            raise MethodPairError(f"method 'ofd' cannot pair {t_arch} -> {s_arch}: no single BatchNorm before the "
                                  f"teacher's stage ReLUs to take the margin from")

    def _pairs(self, s, t):
        """The aligned (student map, teacher map) pairs: the last min(count) of each, shallow to deep."""
        a, b = feature_maps(s), feature_maps(t)
        n = min(len(a), len(b))
        return list(zip(a[len(a) - n:], b[len(b) - n:])), len(b) - n

    def init(self, key, s, t, ctx=None):
        pairs, skip = self._pairs(s, t)
        keys = jax.random.split(key, len(pairs))
        params, stats = {}, {}
        for i, ((a, b), k) in enumerate(zip(pairs, keys)):
            v = Connector(b.shape[-1], self.connector_kernel).init(k, _up(a), False)
            params[f"layer{i}"], stats[f"layer{i}"] = v["params"], v["batch_stats"]
        ctx = ctx or {}
        if "teacher_variables" in ctx:
            margins = teacher_margins(ctx["teacher_model"], ctx["teacher_variables"])[skip:]
        else:  # shape-only use without the teacher (abstract evaluation): NaN, so no training can use them
            margins = [jnp.full((b.shape[-1],), jnp.nan, jnp.float32) for _, b in pairs]
        return {"params": params, "state": {"batch_stats": stats,
                                            "margin": {f"layer{i}": m for i, m in enumerate(margins)}}}

    def loss(self, variables, s, t, batch, train):
        pairs, _ = self._pairs(s, t)
        total, stats = 0.0, {}
        for i, (a, b) in enumerate(pairs):
            out, upd = Connector(b.shape[-1], self.connector_kernel).apply(
                {"params": variables["params"][f"layer{i}"],
                 "batch_stats": variables["state"]["batch_stats"][f"layer{i}"]}, _up(a), train, mutable=["batch_stats"])
            stats[f"layer{i}"] = upd["batch_stats"]
            target = adaptive_avg_pool(_up(b), out.shape[1:3])
            total = total + ofd_partial_l2(out, target, variables["state"]["margin"][f"layer{i}"]) \
                / 2.0 ** (len(pairs) - i - 1)
        return total, {**variables["state"], "batch_stats": stats}
