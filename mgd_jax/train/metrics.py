"""Per-epoch metrics as JSON lines and TensorBoard events; the end-of-run summary table (markdown + JSON)."""
from __future__ import annotations

import json
import math
import os

from mgd_jax.errors import NonFiniteLossError  # noqa: F401 - raised here


def check_finite(metrics: dict, stage: str, epoch: int) -> None:
    for k, v in metrics.items():
        if k.startswith("loss") and not math.isfinite(v):
            raise NonFiniteLossError(f"{stage}: loss term {k!r} became {v} in epoch {epoch + 1}; "
                                     f"the last good checkpoint is kept")


def _epoch_of(line: str):
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a kill or a full disk


class MetricWriter:
    """``write(epoch, {...})`` appends one JSON line to ``metrics.jsonl`` and scalars to TensorBoard.

    ``start_epoch`` (on resume): rows of epochs after it are dropped from ``metrics.jsonl`` (atomically) and
    TensorBoard purges its events after it, so a redone epoch is logged once."""

    def __init__(self, directory: str, tensorboard: bool = True, start_epoch: int = 0):
        from mgd_jax.train.checkpoint import _is_disk_full, disk_full_error

        self.directory = directory
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        try:
            os.makedirs(directory, exist_ok=True)
            self._truncate_after(start_epoch)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"),
                                         purge_step=start_epoch + 1 if start_epoch else None)
        except OSError as e:
            if _is_disk_full(e):
                raise disk_full_error(directory, "while writing its metrics", e) from e
            raise

    def write(self, epoch: int, metrics: dict) -> None:
        from mgd_jax.train.checkpoint import _is_disk_full, disk_full_error

        row = {"epoch": epoch + 1, **{k: float(v) for k, v in metrics.items()}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for k, v in metrics.items():
                    self._tb.add_scalar(k, float(v), epoch + 1)
                self._tb.flush()
        except OSError as e:
            if _is_disk_full(e):
                raise disk_full_error(self.directory, "while writing its metrics", e) from e
            raise

    def _truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs that are redone (a kill after logging but before checkpointing), and a last line
        cut short; the file is replaced atomically, so a kill here loses nothing."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [r if r.endswith("\n") else r + "\n" for r in f if r.strip()]
        rows = [r for r in lines if (e := _epoch_of(r)) is not None and e <= epoch]
        if rows == lines:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(r) for r in f if r.strip()]


def summary_markdown(rows: list[dict]) -> str:
    """rows: {stage, model, metric columns...} -> a markdown table (percentages with 2 decimals)."""
    cols = ["stage", "model", "best top-1", "last top-1", "best top-5", "last top-5", "best epoch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        def pct(k):
            v = r.get(k)
            return "-" if v is None else f"{100 * v:.2f}"
        lines.append(f"| {r['stage']} | {r['model']} | {pct('best_acc1')} | {pct('last_acc1')} | "
                     f"{pct('best_acc5')} | {pct('last_acc5')} | {r.get('best_epoch', '-')} |")
    return "\n".join(lines) + "\n"
