"""CRD: contrastive representation distillation (SPEC_BASELINES §2.7).

Trainable: two embeddings (student and teacher side).  State (not trained): two memory banks [n_data, d] and the
normalising constants Z (set from the first batch, then frozen).  The batch supplies ``index`` (dataset indices)
and ``contrast_idx`` [B, K + 1] (column 0: the positive; then K negatives from other classes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mgd_jax.methods import functional as F
from mgd_jax.methods.modules import CRDEmbed


def crd_step_loss(params, state, f_s, f_t, index, contrast_idx, *, feat_dim: int, n_data: int,
                  temperature: float = 0.07, momentum: float = 0.5):
    """-> (loss, new_state).  Scores use the memory before this step's update (rows at ``index`` updated after)."""
    v1 = CRDEmbed(feat_dim).apply({"params": params["embed_s"]}, f_s)
    v2 = CRDEmbed(feat_dim).apply({"params": params["embed_t"]}, f_t)
    out_v2 = F.crd_scores(state["memory_v1"], contrast_idx, v2, temperature)  # teacher anchor, student bank
    out_v1 = F.crd_scores(state["memory_v2"], contrast_idx, v1, temperature)  # student anchor, teacher bank
    z_v1 = jnp.where(state["z_v1"] < 0, jax.lax.stop_gradient(jnp.mean(out_v1)) * n_data, state["z_v1"])
    z_v2 = jnp.where(state["z_v2"] < 0, jax.lax.stop_gradient(jnp.mean(out_v2)) * n_data, state["z_v2"])
    loss = F.contrast_loss(out_v1 / z_v1, n_data) + F.contrast_loss(out_v2 / z_v2, n_data)
    new_state = {
        "memory_v1": F.crd_memory_update(state["memory_v1"], index, v1, momentum),
        "memory_v2": F.crd_memory_update(state["memory_v2"], index, v2, momentum),
        "z_v1": z_v1.astype(state["z_v1"].dtype), "z_v2": z_v2.astype(state["z_v2"].dtype),
    }
    return loss, new_state
