"""``factor``: FT (factor transfer).  The init stage trains a paraphraser (reconstruction of the teacher's last
map); the main stage trains a translator so that the student's factors match the frozen paraphraser's."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mgd_jax.methods.base import Method, register
from mgd_jax.methods.common import TorchConv, attention_map, match_hw
from mgd_jax.models.layers import BatchNorm

# pretrain.py's init-stage lr for FT with a CIFAR ResNet / WRN student (other students: the student's lr).
RESNET_WRN_INIT_LR = 0.01


def factor_transfer(factor_s: jax.Array, factor_t: jax.Array) -> jax.Array:
    s, t = match_hw(factor_s, factor_t)
    return jnp.mean(jnp.abs(attention_map(s) - attention_map(t)))


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
    """FT translator (k = 0.5, BN): student map -> teacher factor space (trained with the student)."""

    t_channels: int

    @nn.compact
    def __call__(self, x, train: bool):
        c, f = x.shape[-1], self.t_channels // 2
        act = lambda y: nn.leaky_relu(y, 0.1)  # noqa: E731
        h = act(BatchNorm(name="bn0")(TorchConv(c, (3, 3), padding=1, name="conv0")(x), train))
        h = act(BatchNorm(name="bn1")(TorchConv(f, (3, 3), padding=1, name="conv1")(h), train))
        return act(BatchNorm(name="bn2")(TorchConv(f, (3, 3), padding=1, name="conv2")(h), train))


@register
@dataclasses.dataclass(frozen=True)
class Factor(Method):
    name: str = "factor"
    init_params_key: str = "paraphraser"
    init_trains_student: bool = False
    order = 14
    beta = 200.0  # RepDistiller's "-b 200" (no MG script)

    def init_lr(self, student_arch, student_lr):
        return RESNET_WRN_INIT_LR if student_arch.startswith(("resnet", "wrn")) else student_lr

    def init_stage_params(self, key, s, t, ctx=None):
        k_para, _ = jax.random.split(key)
        return Paraphraser().init(k_para, t.features[-2])["params"]

    def init(self, key, s, t, ctx=None):
        _, k_tr = jax.random.split(key)
        para = self.init_stage_params(key, s, t, ctx)
        tr = Translator(t.features[-2].shape[-1]).init(k_tr, s.features[-2], False)
        return {"params": {"translator": tr["params"]},
                "state": {"paraphraser": para, "batch_stats": tr["batch_stats"]}}

    def init_loss(self, variables, s, t, train):
        _, rec = Paraphraser().apply({"params": variables["params"]}, t.features[-2])
        return jnp.mean(jnp.square(rec - t.features[-2])), variables["state"]

    def loss(self, variables, s, t, batch, train):
        st = variables["state"]
        factor_t, _ = Paraphraser().apply({"params": st["paraphraser"]}, t.features[-2], decode=False)
        factor_s, upd = Translator(t.features[-2].shape[-1]).apply(
            {"params": variables["params"]["translator"], "batch_stats": st["batch_stats"]}, s.features[-2], train,
            mutable=["batch_stats"])
        return factor_transfer(factor_s, factor_t), {**st, "batch_stats": upd["batch_stats"]}
