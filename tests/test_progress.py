"""What a person watching a run reads: a line when a step compiles (with its seconds), a bar on a terminal whose
clock starts after compilation, one short line per epoch, the summary's path; every metric still in metrics.jsonl;
only process 0 prints.  A toy stage through the real loop (seconds)."""
import io
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mgd_jax import optim, pipeline
from mgd_jax.stages.common import best_by, best_per_member
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train import progress as progress_lib
from mgd_jax.train.loop import StageSpec, evaluate_dataset, fit
from mgd_jax.train.progress import epoch_lines, epoch_lr

OPTIMIZER = ml_collections.ConfigDict({"lr": 0.1, "milestones": (1,), "gamma": 0.1})
EPOCH_LINE = re.compile(r"^\[(?P<name>[^\]]+)\] epoch (?P<epoch>\d+)/(?P<epochs>\d+)  loss (?P<loss>\d+\.\d{4})  "
                        r"top-1 (?P<top1>\d+\.\d\d)%  best (?P<best>\d+\.\d\d)%  lr (?P<lr>[0-9.e-]+)  "
                        r"(?P<seconds>\d+\.\d) s$")


def _toy_fit(tmp_path, name="toy", n=10, progress=False, epochs=2):
    """A linear classifier of 2x2 images into 3 classes through the loop: batch 4 over n=10 rows (4, 4, 2: the
    epoch's last batch is smaller and compiles again), evaluation through ``evaluate_dataset``."""
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 2, 2, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, n).astype(np.int32)
    ds = type("DS", (), dict(train_images=images, train_labels=labels))()

    def logits_of(w, image):
        return image.reshape(image.shape[0], -1).astype(jnp.float32) / 255.0 @ w

    def step(state, frozen, batch, key):
        def loss_fn(w):
            logp = jax.nn.log_softmax(logits_of(w, batch["image"]))
            return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], 1))

        loss, g = jax.value_and_grad(loss_fn)(state["w"])
        acc = jnp.mean(jnp.argmax(logits_of(state["w"], batch["image"]), -1) == batch["label"])
        return {"w": state["w"] - 0.5 * g}, {"loss": loss, "loss/ce": loss, "acc1": acc,
                                               "grad_norm": jnp.linalg.norm(g)}

    @jax.jit
    def eval_step(w, batch):
        correct = (jnp.argmax(logits_of(w, batch["image"]), -1) == batch["label"]) * batch["mask"]
        return {"acc1": jnp.sum(correct), "acc5": jnp.sum(batch["mask"])}

    state = mesh_lib.replicate({"w": jnp.zeros((4, 3))}, mesh)
    spec = StageSpec(name=name, directory=str(tmp_path / name), num_epochs=epochs, batch_size=4, seed=0,
                     meta={"stage": name}, passes=[(name, jax.jit(step, donate_argnums=0))],
                     evaluate=lambda s: evaluate_dataset(lambda b: eval_step(s["w"], b), images, labels, 4, mesh),
                     improve=best_by("test/acc1"), export=lambda s, prev, imp: {"w": s["w"]}, progress=progress,
                     lr=epoch_lr(OPTIMIZER))
    fit(spec, state, None, ds, mesh, {"w": np.zeros((4, 3), np.float32)})
    return spec


def _index(lines, start):
    return next(i for i, ln in enumerate(lines) if ln.startswith(start))


def _rows(spec):
    with open(os.path.join(spec.directory, "metrics.jsonl")) as f:
        return [json.loads(r) for r in f]


def test_piped_output_says_what_compiles_and_one_short_line_per_epoch(tmp_path, capsys):
    spec = _toy_fit(tmp_path)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out  # piped (not a terminal): no bar
    assert lines.count("compiling the toy step...") == 1
    assert lines.count("compiling the toy step for a batch of 2...") == 1  # the epoch's last, smaller batch
    assert lines.count("compiling the toy evaluation step...") == 1
    for what in ("toy step", "toy step for a batch of 2", "toy evaluation step"):
        done = [ln for ln in lines if re.fullmatch(rf"compiled the {what} in \d+\.\d s", ln)]
        assert len(done) == 1, (what, out)
    epochs = [m for m in map(EPOCH_LINE.match, lines) if m]
    assert [(m["name"], m["epoch"], m["epochs"], m["lr"]) for m in epochs] == [("toy", "1", "2", "0.1"),
                                                                               ("toy", "2", "2", "0.01")], out
    assert all(len(m.string) < 100 for m in epochs)
    first = lines.index(epochs[0].string)
    assert lines.index("compiling the toy step...") < _index(lines, "compiled the toy step in") < first
    assert _index(lines, "compiled the toy evaluation step in") < first

    rows = _rows(spec)  # every metric of every epoch stays in metrics.jsonl; the line shows a few of them
    assert [r["epoch"] for r in rows] == [1, 2]
    for r, m in zip(rows, epochs):
        assert set(r) == {"epoch", "train/loss", "train/loss/ce", "train/acc1", "train/grad_norm", "test/acc1",
                          "test/acc5", "epoch_seconds", "host_rss_mib"}
        assert m["loss"] == f"{r['train/loss']:.4f}" and m["top1"] == f"{100 * r['test/acc1']:.2f}"
        assert m["seconds"] == f"{r['epoch_seconds']:.1f}"
    assert epochs[1]["best"] == f"{100 * max(r['test/acc1'] for r in rows):.2f}"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_starts_after_compiling_and_the_epoch_lines_stay(tmp_path, monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    _toy_fit(tmp_path, progress=True)
    monkeypatch.undo()
    out = term.getvalue()
    assert "\r" in out and "toy:" in out  # tqdm's bar, redrawn in place
    pieces = [p.strip() for p in re.split(r"[\r\n]", out) if p.strip()]
    bars = [p for p in pieces if p.startswith("toy:")]
    assert bars and re.search(r"\b1/6\b", bars[0]) and not any(re.search(r"\b0/6\b", b) for b in bars), bars
    assert _index(pieces, "compiled the toy step in") < pieces.index(bars[0])  # made once the first step compiled
    epochs = [p for p in pieces if EPOCH_LINE.match(p)]
    assert [EPOCH_LINE.match(p)["epoch"] for p in epochs] == ["1", "2"]  # whole lines above the bar, kept
    for line in epochs:
        assert "\n" + line + "\n" in out.replace("\r", "\n")


def test_only_process_0_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress_lib, "is_first_process", lambda: False)
    spec = _toy_fit(tmp_path)
    out = capsys.readouterr().out
    assert "compil" not in out and "epoch" not in out, out
    assert len(_rows(spec)) == 2  # the metrics are written all the same (the writer is process 0's)


def test_epoch_lines_name_each_member_as_the_summary_table():
    analyzer = {"train/loss/16d_T2": 2.3, "train/loss/32d_T8": 2.25, "train/acc1/16d_T2": 0.1,
                "test/acc1/16d_T2": 0.11, "test/acc1/32d_T8": 0.07, "test/acc5/16d_T2": 0.6,
                "test/acc5/32d_T8": 0.5, "test/teacher/acc1": 0.15}
    improve, _ = best_per_member(["16d_T2", "32d_T8"], "test/{metric}/{name}", lambda s, nm: None)
    best, _ = improve({}, {k: v for k, v in analyzer.items() if k.startswith("test/")}, 0)
    lines = epoch_lines("analyzer", 0, 30, analyzer, best, 0.01, 12.34)
    assert lines == ["[analyzer 16d_T2] epoch 1/30  loss 2.3000  top-1 11.00%  best 11.00%  lr 0.01  12.3 s",
                     "[analyzer 32d_T8] epoch 1/30  loss 2.2500  top-1 7.00%  best 7.00%  lr 0.01  12.3 s"]

    mutual = {"train/loss": 3.5, "test/peer0/acc1": 0.5, "test/peer1/acc1": 0.25, "test/peer0/acc5": 0.9,
              "test/peer1/acc5": 0.8}
    lines = epoch_lines("mutual", 239, 240, mutual, {"peer0": {"acc1": 0.6}, "peer1": {"acc1": 0.3}}, None, 100.0)
    assert lines == ["[mutual peer0] epoch 240/240  loss 3.5000  top-1 50.00%  best 60.00%  100.0 s",
                     "[mutual peer1] epoch 240/240  loss 3.5000  top-1 25.00%  best 30.00%  100.0 s"]

    student = {"train/loss": 0.5, "train/loss/ce": 2.0, "train/acc1": 0.3, "test/acc1": 0.7512, "test/acc5": 0.9,
               "epoch_seconds": 41.0, "host_rss_mib": 1000.0, "train/grad_norm": 1.0}
    (line,) = epoch_lines("student/kd_mas", 9, 240, student, {"test/acc1": 0.76, "epoch": 3}, 0.05 * 0.1 ** 3, 41.04)
    assert line == "[student/kd_mas] epoch 10/240  loss 0.5000  top-1 75.12%  best 76.00%  lr 5e-05  41.0 s"
    assert len(line) < 100


def test_epoch_lr_is_the_schedule_of_the_optimizer():
    cfg = ml_collections.ConfigDict({"lr": 0.05, "milestones": (3, 6, 9), "gamma": 0.1})
    steps = 5
    schedule = optim.multistep_schedule(cfg.lr, cfg.milestones, cfg.gamma, steps)
    lr = epoch_lr(cfg)
    for epoch in range(12):  # every step of the epoch runs at the epoch's rate
        for s in range(epoch * steps, (epoch + 1) * steps):
            assert lr(epoch) == pytest.approx(float(schedule(s)), rel=1e-6), (epoch, s)


def test_the_summary_path_is_printed(tmp_path, capsys, monkeypatch):
    rows = [{"stage": "teacher", "model": "resnet8", "best_acc1": 0.5, "last_acc1": 0.4, "best_acc5": 0.9,
             "last_acc5": 0.9, "best_epoch": 1}]
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "runs" / "x"
    work.mkdir(parents=True)
    pipeline._write_summary(rows, str(work))
    out = capsys.readouterr().out
    assert "| teacher | resnet8 | 50.00 | 40.00 | 90.00 | 90.00 | 1 |" in out
    assert "results: runs/x/summary.md and runs/x/summary.json\n" in out  # as typed, below the working directory
    assert "every epoch's metrics: runs/x/<stage>/metrics.jsonl" in out
    assert json.load(open(work / "summary.json")) == rows

    monkeypatch.chdir(work)
    other = tmp_path / "elsewhere"
    other.mkdir()
    pipeline._write_summary(rows, str(other))
    assert f"results: {other}/summary.md and {other}/summary.json\n" in capsys.readouterr().out
