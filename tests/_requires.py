"""Optional packages in the tests: a test that needs one skips where it is not installed, unless the environment
variable MGD_JAX_REQUIRE names it (comma-separated; CI names what each of its environments installed, .ci/run):
there a missing package fails the test that needs it, with a message naming the package, instead of a skip that
hides it.  Per test, not per module: the tests of a module that need nothing, or less, still run."""
from __future__ import annotations

import importlib
import os
from typing import Callable

import pytest

ENV = "MGD_JAX_REQUIRE"
INSTALL = {
    "torch": "pip install torch==2.13.0",
    "torchvision": "pip install torchvision==0.28.0",
    "jax2onnx": "pip install -e '.[export]'",
    "onnxruntime": "pip install -e '.[export]'",
}


def required() -> set[str]:
    """The packages MGD_JAX_REQUIRE names."""
    return {name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()}


def need(name: str, load: Callable[[], object] | None = None):
    """The package ``name`` (``load()``'s result where given, e.g. the project's own importer); where it cannot be
    imported, skips the calling test, or fails it when MGD_JAX_REQUIRE names the package."""
    try:
        return load() if load is not None else importlib.import_module(name)
    except ImportError as e:
        why = f"{type(e).__name__}: {e}"
    install = INSTALL.get(name, f"pip install {name}")
    if name in required():
        pytest.fail(f"{ENV} names {name!r} but it cannot be imported ({why}); install it: {install}", pytrace=False)
    pytest.skip(f"needs {name} ({install}; CI installs it and sets {ENV}): {why}")
