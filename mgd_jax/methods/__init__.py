"""Registry of baseline distillation methods (``get_method(name)``).

This release ships ``none`` (no distillation term) and ``kd`` (Hinton KD: the logit-KD term of the objective,
no L_method); feature-based baselines register here with their auxiliary modules.
"""
from __future__ import annotations

from mgd_jax.methods.base import Method, Outputs  # noqa: F401

_REGISTRY: dict[str, Method] = {
    "none": Method("none"),
    "kd": Method("kd"),
}

def known_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(known_methods())}")
    return _REGISTRY[name]


def register(method: Method) -> None:
    _REGISTRY[method.name] = method
