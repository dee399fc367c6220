"""Registry of baseline distillation methods: ``get_method(name)``.

none (no distillation term), kd (Hinton KD: only the objective's logit-KD term), hint (FitNet), attention (AT),
similarity (SP), correlation (CC), vid, crd, rkd, pkt, nst, kdsvd, fsp, abound (AB), factor (FT), afd.
"""
from __future__ import annotations

from mgd_jax.methods.base import Method, MethodPairError, Outputs  # noqa: F401

_REGISTRY: dict[str, Method] = {
    "none": Method("none"),
    "kd": Method("kd"),
}


def _register_zoo():
    from mgd_jax.methods import zoo
    for m in zoo.ALL:
        _REGISTRY[m.name] = m


_register_zoo()


def known_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str, **options) -> Method:
    """The registered method, with ``options`` overriding its fields (e.g. crd: nce_k=4096, mode='relax')."""
    import dataclasses

    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(known_methods())}")
    m = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(m)}
    bad = sorted(set(options) - fields)
    if bad:
        raise ValueError(f"method {name!r} has no option {bad[0]!r}; options: {', '.join(sorted(fields - {'name'}))}")
    return dataclasses.replace(m, **options) if options else m


def register(method: Method) -> None:
    _REGISTRY[method.name] = method
