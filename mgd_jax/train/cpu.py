"""CPU setup: one XLA device per core.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so ``configure_host_devices`` must run before
anything touches a device (train.py and the benchmarks call it first).  It changes nothing that the user
already set in ``XLA_FLAGS``, and it only affects the CPU platform (a GPU or TPU run keeps its accelerators as
the default devices).

Why one device per core: XLA:CPU runs one step's ops on a shared thread pool, and many of a CNN step's ops
(small convolutions, BatchNorm reductions, transposes) use one core.  With one device per core the batch is
split and each core runs its half of every op: the MAS+KD resnet56 -> resnet20 step went from 421 to 350
ms on 2 cores (benchmarks/step_speed.py, README "Speed").
"""
from __future__ import annotations

import os
import sys

DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_host_devices(count: int | None = None) -> int | None:
    """Adds ``--xla_force_host_platform_device_count`` to XLA_FLAGS unless it is there already.

    ``count``: None (one device per core), a count, or 0 (leave XLA's default, one CPU device).
    Returns the count that was set, or None when nothing was changed.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags or count == 0:
        return None
    if "jax" in sys.modules:
        from jax._src import xla_bridge
        if xla_bridge.backends_are_initialized():  # too late: XLA_FLAGS was read already
            return None
    n = num_cores() if count is None else int(count)
    if n < 1:
        raise ValueError(f"cpu_devices must be None (one per core), a positive count or 0, got {count!r}")
    os.environ["XLA_FLAGS"] = f"{flags} --{DEVICE_COUNT_FLAG}={n}".strip()
    return n
