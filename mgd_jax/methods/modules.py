"""Auxiliary modules of the baseline methods (trained with the student unless stated), NHWC, PyTorch init."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.models.layers import BatchNorm, Linear


def _uniform(bound: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class TorchConv(nn.Module):
    """Conv2d / ConvTranspose2d with PyTorch's default init: weight and bias ~ U(-1/sqrt(fan_in), +).

    Kernel layout HWIO (conv) or (kh, kw, out, in) for the transposed conv (the torch (in, out, kh, kw) tensor
    transposed (2, 3, 1, 0)), computed with ``lax.conv_transpose(..., transpose_kernel=True)``.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    transpose: bool = False
    kernel_init: Callable | None = None
    bias_init: Callable | None = None

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        cin = x.shape[-1]
        fan_in = (self.features if self.transpose else cin) * kh * kw
        bound = 1.0 / fan_in ** 0.5
        shape = (kh, kw, self.features, cin) if self.transpose else (kh, kw, cin, self.features)
        w = self.param("kernel", self.kernel_init or _uniform(bound), shape, jnp.float32)
        if self.transpose:
            q = kh - 1 - self.padding
            y = jax.lax.conv_transpose(x, w.astype(x.dtype), (self.stride, self.stride), ((q, q), (q, q)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (self.stride, self.stride), ((p, p), (p, p)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init or _uniform(bound), (self.features,), jnp.float32).astype(y.dtype)
        return y


class ConvReg(nn.Module):
    """FitNet regressor (and AB connector): a conv chosen by the heights, then BN (and ReLU)."""

    t_channels: int
    t_height: int
    t_width: int
    use_relu: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        sh, sw = x.shape[1], x.shape[2]
        th, tw = self.t_height, self.t_width
        if sh == 2 * th:
            conv = TorchConv(self.t_channels, (3, 3), 2, 1, name="conv")
        elif 2 * sh == th:
            conv = TorchConv(self.t_channels, (4, 4), 2, 1, transpose=True, name="conv")
        elif sh >= th:
            conv = TorchConv(self.t_channels, (1 + sh - th, 1 + sw - tw), name="conv")
        else:
            raise ValueError(f"ConvReg: student map {sh}x{sw} cannot be regressed to teacher map {th}x{tw}")
        y = BatchNorm(name="bn")(conv(x), train)
        return nn.relu(y) if self.use_relu else y


class VIDRegressor(nn.Module):
    """VID: 1x1 convs s_C -> t_C -> t_C -> t_C (no bias) and a per-channel log_scale."""

    t_channels: int
    log_scale_init: float

    @nn.compact
    def __call__(self, x):
        h = nn.relu(TorchConv(self.t_channels, (1, 1), use_bias=False, name="conv0")(x))
        h = nn.relu(TorchConv(self.t_channels, (1, 1), use_bias=False, name="conv1")(h))
        mu = TorchConv(self.t_channels, (1, 1), use_bias=False, name="conv2")(h)
        log_scale = self.param("log_scale", nn.initializers.constant(self.log_scale_init), (self.t_channels,))
        return mu, log_scale


class CRDEmbed(nn.Module):
    """Linear -> x / ||x|| (no epsilon, as the reference)."""

    dim: int

    @nn.compact
    def __call__(self, x):
        x = Linear(self.dim, name="linear")(x.reshape(x.shape[0], -1))
        return x / jnp.linalg.norm(x, axis=1, keepdims=True)


class AFDAttention(nn.Module):
    """AFD channel attention: GAP -> 1x1 conv (C -> C*att_f) -> ReLU -> 1x1 conv -> sigmoid, normalised over C."""

    channels: int
    att_f: float = 1.0

    @nn.compact
    def __call__(self, fm_t):
        mid = int(self.channels * self.att_f)
        kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        g = jnp.mean(fm_t, axis=(1, 2), keepdims=True)
        g = nn.relu(TorchConv(mid, (1, 1), kernel_init=kaiming, bias_init=nn.initializers.zeros, name="conv0")(g))
        g = TorchConv(self.channels, (1, 1), kernel_init=kaiming, bias_init=nn.initializers.zeros, name="conv1")(g)
        rho = jax.nn.sigmoid(g.reshape(g.shape[0], -1))
        return rho / jnp.sum(rho, axis=1, keepdims=True)


class Paraphraser(nn.Module):
    """FT paraphraser (k = 0.5, no BN): encoder to C/2 factors and a decoder back (trained in the init stage)."""

    @nn.compact
    def __call__(self, x, decode: bool = True):
        c = x.shape[-1]
        f = c // 2
        act = lambda y: nn.leaky_relu(y, 0.1)  # noqa: E731
        h = act(TorchConv(c, (3, 3), padding=1, name="enc0")(x))
        h = act(TorchConv(f, (3, 3), padding=1, name="enc1")(h))
        factor = act(TorchConv(f, (3, 3), padding=1, name="enc2")(h))
        if not decode:
            return factor, None
        h = act(TorchConv(f, (3, 3), padding=1, transpose=True, name="dec0")(factor))
        h = act(TorchConv(c, (3, 3), padding=1, transpose=True, name="dec1")(h))
        rec = act(TorchConv(c, (3, 3), padding=1, transpose=True, name="dec2")(h))
        return factor, rec


class Translator(nn.Module):
    """FT translator (k = 0.5, BN): student map -> teacher factor space."""

    t_channels: int

    @nn.compact
    def __call__(self, x, train: bool):
        c, f = x.shape[-1], self.t_channels // 2
        act = lambda y: nn.leaky_relu(y, 0.1)  # noqa: E731
        h = act(BatchNorm(name="bn0")(TorchConv(c, (3, 3), padding=1, name="conv0")(x), train))
        h = act(BatchNorm(name="bn1")(TorchConv(f, (3, 3), padding=1, name="conv1")(h), train))
        return act(BatchNorm(name="bn2")(TorchConv(f, (3, 3), padding=1, name="conv2")(h), train))
