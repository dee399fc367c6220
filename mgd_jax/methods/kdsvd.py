"""``kdsvd``: KDSVD (k = 1).  Radial-basis correlations between consecutive stage maps' leading singular vectors
(equal channel counts only; canonical singular-vector signs: the reference's LAPACK signs are arbitrary)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import feature_maps, l2n, require_equal_channels


def _svd_vectors(f: jax.Array, n: int) -> jax.Array:
    """First n right singular vectors (over C) of each sample's [HW, C] matrix, canonical sign, l2n: [B, C, n]."""
    x = f.reshape(f.shape[0], -1, f.shape[-1])  # [B, HW, C] (NHWC rows = positions)
    # On CPU one matrix per LAPACK call (lax.map), not one batched call: jaxlib 0.10's batched CPU gesdd fans the
    # batch out to XLA's intra-op thread pool and blocks a pool thread waiting for it; with one CPU device per
    # core every pool thread ends up blocked that way and the step deadlocks (README "Differences ...").  The
    # per-matrix call runs inline, with the same values.  GPU / TPU keep the batched solver.
    def right_vectors(a):
        return jnp.linalg.svd(a, full_matrices=False)[2]

    vt = jax.lax.platform_dependent(x, cpu=lambda a: jax.lax.map(right_vectors, a), default=right_vectors)
    v = jnp.swapaxes(vt, 1, 2)  # [B, C, r]
    v = jnp.where(jnp.isfinite(v), v, 0.0)
    # canonical sign: the largest-|.| entry of each column is positive
    idx = jnp.argmax(jnp.abs(v), axis=1, keepdims=True)
    sign = jnp.sign(jnp.take_along_axis(v, idx, axis=1))
    v = v * jnp.where(sign == 0, 1.0, sign)
    return l2n(v[:, :, :n], axis=1)


def kdsvd(gs, gt, k: int = 1) -> list[jax.Array]:
    vs_list, vt_list = [], []
    for s, t in zip(gs, gt):
        vt = _svd_vectors(t, k)  # [B, C, 1]
        vs = _svd_vectors(s, k + 3)  # [B, C, <=4]
        cos = jnp.einsum("bcn,bcm->bnm", vs, vt)  # [B, 4, 1]
        mx = jnp.max(jnp.abs(cos), axis=1, keepdims=True)
        mask = jnp.where(jnp.abs(cos) == mx, jnp.sign(cos), 0.0)
        vs_list.append(jnp.einsum("bcn,bnm->bcm", vs, mask)[..., 0])
        vt_list.append(vt[..., 0])
    out = []
    for i in range(1, len(vs_list)):
        rs = jnp.exp(-jnp.square(vs_list[i][:, :, None] - vs_list[i - 1][:, None, :]) / 8.0)
        rt = jnp.exp(-jnp.square(vt_list[i][:, :, None] - vt_list[i - 1][:, None, :]) / 8.0)
        d = jnp.square(rs - rt)
        out.append(jnp.sum(jnp.where(jnp.isfinite(d), d, 0.0)) / gs[0].shape[0])
    return out


@register
@dataclasses.dataclass(frozen=True)
class KDSVD(Method):
    name: str = "kdsvd"
    order = 11
    beta = 1.0  # not in RepDistiller and no published beta: our choice

    def check_pair(self, s_arch, t_arch, s, t):
        require_equal_channels(self.name, s_arch, t_arch, feature_maps(s), feature_maps(t), square=True)

    def loss(self, variables, s, t, batch, train):
        return sum(kdsvd(feature_maps(s), feature_maps(t))), {}
