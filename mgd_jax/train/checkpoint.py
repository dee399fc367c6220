"""Per-stage checkpoints with orbax: ``<stage>/checkpoints/latest`` (the full train state and the loop position,
to resume) and ``<stage>/checkpoints/best`` (the stage's product: what later stages read).

Each checkpoint is an orbax Composite of ``state`` (arrays; no pickled code) and ``meta`` (JSON: architecture,
loop position, best metrics), so a workdir is validated before anything is restored or compiled.

Integrity: orbax writes a step into a temporary folder and renames it when complete; after that we write a
manifest (SHA-256 of every file) as the commit mark.  On start, temporary folders (a kill during a write) and
steps without a manifest are removed; a step whose files do not match its manifest (truncated or altered) is
moved aside with a warning naming it, and the previous good step is used.

Saves are idempotent: a step that already exists with its manifest is complete, so saving it again (a run
killed between the ``best`` and the ``latest`` save redoes that epoch) keeps it instead of failing.  A full
disk is reported in one line (``DiskFullError``) naming the directory and the space a checkpoint needs; the
half-written step is removed on the next start, which resumes from the last complete checkpoint.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mgd_jax.errors import DiskFullError, StageMismatchError  # noqa: F401 - raised here
from mgd_jax.train import faults, supervisor

MANIFEST = "mgd_manifest.json"
TMP_MARK = ".orbax-checkpoint-tmp"


class CorruptCheckpointWarning(UserWarning):
    pass


class StageIdentityWarning(UserWarning):
    pass


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (tensorstore reports it as text: RESOURCE_EXHAUSTED ... No space)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(directory: str, doing: str, cause: BaseException) -> DiskFullError:
    return DiskFullError(f"no space left on the device of {directory} {doing}; free some space and rerun the same "
                         f"command: it resumes from the last complete checkpoint")


class _stderr_during_save:
    """File descriptor 2 goes to a temporary file while orbax saves and is replayed afterwards, so that nothing
    is lost; after a full disk the replay is dropped and, when ``QUIET_AFTER_DISK_FULL`` is set (train.py, which
    is about to exit), fd 2 stays on /dev/null: orbax's and tensorstore's threads keep printing tracebacks of
    their failed writes for a while, and the one-line error goes to ``real_stderr_fd()``."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._file = supervisor.save_stderr_file() or tempfile.TemporaryFile()  # a worker's: its supervisor reads it
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb):
        import sys

        sys.stderr.flush()
        disk_full = exc is not None and _is_disk_full(exc)
        if disk_full and QUIET_AFTER_DISK_FULL:
            global _REAL_STDERR
            _REAL_STDERR = self._saved
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        else:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            if not disk_full:
                self._file.seek(0)
                data = self._file.read()
                if data:
                    os.write(2, data)
        self._file.close()
        return False


QUIET_AFTER_DISK_FULL = False
_REAL_STDERR = None


def real_stderr_fd() -> int:
    """The process's stderr (fd 2 unless a full disk redirected it, see ``_stderr_during_save``)."""
    return 2 if _REAL_STDERR is None else _REAL_STDERR


class _quiet_orbax:
    """Orbax logs each failed write's traceback at ERROR (hundreds of lines on a full disk) before it raises:
    the exception carries the cause, so its log is silenced for the duration of a save."""

    def __enter__(self):
        from absl import logging as absl_logging
        self._absl, self._level = absl_logging, absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.FATAL)

    def __exit__(self, *exc):
        self._absl.set_verbosity(self._level)
        return False


def write_atomic(path: str, text: str) -> None:
    """A result file is either the old or the new one, never half-written (a kill mid-write)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if _is_disk_full(e):
            raise disk_full_error(os.path.dirname(path), f"while writing {os.path.basename(path)}", e) from e
        raise


def _tree_mib(tree) -> float:
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)) / 2 ** 20


def _abstract(tree):
    """Restore targets: replicated over all devices of this job, whatever topology wrote the checkpoint.  Several
    processes: on the loop's mesh (all devices, ``mesh.DATA``), so the restored state goes into the steps as it is
    (arrays on another mesh, even of the same devices, are refused by the jitted steps)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mgd_jax.train import mesh as mesh_lib

    if jax.process_count() == 1:
        sharding = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
    else:
        sharding = NamedSharding(mesh_lib.make_mesh(), PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def _digest_files(step_dir: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(step_dir):
        for f in sorted(files):
            if f.startswith(MANIFEST):
                continue
            p = os.path.join(root, f)
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[os.path.relpath(p, step_dir)] = h.hexdigest()
    return out


def write_manifest(step_dir: str) -> None:
    digests = _digest_files(step_dir)
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(digests, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> str | None:
    """None if the step is complete and intact, else the reason."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return "incomplete (no manifest: the write was interrupted)"
    try:
        with open(path) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return "its manifest is unreadable"
    actual = _digest_files(step_dir)
    for name, digest in expected.items():
        if name not in actual:
            return f"file {name} is missing"
        if actual[name] != digest:
            return f"file {name} does not match its checksum"
    extra = sorted(set(actual) - set(expected))
    if extra:
        return f"unexpected file {extra[0]}"
    return None


def sanitize(directory: str) -> list[str]:
    """Remove half-written steps, move corrupted ones aside; returns the warnings given."""
    notes = []
    if not os.path.isdir(directory):
        return notes
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if TMP_MARK in name:
            shutil.rmtree(path, ignore_errors=True)
            continue
        if not (name.isdigit() and os.path.isdir(path)):
            continue
        why = verify_step(path)
        if why is None:
            continue
        if why.startswith("incomplete"):
            shutil.rmtree(path, ignore_errors=True)
            continue
        aside = os.path.join(directory, f"corrupt-{name}-{int(time.time())}")
        os.rename(path, aside)
        msg = f"checkpoint {path} is corrupted ({why}); moved to {aside}, using the previous good step"
        warnings.warn(msg, CorruptCheckpointWarning, stacklevel=2)
        notes.append(msg)
    return notes


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class _Manager(ocp.CheckpointManager):
    """orbax's manager, except that it does not ask jax.distributed's preemption sync point: it would pass its
    checkpoint step as the call counter (``save`` asks, even with ``force``), and the sync manager keeps one
    counter per process, which the loop's own calls must advance one by one (``train/preemption.py``).  The loop
    decides when to save for a preemption; orbax only logged it."""

    def reached_preemption(self, step: int) -> bool:
        return False


class StageCheckpoints:
    """``latest`` (the newest ``keep`` steps) and ``best`` (one step) of a stage.

    Old steps are deleted by us, only after the new step's manifest is written (orbax's ``max_to_keep`` would
    delete the previous step before our commit mark: a kill in between left no complete step at all)."""

    def __init__(self, directory: str, keep: int = 2, name: str | None = None):
        self.directory = os.path.abspath(directory)
        self.name = name  # the stage's name for fault injection (train/faults.py)
        self.paths = {k: os.path.join(self.directory, k) for k in ("latest", "best")}
        self.keep = {"latest": max(1, int(keep)), "best": 1}
        if jax.process_index() == 0:
            for p in self.paths.values():
                sanitize(p)
        _sync(f"sanitize {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
        try:
            with _quiet_orbax():
                self.latest = _Manager(self.paths["latest"], options=options)
                self.best = _Manager(self.paths["best"], options=options)
        except Exception as e:  # noqa: BLE001 - only a full disk becomes a user error
            if not _is_disk_full(e):
                raise
            raise disk_full_error(self.directory, "while creating its checkpoint folders", e) from e
        if self.name and supervisor.is_worker():  # a multi-process worker's whereabouts, for a peer-loss report
            supervisor.note_stage(self.name, self.latest.latest_step())

    def _prune(self, which: str) -> None:
        """Delete committed steps older than the newest ``keep``: renamed to a temporary name first, so a kill
        mid-delete leaves a folder that the next start removes, never a step with missing files."""
        if jax.process_index() == 0:
            d = self.paths[which]
            steps = sorted(int(n) for n in os.listdir(d)
                           if n.isdigit() and os.path.exists(os.path.join(d, n, MANIFEST)))
            for step in steps[:-self.keep[which]]:
                doomed = os.path.join(d, f"{step}{TMP_MARK}-pruned")
                os.rename(os.path.join(d, str(step)), doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        _sync(f"prune {self.paths[which]}")
        getattr(self, which).reload()

    def _save(self, which: str, step: int, tree, meta: dict) -> bool:
        """Save ``tree`` as step ``step`` of ``which``; False if that step is already complete (kept as is)."""
        mngr = getattr(self, which)
        step_dir = os.path.join(self.paths[which], str(int(step)))
        if os.path.exists(os.path.join(step_dir, MANIFEST)):
            return False  # committed earlier (verified at start): a redone epoch computes the same values
        try:
            if jax.process_count() == 1:
                tree = jax.tree.map(np.asarray, jax.device_get(tree))
            with _stderr_during_save(), _quiet_orbax():
                mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
                faults.point(self.name, "mid_write")
                mngr.wait_until_finished()
            faults.point(self.name, "before_manifest")
            if jax.process_index() == 0:
                write_manifest(step_dir)
        except Exception as e:  # noqa: BLE001 - only a full disk is turned into a user error; the rest re-raises
            self._failed = True
            if not _is_disk_full(e):
                raise
            raise disk_full_error(self.paths[which], f"while saving step {int(step)} (a checkpoint of this stage "
                                                     f"needs about {_tree_mib(tree):.1f} MiB)", e) from e
        _sync(f"manifest {which} {step}")
        if which == "latest":
            supervisor.note_stage(self.name, int(step))
        self._prune(which)
        return True

    def save_latest(self, step: int, state, meta: dict) -> bool:
        return self._save("latest", step, state, meta)

    def save_best(self, epoch: int, export, meta: dict) -> bool:
        return self._save("best", epoch, export, meta)

    @staticmethod
    def _meta(mngr, step=None) -> dict | None:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def latest_meta(self, step: int | None = None) -> dict | None:
        """The metadata of the newest ``latest`` step (or of ``step``)."""
        return self._meta(self.latest, step)

    def latest_steps(self) -> list[int]:
        """The committed ``latest`` steps, oldest first (the newest ``keep``)."""
        return sorted(self.latest.all_steps())

    def best_meta(self) -> dict | None:
        return self._meta(self.best)

    @staticmethod
    def _restore(mngr, like, legacy=None, step=None) -> tuple[Any, dict]:
        step = mngr.latest_step() if step is None else step

        def restore(target):
            return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)),
                                                              meta=ocp.args.JsonRestore()))
        try:
            r = restore(like)
            return r["state"], dict(r["meta"])
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
        if legacy is not None:  # a checkpoint of an earlier version's layout: read it in that layout, convert
            old_like, convert = legacy(like)
            try:
                r = restore(old_like)
                return convert(r["state"]), dict(r["meta"])
            except ValueError as e:
                if "tree structures do not match" not in str(e):
                    raise
        raise StageMismatchError(
            f"{mngr.directory}/{step}: the checkpoint's variables are laid out differently from what this version of "
            f"mgd-jax trains (written by another version, or for another setup); finish the stage with the version "
            f"that started it, or move that stage's folder away to retrain it") from None

    def restore_latest(self, like, legacy=None, step: int | None = None):
        """The newest latest step (or ``step``) restored onto ``like``'s structure; ``legacy(like) -> (old_like,
        convert)`` reads a checkpoint written in an earlier layout."""
        return self._restore(self.latest, like, legacy, step)

    def restore_best(self, like, legacy=None):
        return self._restore(self.best, like, legacy)

    def close(self):
        supervisor.note_stage(self.name, None, open_=False)
        if getattr(self, "_failed", False):
            # after a failed write, closing would stop orbax's event loop under its still-pending write callbacks,
            # each of which then prints a traceback; the error on its way up already says what happened
            return
        self.latest.close()
        self.best.close()


def flatten_config(prefix: str, value) -> dict:
    """A (nested) config -> ``{'prefix.a.b': value}``, the form stage identities are stored and compared in."""
    if hasattr(value, "items"):
        out = {}
        for k, v in sorted(value.items()):
            out.update(flatten_config(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def _plain(v):
    """JSON's view of a value (tuples become lists), so stored and expected values compare alike."""
    return json.loads(json.dumps(v))


# Config fields added after configs were stored with checkpoints, whose absence from a stored config means a
# behaviour other than their default: {field: the value a checkpoint without it was written with}.  A run's own
# config always carries them where they apply (``data.sources.with_current_defaults``), so only an old stored
# config lacks one.  A key may be an fnmatch pattern ('*': one student's name).
ADDED_FIELDS = {
    "config.data.split": "sklearn",  # the digits' split before the field existed (DIGITS_OLD_SPLIT)
    "config.students.*.seed": -1,  # a student at the run's seed, before students had seeds (stages.common.RUN_SEED)
}


def added_fields(fields) -> dict:
    """{field: the value a checkpoint written before it existed was written with} for those of ``fields`` that
    ``ADDED_FIELDS`` names."""
    out = {}
    for field in fields:
        for pattern, old in ADDED_FIELDS.items():
            if fnmatch.fnmatchcase(field, pattern):
                out[field] = old
    return out


def check_meta(meta: dict, expected: dict, where: str) -> None:
    """Refuse a checkpoint made for another setup with one line naming the first field that differs.

    ``expected['config']`` (if given) is a flat ``{field: value}`` of every config value that changes the stage's
    result.  Fields are compared where both sides have them: a checkpoint written before a field existed (or
    before identities were stored at all) stays resumable."""
    stage_dir = where.rsplit("/checkpoints", 1)[0]
    advice = f"use another --workdir, or delete {stage_dir} (and the stages trained after it)"
    if "config" in expected and "config" not in meta and not meta.get("imported"):
        warnings.warn(f"{where} was written before configs were stored with checkpoints: a changed loss weight, "
                      f"schedule or option cannot be detected for it", StageIdentityWarning, stacklevel=2)
    for k, v in expected.items():
        if k == "config" and isinstance(meta.get(k), dict):
            stored = {**added_fields(v), **meta[k]}
            for field in sorted(set(stored) & set(v)):
                a, b = stored[field], _plain(v[field])
                if a != b:
                    how = (f", or --{field}={a!r} to finish it as it was started"
                           if field in added_fields([field]) and field not in meta[k] else "")
                    raise StageMismatchError(
                        f"{where} was written for {field}={a!r} but the config asks for {field}={b!r}; {advice}{how}")
        elif k != "config" and k in meta and meta[k] != _plain(v):
            raise StageMismatchError(
                f"{where} was written for {k}={meta[k]!r} but the config asks for {k}={v!r}; {advice}")
