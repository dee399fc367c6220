"""Deterministic fault injection at the loop's save boundaries, for the reliability tests.

``MGD_JAX_KILL_AT="<stage>:<point>[:<n>][,...]"`` makes the process SIGKILL itself the ``n``-th time (default 1)
stage ``<stage>`` (e.g. ``teacher``, ``analyzer``, ``student/mas_kd``) reaches ``<point>``:

    before_mid / after_mid        the mid-epoch ``latest`` checkpoint (``checkpoint.every_steps``)
    before_best / after_best      the epoch-end ``best`` checkpoint (only when it is saved)
    before_latest / after_latest  the epoch-end ``latest`` checkpoint
    mid_write                     inside any save: orbax is writing the step (asynchronously), nothing committed
    before_manifest               inside any save: orbax has written the step, our commit mark not yet

A real ``kill -9`` at exactly that moment, so a test can place a kill in each window between two saves instead
of hoping that random timing lands there.  Unset (always, outside tests), it costs one dictionary lookup.

``MGD_JAX_HOLD_AT="<stage>:<step>"`` holds every process at the step boundary after global step ``<step>`` of
``<stage>``: it prints ``hold: <stage> step <step>`` and waits (at most ``HOLD_SECONDS``) until a preemption notice
is pending, then goes on.  So a test sends SIGTERM mid-epoch at a known step instead of racing a seconds-long run.
Pending means: this process got SIGTERM under ``preemption.watch()``; or, with jax.distributed's preemption sync
manager (whose notices Python does not see), every process has reported its call counter to the coordination
service, i.e. the sync point is being fixed at the next call (XLA's key name, ``PREEMPTION_CURRENT_COUNTER/``).

``MGD_JAX_HOLD_AT="start-up:<point>"`` holds train.py at a start-up point (``main``: the config loaded, the devices
and jax.distributed not set up yet, only train.py's early SIGTERM handler in place, not the run's): it prints ``hold:
start-up <point>`` and waits (at most ``HOLD_SECONDS``) until that handler has kept a notice.  So a test sends
SIGTERM during start-up for certain, not racing the imports.
"""
from __future__ import annotations

import os
import signal
import sys
import time

ENV = "MGD_JAX_KILL_AT"
POINTS = ("before_mid", "after_mid", "before_best", "after_best", "before_latest", "after_latest", "mid_write",
          "before_manifest")
_hits: dict[tuple[str, str], int] = {}


def _targets(spec: str) -> dict[tuple[str, str], int]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: each entry is <stage>:<point>[:<n>], point one of {', '.join(POINTS)}")
        out[parts[0], parts[1]] = int(parts[2]) if len(parts) == 3 else 1
    return out


def point(stage: str | None, name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec or stage is None:
        return
    n = _targets(spec).get((stage, name))
    if n is None:
        return
    _hits[stage, name] = _hits.get((stage, name), 0) + 1
    if _hits[stage, name] == n:
        os.kill(os.getpid(), signal.SIGKILL)


HOLD_ENV = "MGD_JAX_HOLD_AT"
HOLD_SECONDS = 120
_SYNC_COUNTERS = "PREEMPTION_CURRENT_COUNTER/"  # xla/tsl preemption_sync_manager.cc


def hold(stage: str, step: int) -> None:
    spec = os.environ.get(HOLD_ENV)
    if not spec or spec.rsplit(":", 1) != [stage, str(step)]:
        return
    from jax._src import distributed

    from mgd_jax.train import preemption

    print(f"hold: {stage} step {step}", flush=True)
    state, deadline = distributed.global_state, time.time() + HOLD_SECONDS
    while time.time() < deadline:
        if preemption.notice_pending() or (
                state.client is not None and state.preemption_sync_manager is not None
                and len(state.client.key_value_dir_get(_SYNC_COUNTERS)) >= state.num_processes):
            print(f"hold: {stage} step {step} released by a preemption notice", flush=True)
            return
        time.sleep(0.01)
    print(f"hold: no preemption notice within {HOLD_SECONDS} s, going on", file=sys.stderr, flush=True)


def hold_start(point: str, pending) -> None:
    """Hold at start-up point ``point`` while ``MGD_JAX_HOLD_AT`` is ``start-up:<point>``, until ``pending()`` (a
    notice kept by the caller's own handler) or ``HOLD_SECONDS``."""
    if os.environ.get(HOLD_ENV) != f"start-up:{point}":
        return
    print(f"hold: start-up {point}", flush=True)
    deadline = time.time() + HOLD_SECONDS
    while time.time() < deadline:
        if pending():
            print(f"hold: start-up {point} released by a preemption notice", flush=True)
            return
        time.sleep(0.01)
    print(f"hold: no preemption notice within {HOLD_SECONDS} s, going on", file=sys.stderr, flush=True)
