"""Mixed precision: compute in a low dtype (bfloat16), keep float32 parameters, statistics and losses.

``with_compute_dtype(model, dtype)`` wraps a Flax backbone so that ``apply`` casts the floating parameters and
the input to ``dtype`` and casts the outputs (logits, features) back to float32.  Gradients flow through the
casts, so optimizer updates and parameters stay float32; BatchNorm computes its batch statistics in float32
(``models.layers.BatchNorm``) and its running statistics stay float32.  ``dtype=None`` (float32, the default
and the paper's setting) returns the model unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str | None):
    """Config value -> dtype (None for float32)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


class MixedPrecision:
    """A backbone whose ``apply`` computes in ``dtype``; ``init`` and everything else are the model's."""

    def __init__(self, module, dtype):
        self.module, self.dtype = module, jnp.dtype(dtype)

    def __getattr__(self, name):
        return getattr(self.module, name)

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def apply(self, variables, x, *args, **kwargs):
        variables = dict(variables, params=_cast(variables["params"], self.dtype))
        out = self.module.apply(variables, x.astype(self.dtype), *args, **kwargs)
        return _cast(out, jnp.float32)

    def __repr__(self):
        return f"MixedPrecision({self.module!r}, {self.dtype})"

    def __eq__(self, other):  # equal wrappers of equal modules: one program (students sharing a vmapped step)
        return isinstance(other, MixedPrecision) and (self.module, self.dtype) == (other.module, other.dtype)

    def __hash__(self):
        return hash((MixedPrecision, self.module, self.dtype))


def with_compute_dtype(model, dtype):
    dtype = compute_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    return model if dtype is None else MixedPrecision(model, dtype)
