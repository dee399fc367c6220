"""Multi-host start-up: ``jax.distributed`` from the config or the environment.

Set ``config.distributed.coordinator_address`` / ``num_processes`` / ``process_id``, or the environment
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (config wins).  With one
process nothing is initialised.  On CPU the cross-process collectives use gloo.
"""
from __future__ import annotations

import os

from mgd_jax.errors import ConfigError


def settings(cfg) -> dict | None:
    cfg = cfg or {}

    def pick(key, env, cast):
        v = cfg.get(key, None)
        if v is None or v == "":
            v = os.environ.get(env)
        return None if v is None or v == "" else cast(v)

    n = pick("num_processes", "JAX_NUM_PROCESSES", int)
    if not n or n <= 1:
        return None
    addr = pick("coordinator_address", "JAX_COORDINATOR_ADDRESS", str)
    pid = pick("process_id", "JAX_PROCESS_ID", int)
    if addr is None or pid is None:
        raise ConfigError(f"distributed: {n} processes need a coordinator address and this process's id "
                         f"(config.distributed.* or JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID)")
    if not 0 <= pid < n:
        raise ConfigError(f"distributed: process_id={pid} is outside [0, {n})")
    timeout = int(cfg.get("timeout_seconds", None) or 300)
    return dict(coordinator_address=addr, num_processes=n, process_id=pid, initialization_timeout=timeout)


def maybe_initialize(cfg) -> bool:
    """Initialise jax.distributed when more than one process is configured; must run before any device use."""
    s = settings(cfg)
    if s is None:
        return False
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**s)
    return True
