"""Baseline distillation losses as pure functions of NHWC arrays (SPEC_BASELINES §0.3, §2).

Feature maps are [B, H, W, C]; vectors [B, D].  Teacher-side arguments are constants of the student step.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


# --- helpers ---------------------------------------------------------------------------------------------------
def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling along one axis: out cell i averages [floor(i*In/Out), ceil((i+1)*In/Out))."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] with PyTorch's adaptive_avg_pool2d bins."""
    ph = jnp.asarray(_pool_matrix(x.shape[1], size), x.dtype)
    pw = jnp.asarray(_pool_matrix(x.shape[2], size), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)


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


def smooth_l1(a: jax.Array, b: jax.Array) -> jax.Array:
    d = jnp.abs(a - b)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))


# --- FitNet ------------------------------------------------------------------------------------------------------
def hint_mse(regressed: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(regressed - target))


# --- AT -------------------------------------------------------------------------------------------------------------
def attention_map(f: jax.Array) -> jax.Array:
    """l2-normalised channel-mean of f^2 over positions: [B, H*W]."""
    return l2n(jnp.mean(jnp.square(f), axis=-1).reshape(f.shape[0], -1), axis=1)


def attention_layer(s: jax.Array, t: jax.Array) -> jax.Array:
    s, t = match_hw(s, t)
    return jnp.mean(jnp.square(attention_map(s) - attention_map(t)))


def attention(gs: Sequence[jax.Array], gt: Sequence[jax.Array]) -> list[jax.Array]:
    return [attention_layer(s, t) for s, t in zip(gs, gt)]


# --- SP -------------------------------------------------------------------------------------------------------------
def similarity(fs: jax.Array, ft: jax.Array) -> jax.Array:
    b = fs.shape[0]
    gs = l2n(fs.reshape(b, -1) @ fs.reshape(b, -1).T, axis=1)
    gt = l2n(ft.reshape(b, -1) @ ft.reshape(b, -1).T, axis=1)
    return jnp.sum(jnp.square(gt - gs)) / (b * b)


# --- CC -------------------------------------------------------------------------------------------------------------
def correlation(es: jax.Array, et: jax.Array) -> jax.Array:
    d = jnp.abs(es - et)
    return jnp.sum(d[:-1] * d[1:]) / (es.shape[0] - 1)


# --- VID ------------------------------------------------------------------------------------------------------------
VID_LOG_SCALE_INIT = float(np.float32(np.log(np.exp(5.0 - 1e-5) - 1.0)))


def vid_layer(mu: jax.Array, t: jax.Array, log_scale: jax.Array) -> jax.Array:
    var = jax.nn.softplus(log_scale) + 1e-5
    return jnp.mean(0.5 * (jnp.square(mu - t) / var + jnp.log(var)))


# --- RKD ------------------------------------------------------------------------------------------------------------
def _pdist(e: jax.Array) -> jax.Array:
    sq = jnp.sum(e * e, axis=1)
    d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, 1e-12))
    return d * (1.0 - jnp.eye(e.shape[0], dtype=e.dtype))


def _normalised_dist(e):
    d = _pdist(e)
    pos = d > 0
    return d / (jnp.sum(jnp.where(pos, d, 0.0)) / jnp.sum(pos))


def _angles(e):
    diff = e[None, :, :] - e[:, None, :]  # [anchor i, j, D] = e_j - e_i
    u = l2n(diff, axis=2)
    return jnp.einsum("ijd,ikd->ijk", u, u).reshape(-1)


def rkd(fs: jax.Array, ft: jax.Array, w_dist: float = 25.0, w_angle: float = 50.0) -> jax.Array:
    fs, ft = fs.reshape(fs.shape[0], -1), ft.reshape(ft.shape[0], -1)
    loss = 0.0
    if w_dist:
        loss = loss + w_dist * smooth_l1(_normalised_dist(fs), _normalised_dist(ft))
    if w_angle:
        loss = loss + w_angle * smooth_l1(_angles(fs), _angles(ft))
    return loss


# --- PKT ------------------------------------------------------------------------------------------------------------
def pkt(fs: jax.Array, ft: jax.Array, eps: float = 1e-7) -> jax.Array:
    def probs(x):
        x = x / (jnp.linalg.norm(x, axis=1, keepdims=True) + eps)
        x = jnp.nan_to_num(x, nan=0.0)
        s = (x @ x.T + 1.0) / 2.0
        return s / jnp.sum(s, axis=1, keepdims=True)

    ps, pt = probs(fs.reshape(fs.shape[0], -1)), probs(ft.reshape(ft.shape[0], -1))
    return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


# --- NST ------------------------------------------------------------------------------------------------------------
def nst_layer(s: jax.Array, t: jax.Array) -> jax.Array:
    s, t = match_hw(s, t)

    def chans(f):  # [B, C, HW], each channel's spatial vector normalised
        return l2n(f.reshape(f.shape[0], -1, f.shape[-1]).transpose(0, 2, 1), axis=2)

    s, t = chans(s), chans(t)

    def k(a, b):
        return jnp.square(jnp.einsum("bik,bjk->bij", a, b))

    return jnp.mean(k(t, t)) + jnp.mean(k(s, s)) - 2 * jnp.mean(k(s, t))


def nst(gs, gt) -> list[jax.Array]:
    return [nst_layer(s, t) for s, t in zip(gs, gt)]


# --- KDSVD (k = 1) -----------------------------------------------------------------------------------------------
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


# --- FSP -------------------------------------------------------------------------------------------------------------
def fsp_matrix(bot: jax.Array, top: jax.Array) -> jax.Array:
    bot, top = match_hw(bot, top)
    hw = bot.shape[1] * bot.shape[2]
    return jnp.einsum("bhwj,bhwi->bji", top, bot) / hw


def fsp(gs, gt) -> list[jax.Array]:
    out = []
    for i in range(len(gs) - 1):
        out.append(jnp.mean(jnp.square(fsp_matrix(gs[i], gs[i + 1]) - fsp_matrix(gt[i], gt[i + 1]))))
    return out


# --- AB --------------------------------------------------------------------------------------------------------------
def ab(gs, gt, margin: float = 1.0) -> list[jax.Array]:
    n = len(gs)
    out = []
    for i, (s, t) in enumerate(zip(gs, gt)):
        loss = jnp.sum(jnp.square(s + margin) * ((s > -margin) & (t <= 0)) +
                       jnp.square(s - margin) * ((s <= margin) & (t > 0)))
        out.append(loss * 2.0 ** (i - n + 1) / s.shape[0] * 3 / 1000)
    return out


# --- FT ---------------------------------------------------------------------------------------------------------------
def factor_transfer(factor_s: jax.Array, factor_t: jax.Array) -> jax.Array:
    s, t = match_hw(factor_s, factor_t)
    return jnp.mean(jnp.abs(attention_map(s) - attention_map(t)))


# --- AFD --------------------------------------------------------------------------------------------------------------
def afd(fm_s: jax.Array, fm_t: jax.Array, rho: jax.Array, eps: float = 1e-6) -> jax.Array:
    """rho: [B, C] channel attention (sums to 1 over C)."""
    def n(f):
        return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=(1, 2), keepdims=True)) + eps)

    per_c = jnp.mean(jnp.square(n(fm_s) - n(fm_t)), axis=(1, 2))  # [B, C]
    return jnp.mean(jnp.sum(rho * per_c, axis=1))


# --- CRD -------------------------------------------------------------------------------------------------------------
def contrast_loss(x: jax.Array, n_data: int, eps: float = 1e-7) -> jax.Array:
    """NCE loss of [B, K+1] scores, positive in column 0 (SPEC_BASELINES §2.7 step 5)."""
    m = x.shape[1] - 1
    mpn = m / n_data
    pos = jnp.log(x[:, 0] / (x[:, 0] + mpn + eps))
    neg = jnp.log(mpn / (x[:, 1:] + mpn + eps))
    return -(jnp.sum(pos) + jnp.sum(neg)) / x.shape[0]


def crd_scores(memory: jax.Array, contrast_idx: jax.Array, v: jax.Array, temperature: float) -> jax.Array:
    """exp(<memory[contrast_idx[b, k]], v[b]> / T): [B, K+1]; memory rows are constants."""
    w = jax.lax.stop_gradient(memory)[contrast_idx]  # [B, K+1, d]
    return jnp.exp(jnp.einsum("bkd,bd->bk", w, v) / temperature)


def crd_memory_update(memory: jax.Array, index: jax.Array, v: jax.Array, momentum: float) -> jax.Array:
    rows = momentum * memory[index] + (1 - momentum) * jax.lax.stop_gradient(v)
    rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
    return memory.at[index].set(rows)
