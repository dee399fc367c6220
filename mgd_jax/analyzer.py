"""The multi-granularity self-analyzing module (SPEC §3.1): one encoder/decoder "tube" per granularity.

Each granularity g = (dim, temperature) owns
  encoder: Linear(d -> d) -> ReLU -> Linear(d -> dim)            (raw linear output: the granularity's encoding)
  decoder: Linear(dim -> d) -> ReLU -> Linear(d -> num_classes)  (logits read back from the encoding)
over the backbone's pooled penultimate feature h (dim d).  The paper uses [(64, T=2), (256, T=8)].
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
from flax import linen as nn

from mgd_jax.models.layers import Linear

PAPER_GRANULARITIES = ((64, 2.0), (256, 8.0))


@dataclasses.dataclass(frozen=True)
class Granularity:
    dim: int
    temperature: float

    @property
    def name(self) -> str:
        return f"{self.dim}d_T{self.temperature:g}"


def parse_granularities(spec: Sequence[Sequence[float]]) -> tuple[Granularity, ...]:
    """Validates ``[(dim, temperature), ...]``; raises ValueError naming the bad entry."""
    out = []
    for i, g in enumerate(spec):
        try:
            dim, temp = g
        except (TypeError, ValueError):
            raise ValueError(f"granularities[{i}] must be (dim, temperature), got {g!r}") from None
        if int(dim) != dim or int(dim) <= 0:
            raise ValueError(f"granularities[{i}]: encoding dim must be a positive integer, got {dim!r}")
        if not float(temp) > 0:
            raise ValueError(f"granularities[{i}]: temperature must be > 0, got {temp!r}")
        out.append(Granularity(int(dim), float(temp)))
    if not out:
        raise ValueError("granularities must not be empty (use granularity mode 'none' for no tubes)")
    names = [g.name for g in out]
    if len(set(names)) != len(names):
        raise ValueError(f"granularities must be distinct, got {names}")
    return tuple(out)


class MLP2(nn.Module):
    """Linear -> ReLU -> Linear, PyTorch default init (keys 0 / 2 of the reference nn.Sequential)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        return Linear(self.out, name="fc2")(nn.relu(Linear(self.hidden, name="fc1")(x)))


class Tube(nn.Module):
    dim: int
    num_classes: int
    with_decoder: bool = True

    @nn.compact
    def __call__(self, h, decode: bool = True):
        d = h.shape[-1]
        e = MLP2(d, self.dim, name="encoder")(h)
        if not self.with_decoder:
            return e, None
        dec = MLP2(d, self.num_classes, name="decoder")
        if decode or self.is_initializing():
            return e, dec(e)
        return e, None


class GranularityAnalyzer(nn.Module):
    """All tubes over one pooled feature.  ``apply`` -> ``{name: (encoding, decoder_logits or None)}``.

    ``with_decoders=False`` builds encoders only (the student's tubes: the paper never trains or uses
    the student's decoders, SPEC §3.3).
    """

    granularities: tuple[Granularity, ...]
    num_classes: int
    with_decoders: bool = True

    @nn.compact
    def __call__(self, h: jax.Array, decode: bool = True):
        if h.ndim != 2:
            raise ValueError(f"analyzer expects the pooled feature [B, d], got shape {h.shape}")
        return {g.name: Tube(g.dim, self.num_classes, self.with_decoders, name=g.name)(h, decode)
                for g in self.granularities}
