"""A lost peer in a multi-process run: every other process stops in one line, with the restartable status 75.

When one process of a multi-process run stops without notice (killed, crashed, out of memory, its host gone), JAX's
distributed runtime ends the others itself: the coordination service (in process 0) misses the lost process's
heartbeats for ``heartbeat_timeout_seconds``, or the others lose the service with process 0, and each survivor is
then *aborted from C++* (``LOG(FATAL)`` in the runtime's error-polling thread: SIGABRT and a fatal-error dump).  No
Python handler can turn that into a message and an exit status, so on several processes ``train.py`` supervises
its own worker:

* The supervisor (``run``) starts the same command again as its worker, with SIGTERM blocked until the worker's
  own handler is in place (train.py unblocks it; a notice is never lost to the default action), and dies with it
  (the worker gets SIGKILL when its supervisor is gone: ``PR_SET_PDEATHSIG``).  It forwards SIGTERM (a launcher that
  signals only the process it started, Kubernetes' PID 1, still reaches the worker) and ignores SIGINT (a terminal's
  Ctrl-C reaches the worker itself).  The worker's stdout is the supervisor's; its stderr passes through the
  supervisor line by line, except the runtime's error output (a Python traceback, the runtime's error and fatal
  log lines), which is held until the worker exits or ``heartbeat_timeout_seconds`` + 30 s pass.
* When the worker exits, the supervisor either exits as it did (the same status, or the same signal) with the
  held output passed on: success, a user error (its ``error: ...`` line, status 2), a preemption (75), or any
  failure of its own; or, when the worker's output shows that the runtime lost a peer, drops the dump and prints
  one line naming the lost process, the stage it was in and the stage's latest checkpoint step, and exits 75
  (``preemption.EXIT_CODE``: a requeueing script or restart policy runs the same command again, which resumes from
  that checkpoint).
* The worker (``is_worker``) writes where it is to a small status file (``note_process`` from
  ``distributed.maybe_initialize``, ``note_stage`` from the checkpoint store: the open stages and their latest
  committed step).  An uncaught exception in a worker prints its traceback and ends the process at once
  (``os._exit``: jax.distributed's exit barrier would wait for peers that wait for it), or, when it is the
  collective or coordination error of a lost peer, waits for the runtime to name that peer (at most the heartbeat
  timeout and a margin).  A user error (``settle``) lets process 0, which hosts the coordination service, outlive
  the others by a moment, so that an error every process meets at once (a NaN loss) is reported by each as its own.

One process needs none of this (``needed`` is False): ``train.py`` runs as before.
"""
from __future__ import annotations

import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

from mgd_jax.train import preemption

ENV = "MGD_JAX_WORKER_STATUS"  # set by the supervisor: its worker's status file (the worker's mark, too)
DEFAULT_HEARTBEAT_TIMEOUT = 60
HOLD_MARGIN = 30  # held error output is passed on when the worker lives this long past the heartbeat timeout
VERDICT_MARGIN = 15  # a worker with a peer's collective error waits the heartbeat timeout and this for the runtime
SETTLE_SECONDS = 2.0  # process 0's delay before exiting on a user error (the others exit first)

# -- the worker -------------------------------------------------------------------------------------------------

_status: dict = {}
_heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT


def is_worker() -> bool:
    return bool(os.environ.get(ENV))


def _write_status() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_status, f)
        os.replace(tmp, path)
    except OSError:  # the supervisor's temporary folder is gone: it reports without these details
        pass


def note_process(index: int, count: int, heartbeat_timeout: int) -> None:
    """The worker joined the run as process ``index`` of ``count``; installs the worker's exception hook."""
    global _heartbeat_timeout
    _heartbeat_timeout = int(heartbeat_timeout)
    _status.update(process=int(index), processes=int(count))
    _write_status()
    if is_worker() and sys.excepthook is not _excepthook:
        global _previous_hook
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook


def note_stage(name: str | None, latest_step: int | None, open_: bool = True) -> None:
    """Stage ``name``'s checkpoint store is open (``open_``) with ``latest_step`` its newest committed latest step
    (None: none yet), or closed.  A few hundred bytes written at each stage start, save and close.  The report
    names the open stages, else the ones closed since a stage last opened (an error closes the stages it leaves)."""
    if not name or not is_worker():
        return
    stages, closed = _status.setdefault("stages", {}), _status.setdefault("closed", {})
    if open_:
        closed.clear()
        stages.pop(name, None)  # re-inserted last: the most recent stage last
        stages[name] = None if latest_step is None else int(latest_step)
    elif name in stages:
        closed[name] = stages.pop(name)
    _write_status()


# A peer's loss as a collective or the coordination service reports it to Python (gloo on CPU; the service's
# barriers and key-value store, which orbax and the preemption sync use).
_PEER_ERROR = re.compile(r"gloo|connection (reset|closed|refused)|socket closed|broken pipe|coordination service|"
                         r"barrier|heartbeat|UNAVAILABLE|DEADLINE_EXCEEDED|peer", re.IGNORECASE)
_previous_hook = sys.excepthook


def _excepthook(exc_type, exc, tb) -> None:
    _previous_hook(exc_type, exc, tb)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    if not issubclass(exc_type, KeyboardInterrupt) and _PEER_ERROR.search(f"{exc_type.__name__}: {exc}"):
        # a lost peer: the runtime names it (its abort ends this process) within the heartbeat timeout
        deadline = time.time() + _heartbeat_timeout + VERDICT_MARGIN
        while time.time() < deadline:
            time.sleep(0.2)
    os._exit(130 if issubclass(exc_type, KeyboardInterrupt) else 1)


SAVE_STDERR = "stderr-during-save-"


def save_stderr_file():
    """A worker's file for its stderr during a checkpoint save (``checkpoint._stderr_during_save``), in its
    supervisor's folder: the runtime's report of a peer lost mid-save is written there, not to the pipe.  Deleted
    when closed; None outside a worker."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        return tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=SAVE_STDERR)
    except OSError:
        return None


def settle() -> None:
    """Before a worker exits on a user error: process 0 (the coordination service's host) waits a moment, so that
    the other processes meeting the same error (a NaN loss: all of them, at the same step) exit with it first
    rather than on the loss of the service."""
    if is_worker() and _status.get("process") == 0 and _status.get("processes", 1) > 1:
        time.sleep(SETTLE_SECONDS)


# -- what the runtime's output says -----------------------------------------------------------------------------

_TASK_TIMEOUT = re.compile(r"Task (\d+) heartbeat timeout")
_UNHEALTHY = re.compile(r"unhealthy \(stopped sending heartbeats\):\s*((?:\d+[ \t]*\n?[ \t]*)+)")
_COORDINATOR_GONE = re.compile(r"leader task was preempted/died/restarted|missing heartbeat response from the "
                               r"coordinator|Failed to send RPC to coordination service|Socket closed")
_SERVICE_ABORT = re.compile(r"JAX distributed service detected fatal errors|another task died|coordinator detected "
                            r"missing heartbeats")


def lost_processes(text: str) -> set[int] | None:
    """The processes that the runtime's output ``text`` says were lost (0: the coordination service's host), an
    empty set when it says a peer was lost without naming it, None when it says nothing of the kind."""
    ids = {int(m) for m in _TASK_TIMEOUT.findall(text)}
    for m in _UNHEALTHY.finditer(text):
        ids |= {int(t) for t in m.group(1).split()}
    if ids:
        return ids
    if _COORDINATOR_GONE.search(text):
        return {0}
    if _SERVICE_ABORT.search(text):
        return set()
    return None


def message(lost: set[int], status: dict, heartbeat_timeout: int) -> str:
    """The survivor's one line."""
    me, n = status.get("process"), status.get("processes")
    who = f"process {me} of {n}: " if me is not None and n else ""
    others = sorted(lost - {me}) if me is not None else sorted(lost)
    if others:
        names = ", ".join(f"process {i}" + (" (the coordinator)" if i == 0 else "") for i in others)
        what = f"{names} stopped (" + ("failed, was killed or ran out of memory, or its host went down: see its own "
                                       "output)" if len(others) == 1 else "see their own output)")
    elif lost:  # only this process: the service heard nothing from it for the heartbeat timeout
        what = f"the run's coordinator heard nothing from this process for {heartbeat_timeout} s and dropped it"
    else:
        what = "another process of the run stopped (see the other processes' output)"
    stages = status.get("stages") or status.get("closed") or {}
    if stages:
        where = "; ".join(f"[{name}] " + ("no checkpoint yet" if step is None else f"latest checkpoint at step {step}")
                          for name, step in stages.items())
    else:
        where = "between stages"
    return f"peer lost: {who}{what}; {where}; run the same command on every process to resume from there"


# -- the supervisor ---------------------------------------------------------------------------------------------

def needed(cfg) -> bool:
    """True in the process that the user or launcher started for a multi-process run (not in its worker)."""
    from mgd_jax.train import distributed

    return not is_worker() and distributed.plan(cfg) is not None


_HOLD = re.compile(rb"^(Traceback \(most recent call last\)|[EF]\d{4} \d\d:\d\d:\d\d|\*\*\* Check failure|"
                   rb"Fatal Python error|W\d{4} \d\d:\d\d:\d\d.*coordination service)")


def _pdeathsig(parent: int):
    def preexec():
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the worker outlives a killed supervisor
            pass
        if os.getppid() != parent:  # the supervisor died before the request above
            os._exit(1)
    return preexec


def _command() -> list[str]:
    argv = getattr(sys, "orig_argv", None)  # the interpreter's own options too (-u, -X ...)
    return [sys.executable, *(argv[1:] if argv else sys.argv)]


class _Relay:
    """The worker's stderr to ours, line by line; the runtime's error output held (see the module docstring)."""

    def __init__(self, fd: int, hold_seconds: float):
        self.fd, self.hold_seconds = fd, hold_seconds
        self.pending, self.pending_since, self.at_line_start = b"", 0.0, True
        self.held: list[bytes] = []
        self.hold_since = None
        self.seen = collections.deque(maxlen=2000)  # the last lines, for the verdict
        self.eof = False

    def _out(self, data: bytes) -> None:
        if data:
            try:
                os.write(2, data)
            except OSError:
                pass

    def _line(self, line: bytes) -> None:
        self.seen.append(line)
        if self.hold_since is None and self.at_line_start and _HOLD.match(line):
            self.hold_since = time.time()
        if self.hold_since is not None:
            self.held.append(line)
        else:
            self._out(line)
        self.at_line_start = True

    def pump(self, timeout: float) -> None:
        if self.eof:  # the worker closed its stderr (and lives on, or is ending)
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            data = os.read(self.fd, 1 << 16)
            if not data:
                self.eof = True
            else:
                if not self.pending:
                    self.pending_since = time.time()
                self.pending += data
                *lines, self.pending = self.pending.split(b"\n")
                for line in lines:
                    self._line(line + b"\n")
        now = time.time()
        if self.pending and self.hold_since is None and (b"\r" in self.pending or now - self.pending_since > 0.1):
            self.seen.append(self.pending)  # a progress bar's redraw, or a line written in pieces
            self._out(self.pending)
            self.pending, self.at_line_start = b"", False
        if self.hold_since is not None and now - self.hold_since > self.hold_seconds:
            self.release()  # the worker lived on: it was not the runtime's end

    def release(self) -> None:
        self._out(b"".join(self.held) + self.pending)
        self.held, self.pending, self.hold_since = [], b"", None

    def text(self) -> str:
        return (b"".join(self.seen) + self.pending).decode(errors="replace")


def heartbeat_timeout(cfg) -> int:
    """``config.distributed.heartbeat_timeout_seconds`` (JAX's ``heartbeat_timeout_seconds``), checked."""
    from mgd_jax.errors import ConfigError

    value = (cfg or {}).get("heartbeat_timeout_seconds", None)
    if value is None:
        return DEFAULT_HEARTBEAT_TIMEOUT
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        seconds = 0
    if seconds < 1 or seconds != value:
        raise ConfigError(f"config.distributed.heartbeat_timeout_seconds={value!r}: must be a whole number of "
                          f"seconds, at least 1 (how long a silent process counts as alive)")
    return seconds


def run(cfg, pending_sigterm=(), command: list[str] | None = None) -> int:
    """Run this command's worker and supervise it (see the module docstring); -> the exit status for the caller,
    or does not return (the worker's signal raised on this process).  ``pending_sigterm``: notices that this
    process kept before (train.py's early handler: a list, read after this function's handler is in place);
    ``command``: the worker's (tests), else this process's own command line."""
    hb = heartbeat_timeout(cfg)
    folder = tempfile.mkdtemp(prefix="mgd-jax-worker-")
    status_path = os.path.join(folder, "status.json")
    env = {**os.environ, ENV: status_path}
    sys.stdout.flush()
    sys.stderr.flush()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the worker starts with it blocked
    try:
        worker = subprocess.Popen(command or _command(), env=env, stderr=subprocess.PIPE,
                                  preexec_fn=_pdeathsig(os.getpid()))

        def forward(signum, frame):
            if worker.poll() is None:
                worker.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # Ctrl-C reaches the worker from the terminal
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a notice that came meanwhile is forwarded now
    if pending_sigterm:
        worker.send_signal(signal.SIGTERM)
    relay = _Relay(worker.stderr.fileno(), hb + HOLD_MARGIN)
    while worker.poll() is None:
        relay.pump(0.1)
    deadline = time.time() + 2.0  # the rest of its output (a child process of its own may hold the pipe open)
    while not relay.eof and time.time() < deadline:
        relay.pump(0.1)
    code = worker.wait()
    status, left = {}, b""
    try:
        with open(status_path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        pass
    for name in sorted(os.listdir(folder)):  # the output of a save that the worker did not live to replay
        if name.startswith(SAVE_STDERR):
            with open(os.path.join(folder, name), "rb") as f:
                left += f.read()
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    text = relay.text() + left.decode(errors="replace")
    lost = None if code in (0, 2, preemption.EXIT_CODE) else lost_processes(text)
    if lost is None:
        relay.held.append(left)
        relay.release()
        if code < 0:  # killed by a signal: the same signal here, so the launcher sees what happened
            sys.stdout.flush()
            if -code not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(-code, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {-code})
            os.kill(os.getpid(), -code)
            time.sleep(1)
            return 128 - code
        return code
    line = message(lost, status, hb)
    sys.stdout.flush()
    os.write(2, (line + "\n").encode())
    return preemption.EXIT_CODE
