"""Test setup: 4 virtual CPU devices (multi-device tests), quiet logs, fixture paths."""
import os
import pathlib
import sys

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole suite: the xdist workers and the train.py processes the tests
# start inherit it (the controller loads this file first, and removes the folder at the end).  The random-SIGKILL
# test drops it from its children's environment (a process killed at any moment may be writing an entry; the
# fault-injection kills happen at checkpoint saves, outside compilation).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mgd-jax-test-xla-cache-")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `configs` is a top-level folder of the repository, not of the package
    sys.path.insert(0, str(ROOT))

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

from absl import logging as _absl_logging  # noqa: E402

_absl_logging.set_verbosity(_absl_logging.WARNING)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, worker_id):
    """configs/smoke.py trained once per test run (1 device) for the tests that only read a finished workdir.

    One xdist worker trains it (a file lock in the run's shared base folder); every worker gets its own copy, so a
    test that writes beside the checkpoints (evaluate's eval_test.json, say) never races another worker."""
    import fcntl
    import pickle
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # xdist: one base folder per worker below it
    shared, done = root / "smoke_shared" / "w", root / "smoke_shared" / "summary.pickle"
    with open(root / "smoke_shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            import jax

            from configs import smoke
            from mgd_jax import pipeline

            shutil.rmtree(shared, ignore_errors=True)
            summary = pipeline.train_and_evaluate(smoke.get_config(), str(shared), devices=jax.devices()[:1])
            done.write_bytes(pickle.dumps(summary))
    work = tmp_path_factory.mktemp("smoke") / "w"
    shutil.copytree(shared, work, ignore=shutil.ignore_patterns(".jax_cache"))
    return str(work), pickle.loads(done.read_bytes())


# The longest tests (child processes training the smoke config several times) start first, so that with
# `pytest -n 2` they do not end up alone at the end of the run.
_SLOW_FIRST = ("test_reliability.py::test_kill_at_each_save_boundary", "test_multihost.py::",
               "test_reliability.py::test_sigkill_at_random_moments", "test_fused_students.py::test_a_kill",
               "test_sweep.py::test_sweep_runs", "test_imagenet_multihost.py::", "test_pods.py::test_preempted")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: next((i for i, s in enumerate(_SLOW_FIRST) if s in item.nodeid), len(_SLOW_FIRST)))


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller (or a run without xdist) made it
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
