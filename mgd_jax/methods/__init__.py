"""The baseline distillation methods: one module per method, each registering itself (``base.register``).

Importing the package imports every module in it, so a new method is one new file (README "Adding a method").
``get_method(name, **options)``, ``known_methods()`` (the README table's order: none, kd, hint, attention,
similarity, correlation, vid, crd, rkd, pkt, nst, kdsvd, fsp, abound, factor, afd; then any new ones).
"""
from __future__ import annotations

import importlib
import pkgutil

from mgd_jax.methods.base import PROTOCOLS, Method, MethodPairError, Outputs, get_method, known_methods, register

__all__ = ["PROTOCOLS", "Method", "MethodPairError", "Outputs", "get_method", "known_methods", "register"]

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
del _info
