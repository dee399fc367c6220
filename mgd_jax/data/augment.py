"""On-device augmentation (SPEC §5), traced inside the jitted train step.

Zero-pad ``pad`` pixels in raw pixel space, crop back to the input size at offsets uniform in {0..2*pad},
flip horizontally with p = 0.5, scale to [0, 1] and normalise.  Everything is a function of ``key``, so the
batch a step sees is fixed by (seed, step) on any device count (threefry is partitionable).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images_u8: jax.Array, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32) -> jax.Array:
    x = images_u8.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def random_crop_flip(images_u8: jax.Array, key: jax.Array, pad: int, flip: bool) -> jax.Array:
    """uint8 [B, H, W, C] -> uint8 [B, H, W, C], padded with zeros then cropped, maybe flipped."""
    b, h, w, c = images_u8.shape
    k_y, k_x, k_f = jax.random.split(key, 3)
    out = images_u8
    if pad > 0:
        padded = jnp.pad(images_u8, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        oy = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
        ox = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
        out = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(padded, oy, ox)
    if flip:
        do_flip = jax.random.bernoulli(k_f, 0.5, (b,))
        out = jnp.where(do_flip[:, None, None, None], out[:, :, ::-1, :], out)
    return out


def train_transform(images_u8, key, aug_cfg, dtype=jnp.float32):
    x = random_crop_flip(images_u8, key, int(aug_cfg.pad), bool(aug_cfg.flip))
    return normalize(x, aug_cfg.mean, aug_cfg.std, dtype)


def eval_transform(images_u8, aug_cfg, dtype=jnp.float32):
    return normalize(images_u8, aug_cfg.mean, aug_cfg.std, dtype)
