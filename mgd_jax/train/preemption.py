"""Preemption: a notice becomes a checkpoint at the current step and a clean exit, so the restart redoes no step.

Preemptible hosts get SIGTERM some time before they are stopped (Cloud TPU / GCE spot and preemptible VMs,
SLURM's ``scancel``, time limit and preemption, Kubernetes evictions).  The loop asks ``requested()`` at every step
boundary inside an epoch and after every epoch's checkpoint; when it answers yes, the loop saves the latest
checkpoint at that step (with the position in the epoch, as ``checkpoint.every_steps`` does) on every process and
raises ``Preempted``; train.py reports it in one line and exits with ``EXIT_CODE``.  The same command resumes.

Several processes must stop at the same step (the save is collective):

* with ``jax.distributed`` (any multi-process run) JAX's preemption sync manager catches SIGTERM itself (a C
  handler, installed by ``jax.distributed.initialize``); a notice to any one process reaches all of them, and
  ``multihost_utils.reached_preemption_sync_point`` answers yes on every process at the same call: the one after
  the furthest process's.  It costs microseconds a call; every process makes the same calls in the same order,
  and nothing else may call it (orbax's CheckpointManager would, with its checkpoint steps: ``checkpoint._Manager``).
* otherwise ``watch()`` (train.py, for the whole run; main thread only, the previous handler restored after)
  turns SIGTERM into a flag.  One process reads the flag; several processes without the sync manager
  (``jax_enable_preemption_service`` turned off) all-gather their flags at every call (3.5 ms a call measured on 2
  CPU processes with gloo, and a wait for the step before it: only for that case).
"""
from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped by a preemption notice, checkpoint saved; run it again

_notice = threading.Event()  # set by the SIGTERM handler (one process, or no preemption sync manager)
_watching = False
_calls = 0  # this process's calls of requested(): the same sequence on every process


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint was saved (not an error: train.py exits EXIT_CODE)."""


def _sync_manager():
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager if distributed.global_state.client else None


def _on_sigterm(signum, frame):
    _notice.set()


@contextlib.contextmanager
def watch():
    """SIGTERM -> a preemption notice for ``requested()``, for the duration of the block.  Nothing to do where
    jax.distributed's preemption sync manager listens already (a Python handler would replace its handler), or
    outside the main thread (Python delivers signals there only)."""
    global _watching
    if _sync_manager() is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _watching = True
    try:
        yield
    finally:
        _watching = False
        signal.signal(signal.SIGTERM, previous)


def notify() -> None:
    """A notice that arrived before ``watch()`` (train.py keeps one from its start-up)."""
    _notice.set()


def notice_pending() -> bool:
    """This process received SIGTERM under ``watch()`` (the sync manager's notices are not visible here)."""
    return _notice.is_set()


def requested() -> bool:
    """True when every process should stop at this call (the same answer on every process)."""
    global _calls
    _calls += 1
    manager = _sync_manager()
    if manager is not None:
        return bool(manager.reached_sync_point(_calls))
    if not _watching:
        return False
    import jax

    if jax.process_count() == 1:
        return _notice.is_set()
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(_notice.is_set()))))
