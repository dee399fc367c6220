"""The three stages, end to end: teacher -> analyzer -> students.  ``train_and_evaluate(config, workdir)``.

Each stage runs itself (``mgd_jax/stages/<stage>.py: run``); this module only checks the run, orders the stages
and writes the summary.

Workdir layout::

    <workdir>/teacher/                  metrics.jsonl, tensorboard/, checkpoints/{latest,best}
    <workdir>/analyzer/                 same; best = each granularity's best tubes (by its decoder's accuracy)
    <workdir>/students/<name>/          same, one per entry of ``config.students``
    <workdir>/summary.{md,json}         the results table
"""
from __future__ import annotations

import json
import os

import jax

from mgd_jax.config_validation import check_data_sizes, validate_config
from mgd_jax.data import load_dataset
from mgd_jax.errors import ConfigError
from mgd_jax.stages import analyzer as analyzer_stage
from mgd_jax.stages import mutual as mutual_stage
from mgd_jax.stages import student as student_stage
from mgd_jax.stages import teacher as teacher_stage
from mgd_jax.stages.common import StageRun, result_row, stage_config
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.data.sources import with_current_defaults
from mgd_jax.train.checkpoint import StageCheckpoints, check_meta, write_atomic
from mgd_jax.train.metrics import summary_markdown


def _check_workdir(config, workdir):
    """Refuse, before any compilation or any file is written, a workdir whose stage checkpoints were made for
    another setup (any stage: teacher, analyzer, each student and its init stage, mutual learning)."""
    expect = {"teacher": {"arch": config.teacher.arch, "config": stage_config(config, "teacher")},
              "analyzer": {"teacher_arch": config.teacher.arch,
                           "granularities": [[int(d), float(t)] for d, t in config.granularities],
                           "config": stage_config(config, "analyzer")}}
    if config.get("mutual", None) is not None:
        expect = {"mutual": {"config": stage_config(config, "mutual")}}
    else:
        for name in config.students:
            fp = {"config": stage_config(config, "student", name)}
            expect[f"students/{name}"] = fp
            expect[f"students/{name}/init"] = fp
    for stage, exp in expect.items():
        d = os.path.join(workdir, stage, "checkpoints")
        if os.path.isdir(d):
            ck = StageCheckpoints(d)
            try:
                for which, meta in (("latest", ck.latest_meta()), ("best", ck.best_meta())):
                    if meta is not None:
                        check_meta(meta, exp, f"{d}/{which}")
            finally:
                ck.close()


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
    """Runs (or resumes) every stage of ``config`` in ``workdir``; returns and writes the summary."""
    config = with_current_defaults(config)  # stored with every checkpoint and in config.json
    validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r}: not writable ({e.strerror})") from None
    _check_workdir(config, workdir)
    mesh = mesh_lib.make_mesh(devices)
    ndev = mesh.devices.size
    for stage in ("teacher", "analyzer", "student"):
        if config[stage].batch_size % ndev:
            raise ConfigError(f"config.{stage}.batch_size={config[stage].batch_size}: the global batch must be "
                              f"divisible by the {ndev} devices of the mesh")
    ds = load_dataset(config.data)
    student_stage.check_pairs(config, ds.num_classes, ds.image_shape)
    check_data_sizes(config, len(ds.train_labels), len(ds.test_labels))
    if jax.process_index() == 0:  # what was run, for evaluation tools and people: only once every check passed
        write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    print(f"data: {ds.name} train {ds.train_images.shape} test {ds.test_images.shape}; "
          f"mesh: {mesh.devices.size} x {mesh.devices.flat[0].platform}", flush=True)
    run = StageRun(config, workdir, ds, mesh)

    if config.get("mutual", None) is not None:  # a training mode of its own: peers, no teacher
        rows = mutual_stage.run(run)
        _report_reads(ds)
        return _write_summary(rows, workdir)
    teacher, result = teacher_stage.run(run)
    rows = [result_row("teacher", config.teacher.arch, result)]
    teacher, result = analyzer_stage.run(run, teacher)
    for g in teacher.analyzer.granularities:
        best, last = result["best"].get(g.name, {}), result["last"]
        rows.append({"stage": f"analyzer {g.name}", "model": f"{config.teacher.arch} decoder",
                     "best_acc1": best.get("acc1"), "best_acc5": best.get("acc5"), "best_epoch": best.get("epoch"),
                     "last_acc1": last.get(f"test/acc1/{g.name}"), "last_acc5": last.get(f"test/acc5/{g.name}")})
    results = student_stage.run_all(run, teacher)
    for name, scfg in config.students.items():
        _, result = results[name]
        mode = "baseline" if scfg.get("protocol", "mg") == "repdistiller" else scfg.granularity
        rows.append(result_row(f"student {name} ({scfg.method} / {mode})", config.student.arch, result))
    _report_reads(ds)
    return _write_summary(rows, workdir)


def _report_reads(ds):
    """A streaming dataset: how many images this process read (each process reads only its shard of a batch)."""
    if getattr(ds, "streaming", False):
        skipped = f", skipped {len(ds.skipped)} unreadable" if ds.skipped else ""
        print(f"data: process {jax.process_index()}/{jax.process_count()} read {ds.decoded['train']} training and "
              f"{ds.decoded['test']} evaluation images{skipped}", flush=True)


def _write_summary(rows, workdir):
    table = summary_markdown(rows)
    if jax.process_index() == 0:
        write_atomic(os.path.join(workdir, "summary.md"), table)
        write_atomic(os.path.join(workdir, "summary.json"), json.dumps(rows, indent=1))
        print("\n" + table, flush=True)
        where = _shown_path(workdir)
        print(f"results: {os.path.join(where, 'summary.md')} and {os.path.join(where, 'summary.json')}\n"
              f"every epoch's metrics: {os.path.join(where, '<stage>', 'metrics.jsonl')} (TensorBoard: "
              f"{os.path.join(where, '<stage>', 'tensorboard')})", flush=True)
    return {"rows": rows, "table": table}


def _shown_path(path: str) -> str:
    """``path`` as a person would type it here: relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel
