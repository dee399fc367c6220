"""``review``: ReviewKD, distilling knowledge via knowledge review (Chen et al., CVPR 2021), as mdistiller's CIFAR
setup runs it.

The student's stage maps and pooled vector (after their ReLU), from deep to shallow, pass through attention-based
fusion (ABF): each level's 1x1 conv + BN is fused with the level below it (nearest-upsampled), weighted by a
two-channel sigmoid attention, resized to the teacher's map and mapped by a 3x3 conv + BN to the teacher's
channels.  Hierarchical context loss (HCL) against the teacher's pre-ReLU stage maps and pooled vector: per level
the MSE of the maps plus the MSEs of their 4x4, 2x2 and 1x1 average pools (those smaller than the map), weighted
1, 1/2, 1/4, 1/8 and normalised by the weights' sum; summed over levels.  The loss is ramped in over the first
20 epochs (mdistiller: ``min(epoch / 20, 1)``).

Channel and size lists come from the pair (mdistiller's IN_CHANNELS / OUT_CHANNELS / SHAPES / OUT_SHAPES are
written per pair there); the fusion's width is min(512, the student's pooled width).  It needs as many stage maps
in the student as in the teacher (else ``MethodPairError``).  Loss weight: the authors' CIFAR-100 script per pair
(``CIFAR100_WEIGHTS``), else mdistiller's default 1.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.losses import _up
from mgd_jax.methods.base import Method, MethodPairError, register
from mgd_jax.methods.common import TorchConv, adaptive_avg_pool, feature_maps, nearest_resize, warmup
from mgd_jax.models.layers import BatchNorm

# dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh, --kd-loss-weight per teacher -> student pair (mdistiller's
# configs/cifar100/reviewkd.yaml: 5.0 for resnet32x4 -> resnet8x4, the same).  Other pairs: mdistiller's default 1.
CIFAR100_WEIGHTS = {("wrn_40_2", "wrn_16_2"): 5.0, ("wrn_40_2", "wrn_40_1"): 5.0, ("wrn_40_2", "ShuffleV1"): 5.0,
                    ("resnet32x4", "resnet8x4"): 5.0, ("resnet32x4", "ShuffleV1"): 5.0,
                    ("resnet32x4", "ShuffleV2"): 8.0, ("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0}
DEFAULT_WEIGHT = 1.0
HCL_LEVELS = (4, 2, 1)

# torch's kaiming_uniform_(a=1): U(-sqrt(3 / fan_in), +), the ABF convs' init
_KAIMING_A1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class ABF(nn.Module):
    """One attention-based fusion level: -> (output mapped to the teacher's channels and size, the fused map
    handed to the next shallower level)."""

    mid_channels: int
    out_channels: int
    fuse: bool

    @nn.compact
    def __call__(self, x, residual, out_hw: tuple[int, int], train: bool):
        x = TorchConv(self.mid_channels, (1, 1), use_bias=False, kernel_init=_KAIMING_A1, name="conv1")(x)
        x = BatchNorm(name="bn1")(x, train)
        if self.fuse:
            residual = nearest_resize(residual, x.shape[1], x.shape[2])
            z = jax.nn.sigmoid(TorchConv(2, (1, 1), name="att_conv")(jnp.concatenate([x, residual], axis=-1)))
            x = x * z[..., 0:1] + residual * z[..., 1:2]
        if x.shape[1:3] != tuple(out_hw):
            x = nearest_resize(x, *out_hw)
        y = TorchConv(self.out_channels, (3, 3), padding=1, use_bias=False, kernel_init=_KAIMING_A1, name="conv2")(x)
        return BatchNorm(name="bn2")(y, train), x


def hcl(student_maps, teacher_maps) -> jax.Array:
    """Hierarchical context loss: sum over levels of (MSE + sum_l w_l MSE(pool_l)) / (1 + sum_l w_l), w = 1/2, 1/4,
    1/8 for the 4x4, 2x2, 1x1 pools smaller than the level's map (mdistiller ``hcl_loss``)."""
    total = 0.0
    for fs, ft in zip(student_maps, teacher_maps):
        loss, weight, weights = jnp.mean(jnp.square(fs - ft)), 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= fs.shape[1]:
                continue
            weight /= 2.0
            loss = loss + weight * jnp.mean(jnp.square(adaptive_avg_pool(fs, size) - adaptive_avg_pool(ft, size)))
            weights += weight
        total = total + loss / weights
    return total


def _levels(o):
    """Stage maps and the pooled vector as a 1x1 map, shallow to deep, at least float32."""
    return [_up(f) for f in feature_maps(o)] + [_up(o.features[-1])[:, None, None, :]]


@register
@dataclasses.dataclass(frozen=True)
class ReviewKD(Method):
    name: str = "review"
    teacher_preact: bool = True  # mdistiller: the teacher's preact_feats, the student's feats (STU_PREACT False)
    warmup_epochs: int = 20
    max_mid_channels: int = 512
    order = 18
    beta = DEFAULT_WEIGHT  # mdistiller REVIEWKD_WEIGHT's default; per CIFAR-100 pair: pair_beta
    config_options = ("warmup_epochs",)

    def __post_init__(self):
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            raise ValueError(f"review: warmup_epochs must be an integer >= 0 (0: none), got {self.warmup_epochs!r}")
        if not (isinstance(self.max_mid_channels, int) and self.max_mid_channels >= 1):
            raise ValueError(f"review: max_mid_channels must be an integer >= 1, got {self.max_mid_channels!r}")

    def pair_beta(self, teacher_arch: str, student_arch: str) -> float:
        return CIFAR100_WEIGHTS.get((teacher_arch, student_arch), DEFAULT_WEIGHT)

    def check_pair(self, s_arch, t_arch, s, t):
        ns, nt = len(feature_maps(s)), len(feature_maps(t))
        if ns != nt:
            raise MethodPairError(f"method 'review' cannot pair {t_arch} -> {s_arch}: the teacher has {nt} stage maps "
                                  f"but the student {ns}")

    def _abfs(self, s, t):
        xs, ts = _levels(s), _levels(t)
        mid = min(self.max_mid_channels, xs[-1].shape[-1])
        return [ABF(mid, b.shape[-1], i < len(xs) - 1) for i, b in enumerate(ts)]

    def init(self, key, s, t, ctx=None):
        xs, ts = _levels(s), _levels(t)
        abfs, keys = self._abfs(s, t), jax.random.split(key, len(xs))
        params, stats, residual = {}, {}, None
        for i in reversed(range(len(xs))):
            v = abfs[i].init(keys[i], xs[i], residual, ts[i].shape[1:3], False)
            params[f"abf{i}"], stats[f"abf{i}"] = v["params"], v["batch_stats"]
            # what this level hands the next: its fused map at the teacher's size, mid channels wide
            residual = jnp.zeros((xs[i].shape[0], *ts[i].shape[1:3], abfs[i].mid_channels), xs[i].dtype)
        return {"params": params, "state": {"batch_stats": stats}}

    def loss(self, variables, s, t, batch, train):
        xs, ts = _levels(s), _levels(t)
        abfs = self._abfs(s, t)
        outs, stats, residual = [None] * len(xs), {}, None
        for i in reversed(range(len(xs))):  # deep to shallow, each level fused with the one below it
            v = {"params": variables["params"][f"abf{i}"], "batch_stats": variables["state"]["batch_stats"][f"abf{i}"]}
            (outs[i], residual), upd = abfs[i].apply(v, xs[i], residual, ts[i].shape[1:3], train, mutable=["batch_stats"])
            stats[f"abf{i}"] = upd["batch_stats"]
        return warmup(batch, self.warmup_epochs) * hcl(outs, ts), {"batch_stats": stats}
