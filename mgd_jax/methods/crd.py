"""``crd``: contrastive representation distillation (SPEC_BASELINES §2.7).

Trainable: two embeddings (student and teacher side).  State (not trained): two memory banks [n_data, d] and the
normalising constants Z (set from the first batch, then frozen).  The batch supplies ``index`` (dataset indices)
and ``contrast_idx`` [B, K + 1] (column 0: the positive; then K negatives from other classes; the data path's
``ContrastSampler`` draws them with ``nce_k`` and ``mode``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.methods.base import Method, register
from mgd_jax.models.layers import Linear


class CRDEmbed(nn.Module):
    """Linear -> x / ||x|| (no epsilon, as the reference)."""

    dim: int

    @nn.compact
    def __call__(self, x):
        x = Linear(self.dim, name="linear")(x.reshape(x.shape[0], -1))
        return x / jnp.linalg.norm(x, axis=1, keepdims=True)


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


def crd_step_loss(params, state, f_s, f_t, index, contrast_idx, *, feat_dim: int, n_data: int,
                  temperature: float = 0.07, momentum: float = 0.5):
    """-> (loss, new_state).  Scores use the memory before this step's update (rows at ``index`` updated after)."""
    v1 = CRDEmbed(feat_dim).apply({"params": params["embed_s"]}, f_s)
    v2 = CRDEmbed(feat_dim).apply({"params": params["embed_t"]}, f_t)
    out_v2 = crd_scores(state["memory_v1"], contrast_idx, v2, temperature)  # teacher anchor, student bank
    out_v1 = crd_scores(state["memory_v2"], contrast_idx, v1, temperature)  # student anchor, teacher bank
    z_v1 = jnp.where(state["z_v1"] < 0, jax.lax.stop_gradient(jnp.mean(out_v1)) * n_data, state["z_v1"])
    z_v2 = jnp.where(state["z_v2"] < 0, jax.lax.stop_gradient(jnp.mean(out_v2)) * n_data, state["z_v2"])
    loss = contrast_loss(out_v1 / z_v1, n_data) + contrast_loss(out_v2 / z_v2, n_data)
    new_state = {
        "memory_v1": crd_memory_update(state["memory_v1"], index, v1, momentum),
        "memory_v2": crd_memory_update(state["memory_v2"], index, v2, momentum),
        "z_v1": z_v1.astype(state["z_v1"].dtype), "z_v2": z_v2.astype(state["z_v2"].dtype),
    }
    return loss, new_state


@register
@dataclasses.dataclass(frozen=True)
class CRD(Method):
    """CRD with memory banks in the train state; the data path supplies index and contrast_idx."""

    name: str = "crd"
    needs_contrast: bool = True
    # RepDistiller's defaults: feature dim 128, 16384 negatives, T 0.07, momentum 0.5, 'exact' positives.
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    mode: str = "exact"  # positive = the sample itself ('exact') or a random same-class sample ('relax')
    order = 7
    beta = 0.8  # RepDistiller's "-b 0.8"; the authors' MG script the same
    config_options = ("feat_dim", "nce_k", "nce_t", "nce_m", "mode")

    def init(self, key, s, t, ctx=None):
        n_data = int(ctx["num_train"])
        k1, k2, k3, k4 = jax.random.split(key, 4)
        emb = CRDEmbed(self.feat_dim)
        bound = 1.0 / (self.feat_dim / 3) ** 0.5
        return {"params": {"embed_s": emb.init(k1, s.features[-1])["params"],
                           "embed_t": emb.init(k2, t.features[-1])["params"]},
                "state": {"memory_v1": jax.random.uniform(k3, (n_data, self.feat_dim), jnp.float32, -bound, bound),
                          "memory_v2": jax.random.uniform(k4, (n_data, self.feat_dim), jnp.float32, -bound, bound),
                          "z_v1": jnp.float32(-1.0), "z_v2": jnp.float32(-1.0)}}

    def loss(self, variables, s, t, batch, train):
        st = variables["state"]
        return crd_step_loss(variables["params"], st, s.features[-1], t.features[-1], batch["index"],
                             batch["contrast_idx"], feat_dim=self.feat_dim, n_data=st["memory_v1"].shape[0],
                             temperature=self.nce_t, momentum=self.nce_m)
