"""Per-stage checkpoints with orbax: ``<stage>/checkpoints/latest`` (the full train state and the loop position,
to resume) and ``<stage>/checkpoints/best`` (the stage's product: what later stages read).

Each checkpoint is an orbax Composite of ``state`` (arrays; no pickled code) and ``meta`` (JSON: architecture,
loop position, best metrics), so a workdir is validated before anything is restored or compiled.

Integrity: orbax writes a step into a temporary folder and renames it when complete; after that we write a
manifest (SHA-256 of every file) as the commit mark.  On start, temporary folders (a kill during a write) and
steps without a manifest are removed; a step whose files do not match its manifest (truncated or altered) is
moved aside with a warning naming it, and the previous good step is used.
"""
from __future__ import annotations

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

MANIFEST = "mgd_manifest.json"
TMP_MARK = ".orbax-checkpoint-tmp"


class StageMismatchError(ValueError):
    pass


class CorruptCheckpointWarning(UserWarning):
    pass


def _abstract(tree):
    """Restore targets: replicated over all devices of this job, whatever topology wrote the checkpoint."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if jax.process_count() == 1:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
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


class StageCheckpoints:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.paths = {k: os.path.join(self.directory, k) for k in ("latest", "best")}
        if jax.process_index() == 0:
            for p in self.paths.values():
                sanitize(p)
        _sync(f"sanitize {self.directory}")
        self.latest = ocp.CheckpointManager(self.paths["latest"],
                                            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self.best = ocp.CheckpointManager(self.paths["best"],
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def _save(self, which: str, step: int, tree, meta: dict):
        mngr = getattr(self, which)
        if jax.process_count() == 1:
            tree = jax.tree.map(np.asarray, jax.device_get(tree))
        mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                  force=True)
        mngr.wait_until_finished()
        if jax.process_index() == 0:
            write_manifest(os.path.join(self.paths[which], str(int(step))))
        _sync(f"manifest {which} {step}")

    def save_latest(self, step: int, state, meta: dict):
        self._save("latest", step, state, meta)

    def save_best(self, epoch: int, export, meta: dict):
        self._save("best", epoch, export, meta)

    @staticmethod
    def _meta(mngr) -> dict | None:
        step = mngr.latest_step()
        if step is None:
            return None
        return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def latest_meta(self) -> dict | None:
        return self._meta(self.latest)

    def best_meta(self) -> dict | None:
        return self._meta(self.best)

    @staticmethod
    def _restore(mngr, like) -> tuple[Any, dict]:
        step = mngr.latest_step()
        r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like)),
                                                       meta=ocp.args.JsonRestore()))
        return r["state"], dict(r["meta"])

    def restore_latest(self, like):
        return self._restore(self.latest, like)

    def restore_best(self, like):
        return self._restore(self.best, like)

    def close(self):
        self.latest.close()
        self.best.close()


def check_meta(meta: dict, expected: dict, where: str) -> None:
    """Refuse a checkpoint made for another setup (e.g. another architecture) with one line naming it."""
    for k, v in expected.items():
        if k in meta and meta[k] != v:
            raise StageMismatchError(
                f"{where} was written for {k}={meta[k]!r} but the config asks for {k}={v!r}; "
                f"use another --workdir or delete {where}")
