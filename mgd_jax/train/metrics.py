"""Per-epoch metrics as JSON lines and TensorBoard events; the end-of-run summary table (markdown + JSON)."""
from __future__ import annotations

import json
import math
import os


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(metrics: dict, stage: str, epoch: int) -> None:
    for k, v in metrics.items():
        if k.startswith("loss") and not math.isfinite(v):
            raise NonFiniteLossError(f"{stage}: loss term {k!r} became {v} in epoch {epoch + 1}; "
                                     f"the last good checkpoint is kept")


class MetricWriter:
    """``write(epoch, {...})`` appends one JSON line to ``metrics.jsonl`` and scalars to TensorBoard."""

    def __init__(self, directory: str, tensorboard: bool = True):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, epoch: int, metrics: dict) -> None:
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), epoch + 1)
            self._tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop rows of epochs that are redone (a kill after logging but before checkpointing)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [r for r in f if r.strip() and json.loads(r)["epoch"] <= epoch]
        with open(self.path, "w") as f:
            f.writelines(rows)

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
