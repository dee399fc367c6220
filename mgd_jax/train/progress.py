"""What a person watching a run reads on stdout while a stage trains (every metric goes to metrics.jsonl and
TensorBoard; this is the short version).

* ``compiling the teacher step...`` then ``compiled the teacher step in 21.3 s``: the first step of each pass of a
  stage (and of the epoch's last batch where it is smaller), and its first evaluation, compile before they run.
  The loop blocks on that one step's result (never on the others), so the seconds are the compilation's plus one
  step's.
* On a terminal, a tqdm bar made once the first step has compiled, so its rate and ETA count trained steps only;
  a later compilation (a second pass, the evaluation) is taken out of its clock.  Other lines are written above
  the bar, so the epoch history stays on the screen.  Piped (not a terminal), or with ``config.progress = False``,
  no bar: the lines alone.
* One line per epoch, per member of a stage that trains several side by side (the analyzer's granularities,
  mutual learning's peers, fused students), named by the stage (``student/<name>``) and member (``analyzer
  64d_T2``, ``mutual peer0``): ``[teacher] epoch 3/240  loss 1.2340  top-1 45.67%  best 46.01%  lr 0.05  41.2 s``
  (the epoch's mean train loss, test top-1, best test top-1 so far, the epoch's learning rate, the epoch's seconds
  with its evaluation and, in the first epoch, the compilations).

Only process 0 prints (``enabled``).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time

from tqdm.auto import tqdm


def is_first_process() -> bool:
    """Only process 0 of a multi-process run prints."""
    import jax

    return jax.process_index() == 0


class Timer:
    """``seconds``: measured by ``Progress.compiling``; the block may set it to the part that compiled."""

    seconds: float | None = None


class Progress:
    """The lines and the bar of one stage (or of a group of stages trained in lockstep).

    ``total`` / ``done``: the stage's steps in all and done before this run (a resumed stage); ``bar``: show a
    progress bar (``config.progress`` and stdout is a terminal); ``enabled``: print at all (process 0)."""

    def __init__(self, label: str, total: int, done: int, *, bar: bool, enabled: bool | None = None):
        self.label, self.total, self.done = label, int(total), int(done)
        self.enabled = is_first_process() if enabled is None else bool(enabled)
        self.want_bar = bool(bar) and self.enabled
        self.bar = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            tqdm.write(text, file=sys.stdout)  # above the bar: the bar is redrawn below it
            sys.stdout.flush()
        else:
            print(text, flush=True)

    @contextlib.contextmanager
    def compiling(self, what: str):
        """Announce ``what`` compiling, time the block, say how long it took; the bar's clock skips that time."""
        self.line(f"compiling the {what}...")
        timer = Timer()
        t0 = time.perf_counter()
        yield timer
        seconds = time.perf_counter() - t0 if timer.seconds is None else timer.seconds
        self.line(f"compiled the {what} in {seconds:.1f} s")
        self.exclude(seconds)

    def exclude(self, seconds: float) -> None:
        """Take ``seconds`` out of the bar's elapsed time and rate (tqdm's clock: ``start_t``, ``last_print_t``)."""
        if self.bar is not None and hasattr(self.bar, "start_t") and hasattr(self.bar, "last_print_t"):
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def advance(self, n: int = 1) -> None:
        """``n`` more steps done; the bar starts at the first call (after the first, compiling, step)."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.want_bar:
            self.bar = tqdm(total=self.total, initial=self.done, desc=self.label, unit="step", leave=False,
                            dynamic_ncols=True, file=sys.stdout, mininterval=1.0)

    def postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _members(metrics: dict) -> list[str]:
    """The members a stage's test metrics name: ``test/acc1`` -> [''] (one), ``test/acc1/<g>`` (the analyzer's
    granularities) and ``test/<peer>/acc1`` (mutual learning's peers) -> their names; [] without a top-1."""
    if "test/acc1" in metrics:
        return [""]
    names = []
    for k in metrics:
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "test" and parts[1] == "acc1":
            names.append(parts[2])
        elif len(parts) == 3 and parts[0] == "test" and parts[2] == "acc1" and parts[1] != "teacher":
            names.append(parts[1])
    return names


def _first(metrics: dict, *keys):
    for k in keys:
        if k in metrics:
            return metrics[k]
    return None


def epoch_lines(name: str, epoch: int, num_epochs: int, metrics: dict, best: dict, lr: float | None,
                seconds: float) -> list[str]:
    """The short lines of one finished epoch (``epoch``: 0-based) of stage ``name``: one per member.

    ``metrics``: the epoch's ``train/...`` and ``test/...`` means; ``best``: the stage's best so far (``best_by``:
    ``{'test/acc1': ...}``; ``best_per_member``: ``{member: {'acc1': ...}}``)."""
    tail = ([f"lr {lr:g}"] if lr is not None else []) + [f"{seconds:.1f} s"]
    members = _members(metrics)
    if not members:  # a stage without a top-1 (e.g. an init stage fitting features): its loss
        loss = _first(metrics, "train/loss", "test/loss")
        fields = [] if loss is None else [f"loss {loss:.4f}"]
        return ["  ".join([f"[{name}] epoch {epoch + 1}/{num_epochs}", *fields, *tail])]
    lines = []
    for member in members:
        if member:
            label = f"{name} {member}"
            top1 = _first(metrics, f"test/acc1/{member}", f"test/{member}/acc1")
            loss = _first(metrics, f"train/loss/{member}", f"train/{member}/loss", "train/loss")
            b = best.get(member)
            best1 = b.get("acc1") if isinstance(b, dict) else None
        else:
            label, top1, loss, best1 = name, metrics["test/acc1"], metrics.get("train/loss"), best.get("test/acc1")
        fields = [f"[{label}] epoch {epoch + 1}/{num_epochs}"]
        if loss is not None:
            fields.append(f"loss {loss:.4f}" if math.isfinite(loss) else f"loss {loss}")
        fields += [f"top-1 {_pct(top1)}", f"best {_pct(best1)}"]
        lines.append("  ".join(fields + tail))
    return lines


def epoch_lr(optimizer) -> callable:
    """``optimizer`` (lr, milestones, gamma: ``optim.sgd``'s config) -> ``lr(epoch)``, the rate of the 0-based
    epoch under the per-epoch multi-step schedule (``optim.multistep_schedule``): lr * gamma^{#milestones <= e}."""
    lr, gamma = float(optimizer.lr), float(optimizer.gamma)
    milestones = [int(m) for m in optimizer.milestones]

    def at(epoch: int) -> float:
        return lr * gamma ** sum(m <= epoch for m in milestones)

    return at
