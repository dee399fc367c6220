"""What two or more methods share: feature-map selection, per-layer init, pooling to a common size, nearest
resizing, l2 normalisation, attention maps, the loss warm-up, pair checks and the PyTorch-initialised convolution
(NHWC).

Feature maps are [B, H, W, C]; vectors [B, D].  Teacher-side arguments are constants of the student step.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mgd_jax.methods.base import MethodPairError, Outputs
from mgd_jax.models.layers import BatchNorm


def feature_maps(o: Outputs) -> list:
    """The stage outputs: the feature list without the stem (first) and the pooled vector (last)."""
    return o.features[1:-1]


def per_layer_init(make, key, pairs) -> dict:
    """``{'layer<i>': make(i, s, t).init(key_i, s)['params']}`` with one key per (s, t) pair."""
    keys = jax.random.split(key, max(len(pairs), 1))
    return {f"layer{i}": make(i, s, t).init(k, s)["params"] for i, ((s, t), k) in enumerate(zip(pairs, keys))}


# --- pooling and normalisation ----------------------------------------------------------------------------------
def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling along one axis: out cell i averages [floor(i*In/Out), ceil((i+1)*In/Out))."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def adaptive_avg_pool(x: jax.Array, size) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] with PyTorch's adaptive_avg_pool2d bins; ``size``: ``s`` (square) or ``(h, w)``."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ph = jnp.asarray(_pool_matrix(x.shape[1], h), x.dtype)
    pw = jnp.asarray(_pool_matrix(x.shape[2], w), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)


def nearest_resize(x: jax.Array, h: int, w: int) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C] as PyTorch's ``F.interpolate(mode='nearest')``: output row i reads input row
    floor(i * H / h) (likewise columns)."""
    rows = np.minimum(np.floor(np.arange(h) * (x.shape[1] / h)).astype(np.int64), x.shape[1] - 1)
    cols = np.minimum(np.floor(np.arange(w) * (x.shape[2] / w)).astype(np.int64), x.shape[2] - 1)
    return x[:, rows][:, :, cols]


def match_hw(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pool the map with the larger height down to the other's (square) size; W is not compared."""
    hs, ht = s.shape[1], t.shape[1]
    if hs > ht:
        s = adaptive_avg_pool(s, ht)
    elif hs < ht:
        t = adaptive_avg_pool(t, hs)
    return s, t


def l2n(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """F.normalize: x / max(||x||, eps), written as sqrt(max(||x||^2, eps^2)) so that the gradient at x = 0
    is 0 like PyTorch's (d||x||/dx = x/||x|| is 0/0 there: NaN, e.g. RKD's zero anchor-to-itself vectors)."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """||x|| over ``axis`` with a zero gradient at x = 0 (PyTorch's ``Tensor.norm`` backward there; JAX's is NaN)."""
    sq = jnp.sum(x * x, axis=axis)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def warmup(batch: dict, epochs: int):
    """mdistiller's loss warm-up ``min(epoch / epochs, 1)`` for the 1-based ``batch['epoch']`` the student step sets
    (DKD, ReviewKD: 20 epochs); 1 where the batch has no epoch (a step built without ``steps_per_epoch``) or
    ``epochs`` is 0."""
    epoch = batch.get("epoch")
    if epoch is None or not epochs:
        return 1.0
    return jnp.minimum(jnp.asarray(epoch, jnp.float32) / float(epochs), 1.0)


def attention_map(f: jax.Array) -> jax.Array:
    """AT's (and FT's) attention map: l2-normalised channel-mean of f^2 over positions: [B, H*W]."""
    return l2n(jnp.mean(jnp.square(f), axis=-1).reshape(f.shape[0], -1), axis=1)


# --- pair checks --------------------------------------------------------------------------------------------------
def require_equal_channels(name, s_arch, t_arch, s_maps, t_maps, square=False, spatial=False):
    """MethodPairError unless the maps pair up with equal channels (and, if asked, equal / square sizes)."""
    if len(s_maps) != len(t_maps):
        raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: {len(t_maps)} teacher maps vs "
                              f"{len(s_maps)} student maps")
    for i, (a, b) in enumerate(zip(s_maps, t_maps)):
        if a.shape[-1] != b.shape[-1]:
            raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: layer {i} has {b.shape[-1]} "
                                  f"teacher channels but {a.shape[-1]} student channels")
        if spatial and a.shape[1:3] != b.shape[1:3]:
            raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: layer {i} is "
                                  f"{b.shape[1]}x{b.shape[2]} in the teacher but {a.shape[1]}x{a.shape[2]} in the "
                                  f"student")
        if square and (a.shape[1] != a.shape[2] or b.shape[1] != b.shape[2]):
            raise MethodPairError(f"method {name!r} cannot pair {t_arch} -> {s_arch}: layer {i} maps are not square")


def can_regress(hs: int, ht: int) -> bool:
    """ConvReg's size rule: a student map of height hs can be mapped onto a teacher map of height ht."""
    return hs == 2 * ht or 2 * hs == ht or hs >= ht


# --- modules ------------------------------------------------------------------------------------------------------
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
    """FitNet regressor (and AB connector): a conv chosen by the heights (``can_regress``), then BN (and ReLU)."""

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
