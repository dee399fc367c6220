"""Layers with PyTorch's numerics: BatchNorm with unbiased running variance, Linear with torch's default init.

The reference models are PyTorch; these two layers are where flax's defaults differ from it:
* ``nn.BatchNorm`` updates the running variance with the *biased* batch variance; PyTorch uses the unbiased one.
* ``nn.Dense`` uses lecun-normal weights and zero bias; ``torch.nn.Linear`` draws both from U(-1/sqrt(fan_in), +).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

# Kaiming normal, fan_out, ReLU gain (torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu')).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Conv2d default init (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = k*k*in/groups.
torch_conv_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch.nn.Linear default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in, uniform).
torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """BatchNorm over all axes but the last, PyTorch semantics (eps 1e-5, momentum 0.1, unbiased running var).

    Under ``jax.jit`` with the batch sharded over a mesh, the mean over the batch axis is a *global* mean,
    so statistics are those of the global batch on any number of devices.  Training mode differentiates
    through ``batch_norm_train``'s own backward pass (see there).
    """

    epsilon: float = 1e-5
    momentum: float = 0.1  # PyTorch convention: running <- (1 - momentum) * running + momentum * batch

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not train:
            return _normalize(x, ra_mean.value, jax.lax.rsqrt(ra_var.value + self.epsilon) * scale, bias)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = x.size // c
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
            ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        return y


def _normalize(x, mean, inv, bias):
    return (x - mean.astype(x.dtype)) * inv.astype(x.dtype) + bias.astype(x.dtype)


def _batch_norm_fwd(x, scale, bias, eps):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.mean(jnp.square(xf - mean), axes)  # biased, two-pass: used to normalise
    inv = jax.lax.rsqrt(var + eps)
    return (_normalize(x, mean, inv * scale, bias), mean, var), (x, mean, inv, scale, bias)


def _batch_norm_bwd(eps, residuals, cotangents):
    """dx = scale * inv / n * (n dy - sum(dy) - xhat sum(dy xhat)); d bias = sum(dy); d scale = sum(dy xhat).

    Both sums are one reduction of the stacked (dy, dy xhat), i.e. one all-reduce when the batch is sharded
    (autodiff of the forward pass reduces, and all-reduces, through the mean and the variance separately).
    The cotangents of the returned mean and variance are zero (``batch_norm_train`` stops their gradients).
    The sums are float32; each gradient is returned in its primal's dtype (bfloat16 under mixed precision).
    """
    del eps
    x, mean, inv, scale, bias = residuals
    dy = cotangents[0].astype(jnp.float32)
    axes = tuple(range(1, x.ndim))
    n = x.size // x.shape[-1]
    xhat = (x.astype(jnp.float32) - mean) * inv
    d_bias, d_scale = jnp.sum(jnp.stack([dy, dy * xhat]), axes)
    dx = (scale * inv / n) * (n * dy - d_bias - xhat * d_scale)
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(x, scale, bias, eps):
    return _batch_norm_fwd(x, scale, bias, eps)[0]


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """Training-mode BatchNorm -> (y, batch mean, biased batch variance); statistics over all axes but the last.

    The forward pass is the textbook two-pass one (mean, then the mean of squared deviations), the same
    float32 operations as before this function existed; the backward pass is written out
    (``_batch_norm_bwd``): on 2 CPU devices it took the MAS+KD resnet56 -> resnet20 step from ~314 to ~294 ms
    (README "Speed"); its gradients agree with autodiff of the textbook form and with float64 finite
    differences (tests/test_models.py).  Gradients flow through ``y`` only: the returned statistics are for the
    running averages and are not differentiable (``stop_gradient``; a loss on batch statistics needs its own
    computation).  A ``custom_vjp`` supports reverse mode only: no ``jax.jvp`` / ``jacfwd`` through training mode.
    """
    y, mean, var = _batch_norm(x, scale, bias, eps)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


class Linear(nn.Module):
    """``torch.nn.Linear``: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) unless inits are given."""

    features: int
    kernel_init: Callable | None = None
    bias_init: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        bound = 1.0 / (fan_in ** 0.5)

        def default_bias(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param("kernel", self.kernel_init or torch_linear_kernel, (fan_in, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init or default_bias, (self.features,), jnp.float32)
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None, *, use_bias: bool = False,
         groups: int = 1, kernel_init: Callable = kaiming_normal_fan_out, name: str | None = None) -> nn.Conv:
    """A PyTorch-style conv: symmetric explicit padding (default kernel // 2), no bias by default; a bias
    starts at 0 (the zoo's init for every conv that has one)."""
    p = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   use_bias=use_bias, feature_group_count=groups, kernel_init=kernel_init,
                   bias_init=nn.initializers.zeros, name=name)


def fusion_fence(x: jax.Array, guard: jax.Array, train: bool) -> jax.Array:
    """``x`` unchanged, stored once: a cut that XLA:CPU's fusion cannot see through (training on CPU only).

    XLA:CPU fuses cheap elementwise producers into every consumer, duplicating them.  In a residual stream
    x_l = relu(bn(conv(.)) + x_{l-1}) the transposes that feed the weight-gradient convolutions then
    recompute the whole chain x_1 .. x_l instead of reading the stored x_l: quadratic in depth, 44% of a
    resnet56 training step (benchmarks/profile_step.py).  An identity ``lax.cond`` on a replicated scalar
    (``guard``, a parameter: no communication) is a boundary fusion cannot cross, so x_l is materialised
    and read.  The other branch returns NaN when ``guard`` is not finite, i.e. when training has diverged
    already (the loop stops on a non-finite loss).  On GPU / TPU a cond costs a host round trip: skipped.
    """
    if not train or jax.default_backend() != "cpu":
        return x
    return jax.lax.cond(jnp.isfinite(guard), lambda t: t, lambda t: jnp.full_like(t, jnp.nan), x)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """ShuffleNet's channel shuffle in NHWC: the PyTorch NCHW view(N, g, C/g) -> transpose -> flatten order."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)
