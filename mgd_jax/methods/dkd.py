"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022).

With p = softmax(z / T) split into the target class and the rest: TCKD is the KL between the teacher's and the
student's binary (target, non-target) probabilities, NCKD the KL between their distributions over the non-target
classes only (the target masked out, the rest renormalised); loss = (alpha TCKD + beta NCKD) T^2, averaged over
the batch.  The masking is the authors' (mdistiller ``dkd_loss``): the target's logit / T lowered by 1000 before
the softmax, which equals removing it for any logits whose gap stays under ~900 T.

A logit method: it replaces the objective's logit-KD term (CE 1 + DKD, under every protocol), its teacher logits
are the stable-excitation target in mode ``mas``, and the student run's ``logit_standardization`` standardizes
both sides (as Sun et al.'s DKD).  The loss is ramped in linearly over the first ``warmup_epochs`` epochs
(mdistiller: ``min(epoch / 20, 1)`` with 1-based epochs).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.losses import _up
from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import warmup

# mdistiller's configs/cifar100/dkd/*.yaml: BETA per teacher -> student pair; every other pair takes its default 8
# (wrn_40_2 -> ShuffleV1, resnet32x4 -> resnet8x4 / ShuffleV1 / ShuffleV2 and ResNet50 -> MobileNetV2 set none).
CIFAR100_BETAS = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("vgg13", "vgg8"): 6.0,
                  ("vgg13", "MobileNetV2"): 6.0, ("wrn_40_2", "wrn_16_2"): 6.0, ("wrn_40_2", "wrn_40_1"): 6.0}
DEFAULT_BETA = 8.0


def _kl_rows(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """sum over the last axis of p (log p - log q), a term with p = 0 counting 0 (torch's ``kl_div``)."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _binary_log_probs(z: jax.Array, gt: jax.Array) -> jax.Array:
    """log (p_target, 1 - p_target) of softmax(z), [B, 2], from log-sum-exps (no log of a sum of probabilities)."""
    lse = jax.nn.logsumexp(z, axis=-1)
    log_t = jnp.sum(z * gt, axis=-1) - lse
    log_rest = jax.nn.logsumexp(jnp.where(gt > 0, -jnp.inf, z), axis=-1) - lse
    return jnp.stack([log_t, log_rest], axis=-1)


def dkd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: float, beta: float,
             temperature: float) -> jax.Array:
    """``(alpha TCKD + beta NCKD) T^2``, mean over the batch (student / teacher logits [B, K], integer labels [B]).
    At least float32; the teacher side is a constant of the student step (no gradient is taken through it)."""
    t = float(temperature)
    zs, zt = _up(student_logits) / t, _up(teacher_logits) / t
    gt = jax.nn.one_hot(labels, zs.shape[-1], dtype=zs.dtype)
    tckd = _kl_rows(_binary_log_probs(zt, gt), _binary_log_probs(zs, gt))
    nckd = _kl_rows(jax.nn.log_softmax(zt - 1000.0 * gt, axis=-1), jax.nn.log_softmax(zs - 1000.0 * gt, axis=-1))
    return (alpha * jnp.mean(tckd) + beta * jnp.mean(nckd)) * t * t


@register
@dataclasses.dataclass(frozen=True)
class DKD(Method):
    name: str = "dkd"
    alpha: float = 1.0  # TCKD weight (mdistiller DKD.ALPHA)
    nckd_beta: float = DEFAULT_BETA  # NCKD weight (DKD.BETA; per CIFAR-100 pair: CIFAR100_BETAS)
    temperature: float = 4.0  # DKD.T
    warmup_epochs: int = 20  # DKD.WARMUP
    order = 16
    beta = 1.0  # the loss enters with weight 1 (mdistiller's DKD: CE_WEIGHT 1 + the DKD loss)
    config_options = ("alpha", "nckd_beta", "temperature", "warmup_epochs")
    logit_method = True
    logit_kl = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"dkd: temperature must be > 0, got {self.temperature}")
        if not (self.alpha >= 0 and self.nckd_beta >= 0):
            raise ValueError(f"dkd: alpha and nckd_beta must be >= 0, got {self.alpha} and {self.nckd_beta}")
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            raise ValueError(f"dkd: warmup_epochs must be an integer >= 0 (0: none), got {self.warmup_epochs!r}")

    def loss_weights(self, protocol: str) -> dict[str, float]:
        super().loss_weights(protocol)  # checks the protocol's name
        return dict(ce=1.0, logit_kd=0.0, method=self.beta)  # DKD replaces the logit-KD term under every protocol

    def pair_options(self, teacher_arch: str, student_arch: str) -> dict:
        return {"nckd_beta": CIFAR100_BETAS.get((teacher_arch, student_arch), DEFAULT_BETA)}

    def loss(self, variables, s, t, batch, train):
        value = dkd_loss(s.logits, t.logits, batch["label"], self.alpha, self.nckd_beta, self.temperature)
        return warmup(batch, self.warmup_epochs) * value, variables.get("state", {})
