"""Per-stage checkpoints with orbax: ``<stage>/checkpoints/latest`` (full train state, to resume) and
``<stage>/checkpoints/best`` (the stage's product: what later stages read).

Each checkpoint is an orbax Composite of ``state`` (arrays, no pickled code) and ``meta`` (JSON: architecture,
epoch, best metrics), so a workdir can be validated before anything is restored or compiled.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class StageMismatchError(ValueError):
    pass


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


class StageCheckpoints:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.latest = ocp.CheckpointManager(os.path.join(self.directory, "latest"), options=opts)
        self.best = ocp.CheckpointManager(os.path.join(self.directory, "best"),
                                          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    @staticmethod
    def _save(mngr, step: int, tree, meta: dict):
        tree = jax.tree.map(np.asarray, jax.device_get(tree))
        mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                  force=True)
        mngr.wait_until_finished()

    def save_latest(self, epoch: int, state, meta: dict):
        self._save(self.latest, epoch, state, meta)

    def save_best(self, epoch: int, export, meta: dict):
        self._save(self.best, epoch, export, meta)

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
