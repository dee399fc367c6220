"""The three stages, end to end: teacher -> analyzer -> students.  ``train_and_evaluate(config, workdir)``.

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
import jax.numpy as jnp

from mgd_jax import optim, precision
from mgd_jax.analyzer import GranularityAnalyzer, parse_granularities
from mgd_jax.config_validation import ConfigError, validate_config
from mgd_jax.data import load_dataset
from mgd_jax.data.augment import eval_transform
from mgd_jax.methods import get_method
from mgd_jax.models import LOW_LR_ARCHITECTURES, get_model
from mgd_jax.stages import analyzer as analyzer_stage
from mgd_jax.stages import student as student_stage
from mgd_jax.stages import teacher as teacher_stage
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import StageCheckpoints, check_meta, flatten_config
from mgd_jax.train.loop import StageSpec, evaluate_dataset, fit
from mgd_jax.train.metrics import summary_markdown

TEACHER_SEED_OFFSET, ANALYZER_SEED_OFFSET, STUDENT_SEED_OFFSET = 0, 1, 2

# Config fields that do not change a stage's numbers (where the data lives, how it reaches the devices).
_NOT_RESULT_FIELDS = ("data.data_dir", "data.on_device")


def stage_config(config, stage: str, student: str | None = None) -> dict:
    """Every config value that changes ``stage``'s result, flat as ``{'config.teacher.optimizer.lr': 0.05, ...}``.

    Stored in each checkpoint's metadata and compared on resume (``checkpoint.check_meta``), so a changed loss
    weight, temperature, granularity, seed, schedule or method option is refused instead of silently continuing
    the old run.  A stage includes the fields of the stages it reads (a student: its teacher's and analyzer's)."""
    def fields(*names):
        out = {}
        for name in names:
            if name in config:
                out.update(flatten_config(f"config.{name}", config[name]))
        return out

    common = {k: v for k, v in fields("seed", "data", "augment", "drop_remainder", "precision").items()
              if k[len("config."):] not in _NOT_RESULT_FIELDS}
    if stage == "mutual":
        return {**common, **fields("mutual", "granularities")}
    teacher = {**common, **fields("teacher")}
    if stage == "teacher":
        return teacher
    analyzer = {**teacher, **fields("analyzer", "granularities")}
    if stage == "analyzer":
        return analyzer
    if stage in ("student", "student_init"):
        return {**analyzer, **fields("student"), **flatten_config(f"config.students.{student}", config.students[student])}
    raise ValueError(f"unknown stage {stage!r}")


def _best_by(key: str):
    def improve(best, metrics, epoch):
        v = metrics[key]
        if not best or v > best[key]:  # strict, as the reference
            return {key: v, "epoch": epoch + 1, **{k: metrics[k] for k in metrics if k != key}}, ["all"]
        return best, []
    return improve


def _loop_options(config) -> dict:
    ck = config.get("checkpoint", None) or {}
    return dict(drop_remainder=config.drop_remainder, progress=config.progress,
                checkpoint_every_steps=int(ck.get("every_steps", 0) or 0), keep_checkpoints=int(ck.get("keep", 2)),
                on_device=_data_on_device(config))


def _data_on_device(config) -> bool:
    """``data.on_device``: True / False, or None = on for GPU / TPU (the host path is as fast on CPU)."""
    v = config.data.get("on_device", None)
    return jax.default_backend() != "cpu" if v is None else bool(v)


def _best_per_member(names, key_format: str, product):
    """Best-so-far per member (granularity tube, DML peer), each by its own test top-1 (strictly better).

    -> (improve, export) for StageSpec: the export holds each member's product at its own best epoch."""
    def improve(best, metrics, epoch):
        best, improved = dict(best), []
        for nm in names:
            v = metrics[key_format.format(metric="acc1", name=nm)]
            if nm not in best or v > best[nm]["acc1"]:
                best[nm] = {"acc1": v, "acc5": metrics[key_format.format(metric="acc5", name=nm)], "epoch": epoch + 1}
                improved.append(nm)
        return best, improved

    def export(state, prev, improved):
        prev = dict(prev) if prev is not None else {nm: product(state, nm) for nm in names}
        for nm in improved:
            prev[nm] = product(state, nm)
        return prev

    return improve, export


def _variables(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def _model(config, arch, num_classes):
    """The backbone ``arch``, computing in ``config.precision`` (float32 by default)."""
    return precision.with_compute_dtype(get_model(arch, num_classes), config.get("precision", "float32"))


def _steps_per_epoch(n, batch_size, mesh, drop):
    return mesh_lib.steps_per_epoch(n, batch_size, mesh.devices.size, drop)


def run_teacher(config, workdir, ds, mesh):
    cfg = config.teacher
    model = _model(config, cfg.arch, ds.num_classes)
    tx = optim.sgd(cfg.optimizer, _steps_per_epoch(len(ds.train_labels), cfg.batch_size, mesh, config.drop_remainder))
    key = jax.random.key(config.seed * 1000 + TEACHER_SEED_OFFSET)
    sample = eval_transform(ds.train_images[:2], config.augment)
    state = mesh_lib.replicate(teacher_stage.init_state(model, tx, key, sample), mesh)
    step = jax.jit(teacher_stage.make_train_step(model, tx, config.augment), donate_argnums=0)
    eval_step = jax.jit(teacher_stage.make_eval_step(model, config.augment))

    def train_step(state, frozen, batch, key):
        return step(state, batch, key)

    spec = StageSpec(
        name="teacher", directory=os.path.join(workdir, "teacher"), num_epochs=cfg.epochs,
        batch_size=cfg.batch_size, seed=config.seed * 1000 + TEACHER_SEED_OFFSET,
        meta={"stage": "teacher", "arch": cfg.arch, "num_classes": ds.num_classes,
              "config": stage_config(config, "teacher")},
        passes=[("teacher", train_step)],
        evaluate=lambda s: evaluate_dataset(lambda b: eval_step(_variables(s), b), ds.test_images, ds.test_labels,
                                            config.eval_batch_size, mesh),
        improve=_best_by("test/acc1"), export=lambda s, prev, imp: _variables(s),
        **_loop_options(config))
    _, export, result = fit(spec, state, None, ds, mesh, jax.device_get(_variables(state)))
    return model, mesh_lib.replicate(export, mesh), result


def run_analyzer(config, workdir, ds, mesh, t_model, t_vars):
    cfg = config.analyzer
    grans = parse_granularities(config.granularities)
    analyzer = GranularityAnalyzer(grans, ds.num_classes)
    names = tuple(g.name for g in grans)
    n = len(ds.train_labels)
    spe = _steps_per_epoch(n, cfg.batch_size, mesh, config.drop_remainder)
    tx = optim.sgd(cfg.optimizer, spe)  # each granularity's optimizer steps once per batch of its own pass
    feat_dim = t_model.apply(jax.device_get(t_vars), eval_transform(ds.train_images[:1], config.augment))[1][-1].shape[-1]
    seed = config.seed * 1000 + ANALYZER_SEED_OFFSET
    states = mesh_lib.replicate(analyzer_stage.init_states(analyzer, tx, jax.random.key(seed), feat_dim), mesh)
    groups = [names] if cfg.shared_pass else [(nm,) for nm in names]
    passes = []
    for grp in groups:
        step = jax.jit(analyzer_stage.make_train_step(t_model, analyzer, tx, config.augment, grp), donate_argnums=0)
        passes.append(("+".join(grp), step))
    eval_step = jax.jit(analyzer_stage.make_eval_step(t_model, analyzer, config.augment))

    improve, export = _best_per_member(names, "test/{metric}/{name}", lambda st, nm: st[nm].params)

    spec = StageSpec(
        name="analyzer", directory=os.path.join(workdir, "analyzer"), num_epochs=cfg.epochs,
        batch_size=cfg.batch_size, seed=seed,
        meta={"stage": "analyzer", "teacher_arch": config.teacher.arch, "num_classes": ds.num_classes,
              "granularities": [[g.dim, g.temperature] for g in grans], "config": stage_config(config, "analyzer")},
        passes=passes,
        evaluate=lambda s: evaluate_dataset(lambda b: eval_step(t_vars, {nm: s[nm].params for nm in names}, b),
                                            ds.test_images, ds.test_labels, config.eval_batch_size, mesh),
        improve=improve, export=export, **_loop_options(config))
    like = jax.device_get({nm: states[nm].params for nm in names})
    _, tubes, result = fit(spec, states, t_vars, ds, mesh, like)
    return analyzer, mesh_lib.replicate(tubes, mesh), result


def _student_method(scfg):
    options = dict(scfg.get("method_options", None) or {})
    return get_method(scfg.method, **options)


def run_student(config, name, scfg, workdir, ds, mesh, t_model, t_vars, t_analyzer, t_tubes):
    grans = parse_granularities(config.granularities)
    obj = student_stage.Objective(
        mode=scfg.granularity, granularities=grans, temperature=scfg.temperature, w_ce=scfg.weights.ce,
        w_logit_kd=scfg.weights.logit_kd, w_method=scfg.weights.method, w_granularity=scfg.weights.granularity)
    method = _student_method(scfg)
    s_model = _model(config, config.student.arch, ds.num_classes)
    s_analyzer = None if scfg.granularity == "none" else GranularityAnalyzer(grans, ds.num_classes, False)
    s_mods = student_stage.StudentModules(s_model, s_analyzer, method)
    t_mods = student_stage.TeacherModules(t_model, t_analyzer)
    teacher = {"backbone": t_vars, "analyzer": t_tubes}
    cfg = config.student
    n = len(ds.train_labels)
    spe = _steps_per_epoch(n, cfg.batch_size, mesh, config.drop_remainder)
    tx = optim.sgd(cfg.optimizer, spe)
    seed = config.seed * 1000 + STUDENT_SEED_OFFSET
    sample = eval_transform(ds.train_images[:2], config.augment)
    ctx = {"num_train": n}
    host_teacher = jax.device_get(teacher)
    state = student_stage.init_state(s_mods, t_mods, host_teacher, tx, jax.random.key(seed), sample, ctx)
    directory = os.path.join(workdir, "students", name)
    meta = {"stage": "student", "arch": cfg.arch, "teacher_arch": config.teacher.arch, "method": scfg.method,
            "granularity": scfg.granularity, "num_classes": ds.num_classes,
            "config": stage_config(config, "student", name)}
    extras = None
    if method.needs_contrast:
        from mgd_jax.data.contrast import ContrastSampler
        extras = ContrastSampler(ds.train_labels, method.nce_k, method.mode, seed)

    if method.has_init_stage:  # AB / FT / FSP: SPEC_BASELINES §3
        icfg = scfg.init
        itx = optim.sgd(icfg.optimizer, spe)
        istate = student_stage.init_stage_state(s_mods, t_mods, host_teacher, state, itx, jax.random.key(seed),
                                                sample, ctx)
        istep = jax.jit(student_stage.make_init_step(s_mods, t_mods, itx, config.augment), donate_argnums=0)
        ieval = jax.jit(student_stage.make_init_eval_step(s_mods, config.augment))
        ispec = StageSpec(
            name=f"student/{name}/init", directory=os.path.join(directory, "init"), num_epochs=icfg.epochs,
            batch_size=cfg.batch_size, seed=seed + 7, meta={**meta, "stage": "student_init"},
            passes=[("init", istep)],
            evaluate=lambda st: evaluate_dataset(lambda b: ieval(st, b), ds.test_images, ds.test_labels,
                                                 config.eval_batch_size, mesh),
            improve=lambda best, metrics, epoch: ({**metrics, "epoch": epoch + 1}, ["last"]),
            export=lambda st, prev, imp: st, **_loop_options(config))
        istate_like = jax.device_get(istate)
        _, iexport, _ = fit(ispec, mesh_lib.replicate(istate, mesh), teacher, ds, mesh, istate_like)
        state = student_stage.finish_init_stage(s_mods, iexport, state, tx)

    state = mesh_lib.replicate(state, mesh)
    step = jax.jit(student_stage.make_train_step(s_mods, t_mods, obj, tx, config.augment), donate_argnums=0)
    eval_step = jax.jit(student_stage.make_eval_step(s_mods, config.augment))
    spec = StageSpec(
        name=f"student/{name}", directory=directory, num_epochs=cfg.epochs,
        batch_size=cfg.batch_size, seed=seed, meta=meta, passes=[("student", step)],
        evaluate=lambda s: evaluate_dataset(lambda b: eval_step(_variables(s), b), ds.test_images, ds.test_labels,
                                            config.eval_batch_size, mesh),
        improve=_best_by("test/acc1"), export=lambda s, prev, imp: _variables(s),
        **_loop_options(config), batch_extras=extras)
    _, export, result = fit(spec, state, teacher, ds, mesh, jax.device_get(_variables(state)))
    return export, result


def check_methods(config, num_classes: int, image_shape) -> None:
    """Refuse, before anything is trained, a method that cannot work for the configured pair."""
    from mgd_jax.methods import Outputs

    x = jnp.zeros((2, *image_shape), jnp.float32)
    outs = {}
    for who in ("teacher", "student"):
        model = get_model(config[who].arch, num_classes)
        for preact in (False, True):
            logits, feats = jax.eval_shape(lambda m=model, p=preact: m.apply(m.init(jax.random.key(0), x), x,
                                                                              preact=p))
            outs[who, preact] = Outputs(logits, feats)
    for name, scfg in config.students.items():
        m = _student_method(scfg)
        m.check_pair(config.student.arch, config.teacher.arch, outs["student", m.init_student_preact],
                     outs["teacher", m.teacher_preact])


def run_mutual(config, workdir, ds, mesh):
    """Deep mutual learning of ``config.mutual.peers`` (with the granularity tubes when ``granularity``)."""
    from mgd_jax.stages import mutual

    cfg = config.mutual
    models = [_model(config, a, ds.num_classes) for a in cfg.peers]
    grans = parse_granularities(config.granularities) if cfg.granularity else ()
    analyzer = GranularityAnalyzer(grans, ds.num_classes, with_decoders=False) if grans else None
    spe = _steps_per_epoch(len(ds.train_labels), cfg.batch_size, mesh, config.drop_remainder)
    txs = []
    for a in cfg.peers:
        ocfg = cfg.optimizer.copy_and_resolve_references()
        if a in LOW_LR_ARCHITECTURES:
            ocfg.lr = cfg.low_lr
        txs.append(optim.sgd(ocfg, spe))
    seed = config.seed * 1000 + STUDENT_SEED_OFFSET
    sample = eval_transform(ds.train_images[:2], config.augment)
    states = mesh_lib.replicate(mutual.init_states(models, analyzer, txs, jax.random.key(seed), sample), mesh)
    step = jax.jit(mutual.make_train_step(models, analyzer, txs, config.augment, grans), donate_argnums=0)
    ev = jax.jit(mutual.make_eval_step(models, analyzer, config.augment))
    names = [f"peer{i}" for i in range(len(models))]

    improve, export = _best_per_member(names, "test/{name}/{metric}", lambda st, k: _variables(st[k]))

    spec = StageSpec(
        name="mutual", directory=os.path.join(workdir, "mutual"), num_epochs=cfg.epochs, batch_size=cfg.batch_size,
        seed=seed, meta={"stage": "mutual", "peers": list(cfg.peers), "granularity": bool(cfg.granularity),
                         "num_classes": ds.num_classes, "config": stage_config(config, "mutual")},
        passes=[("mutual", step)],
        evaluate=lambda st: evaluate_dataset(lambda b: ev(st, b), ds.test_images, ds.test_labels,
                                             config.eval_batch_size, mesh),
        improve=improve, export=export, **_loop_options(config))
    like = jax.device_get({k: _variables(states[k]) for k in names})
    _, _, result = fit(spec, states, None, ds, mesh, like)
    rows = []
    for i, k in enumerate(names):
        b = result["best"].get(k, {})
        rows.append({"stage": f"mutual {k} ({'MDP-DML' if grans else 'DML'})", "model": cfg.peers[i],
                     "best_acc1": b.get("acc1"), "best_acc5": b.get("acc5"), "best_epoch": b.get("epoch"),
                     "last_acc1": result["last"].get(f"test/{k}/acc1"),
                     "last_acc5": result["last"].get(f"test/{k}/acc5")})
    return rows


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


def _row(stage, model, result, key="test/acc1", key5="test/acc5"):
    best, last = result["best"], result["last"]
    return {"stage": stage, "model": model, "best_acc1": best.get(key), "last_acc1": last.get(key),
            "best_acc5": best.get(key5), "last_acc5": last.get(key5), "best_epoch": best.get("epoch")}


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
    """Runs (or resumes) every stage of ``config`` in ``workdir``; returns and writes the summary."""
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
    check_methods(config, ds.num_classes, ds.image_shape)
    if jax.process_index() == 0:  # what was run, for evaluation tools and people: only once every check passed
        _write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    print(f"data: {ds.name} train {ds.train_images.shape} test {ds.test_images.shape}; "
          f"mesh: {mesh.devices.size} x {mesh.devices.flat[0].platform}", flush=True)

    if config.get("mutual", None) is not None:  # a training mode of its own: peers, no teacher
        rows = run_mutual(config, workdir, ds, mesh)
        return _write_summary(rows, workdir)
    rows = []
    t_model, t_vars, t_res = run_teacher(config, workdir, ds, mesh)
    rows.append(_row("teacher", config.teacher.arch, t_res))
    t_analyzer, t_tubes, a_res = run_analyzer(config, workdir, ds, mesh, t_model, t_vars)
    for g in t_analyzer.granularities:
        b = a_res["best"].get(g.name, {})
        last = a_res["last"]
        rows.append({"stage": f"analyzer {g.name}", "model": f"{config.teacher.arch} decoder",
                     "best_acc1": b.get("acc1"), "best_acc5": b.get("acc5"), "best_epoch": b.get("epoch"),
                     "last_acc1": last.get(f"test/acc1/{g.name}"), "last_acc5": last.get(f"test/acc5/{g.name}")})
    for name, scfg in config.students.items():
        _, s_res = run_student(config, name, scfg, workdir, ds, mesh, t_model, t_vars, t_analyzer, t_tubes)
        mode = "baseline" if scfg.get("protocol", "mg") == "repdistiller" else scfg.granularity  # configs/default.py
        label = f"{scfg.method} / {mode}"
        rows.append(_row(f"student {name} ({label})", config.student.arch, s_res))
    return _write_summary(rows, workdir)


def _write_atomic(path: str, text: str) -> None:
    """A result file is either the old or the new one, never half-written (a kill mid-write)."""
    from mgd_jax.train.checkpoint import _is_disk_full, disk_full_error

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if _is_disk_full(e):
            raise disk_full_error(os.path.dirname(path), f"while writing {os.path.basename(path)}", e) from e
        raise


def _write_summary(rows, workdir):
    table = summary_markdown(rows)
    if jax.process_index() == 0:
        _write_atomic(os.path.join(workdir, "summary.md"), table)
        _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(rows, indent=1))
        print("\n" + table, flush=True)
    return {"rows": rows, "table": table}
