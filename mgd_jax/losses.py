"""The paper's loss terms as pure functions of arrays (SPEC §3.2, §3.3).

Conventions: ``KL(p||q) = sum_c p_c (log p_c - log q_c)``; "batchmean" = sum over all elements / batch size.
Teacher-side inputs are plain arrays: callers differentiate only w.r.t. student parameters, so nothing here
needs ``stop_gradient``.
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp


def _up(x: jax.Array) -> jax.Array:
    """At least float32 (bf16 activations are promoted; float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of raw logits [B, K] against integer labels [B]."""
    chex.assert_rank([logits, labels], [2, 1])
    chex.assert_equal_shape_prefix([logits, labels], 1)
    logp = jax.nn.log_softmax(_up(logits), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def distill_kl(student: jax.Array, teacher: jax.Array, temperature: float, reduction: str = "batchmean") -> jax.Array:
    """Temperature KD: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the last axis, summed and divided
    by the batch size (``batchmean``, the paper's KD) or by the number of elements (``mean``: PyTorch's default
    ``kl_div`` reduction, which the reference's mutual learning uses)."""
    chex.assert_equal_shape([student, teacher])
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
    t = float(temperature)
    log_q = jax.nn.log_softmax(_up(student) / t, axis=-1)
    log_p = jax.nn.log_softmax(_up(teacher) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q))
    return kl / (student.shape[0] if reduction == "batchmean" else student.size) * t * t


def standardize(logits: jax.Array) -> jax.Array:
    """Logit standardization (Sun et al., CVPR 2024): each row's z-score ``(z - mean) / (std + 1e-7)`` over the last
    axis, with the *unbiased* standard deviation (``torch.Tensor.std``'s).  At least float32.  A row of equal logits
    becomes zeros, with a zero gradient (the square root's derivative at 0 is not taken)."""
    z = _up(logits)
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.sum(centred * centred, axis=-1, keepdims=True) / max(z.shape[-1] - 1, 1)
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return centred / (std + 1e-7)


_standardize = standardize  # ``logit_kd``'s argument of the same name hides it there


def logit_kd(student_logits: jax.Array, target_logits: jax.Array, temperature: float = 4.0,
             standardize: bool = False) -> jax.Array:
    """The logit-KD term (paper T = 4).  Target: the teacher's logits (MAG) or the stable-excitation target (MAS).
    ``standardize``: both sides z-scored first (``standardize``; the student run's ``logit_standardization``)."""
    if standardize:
        student_logits, target_logits = _standardize(student_logits), _standardize(target_logits)
    return distill_kl(student_logits, target_logits, temperature)


def granularity_kl(student_encoding: jax.Array, teacher_encoding: jax.Array, temperature: float) -> jax.Array:
    """One granularity's term: KD between student and teacher *encodings*, softmax over the encoding dims."""
    return distill_kl(student_encoding, teacher_encoding, temperature)


def stable_excitation_target(teacher_logits: jax.Array, decoder_logits: Sequence[jax.Array]) -> jax.Array:
    """MAS target: arithmetic mean of the teacher's logits and its tube decoders' logits, before temperature."""
    stack = [teacher_logits, *decoder_logits]
    return sum(stack[1:], stack[0]) / len(stack)


def tube_loss(decoder_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
              temperature: float) -> jax.Array:
    """Stage-2 loss of one granularity: ``T^2 KL_batchmean(teacher/T || decoder/T) + CE(decoder, y)``."""
    return distill_kl(decoder_logits, teacher_logits, temperature) + cross_entropy(decoder_logits, labels)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where the label is among the k largest logits (ties broken like argsort)."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)
