"""The init stage of AB, FT and FSP (SPEC_BASELINES §3), before their student's main stage.

It trains the method's init module and, for AB / FSP (``init_trains_student``), the student's feature modules
(RepDistiller's ``get_feat_modules()``).  The rest of the backbone (``models.non_feature_modules``: the
classifier, WRN's final BN, MobileNetV2's / ShuffleV2's last conv + BN) and, for FT, the whole backbone are
frozen: outside the optimizer (no update, no weight decay), in the state's ``frozen`` field, and their BatchNorms
run in eval mode.  Checkpoints: ``<workdir>/students/<name>/init/``.
"""
from __future__ import annotations

import contextlib
import os

import jax
import optax
from flax import linen as nn

from mgd_jax.data import augment
from mgd_jax.methods import Outputs
from mgd_jax.models import non_feature_modules
from mgd_jax.models.layers import BatchNorm
from mgd_jax.stages.common import StageRun, TrainState, apply_backbone, classification_counts, step_key
from mgd_jax.stages.student import StudentModules, TeacherModules, teacher_forward, teacher_inputs
from mgd_jax.stages.teacher import Teacher
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import StageCheckpoints
from mgd_jax.train.loop import StageSpec, fit

SEED_OFFSET = 7  # the init stage's data order: the student's seed + 7


@contextlib.contextmanager
def _eval_mode(top_level_names):
    """Inside: every BatchNorm under the named top-level modules runs in eval mode (running statistics, no
    update), whatever ``train`` the backbone passes, as a PyTorch module left in ``eval()`` while the rest of
    the network is in ``train()``."""
    names = frozenset(top_level_names)

    def interceptor(call, args, kwargs, context):
        m = context.module
        if isinstance(m, BatchNorm) and context.method_name == "__call__" and m.path and m.path[0] in names:
            if "train" in kwargs:
                kwargs = {**kwargs, "train": False}
            else:
                args = (args[0], False, *args[2:])
        return call(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def init_stage_state(s: StudentModules, t: TeacherModules, teacher, student: TrainState, tx, key, sample_images,
                     ctx=None) -> TrainState:
    """The init stage's state from the fresh student's: params = {init module, feature modules (AB / FSP)};
    frozen = {the non-feature modules, the feature modules (FT)}."""
    logits, feats = s.backbone.apply({"params": student.params["backbone"],
                                      "batch_stats": student.batch_stats["backbone"]}, sample_images)
    t_out = teacher_forward(t, teacher, sample_images, decode=False, preact=s.method.teacher_preact)
    init_params = s.method.init_stage_params(jax.random.fold_in(key, 1), Outputs(logits, feats), t_out, ctx)
    backbone = dict(student.params["backbone"])
    frozen = {"non_feature": {k: backbone.pop(k) for k in non_feature_modules(s.backbone)}}
    params = {"init": init_params}
    if s.method.init_trains_student:
        params["features"] = backbone
    else:
        frozen["features"] = backbone
    return TrainState.create(params, student.batch_stats, tx, method_state=student.method_state, frozen=frozen)


def _backbone_params(state: TrainState, params) -> dict:
    features = params["features"] if "features" in params else state.frozen["features"]
    return {**features, **state.frozen["non_feature"]}


def make_init_step(s: StudentModules, t: TeacherModules, tx, aug_cfg):
    """One init-stage step.  The feature modules (AB / FSP) run in train mode, the frozen modules in eval mode
    (their BN statistics stay as they are; WRN's final BN is on AB's last preact map)."""
    m = s.method
    frozen = non_feature_modules(s.backbone)

    def init_step(state: TrainState, teacher, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, state.step), aug_cfg)
        t_out = teacher_forward(t, teacher, x, decode=False, preact=m.teacher_preact)

        def loss_fn(params):
            with _eval_mode(frozen):
                logits, feats, new_bs = apply_backbone(s.backbone, _backbone_params(state, params),
                                                       state.batch_stats["backbone"], x,
                                                       train=m.init_trains_student, preact=m.init_student_preact)
            mvars = {"params": params["init"], "state": state.method_state}
            loss, method_state = m.init_loss(mvars, Outputs(logits, feats), t_out, True)
            return loss, (new_bs, method_state)

        (loss, (new_bs, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, tx, {**state.batch_stats, "backbone": new_bs},
                                          method_state if state.method_state else None)
        return new_state, {"loss": loss, "loss/init": loss, "grad_norm": optax.tree.norm(grads)}

    return init_step


def finish_init_stage(s: StudentModules, init_state: TrainState, student: TrainState, tx) -> TrainState:
    """The student state for the main stage after the init stage (fresh optimizer, as the reference); the init
    module goes into the method's state under ``method.init_params_key`` (FT's frozen paraphraser)."""
    params = dict(student.params)
    params["backbone"] = _backbone_params(init_state, init_state.params)
    method_state = dict(init_state.method_state)
    key = s.method.init_params_key
    if key is not None:
        method_state[key] = init_state.params["init"]
    return TrainState.create(params, init_state.batch_stats, tx, method_state=method_state)


def make_init_eval_step(s: StudentModules, aug_cfg):
    def eval_step(state, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        logits, _, _ = apply_backbone(s.backbone, _backbone_params(state, state.params), state.batch_stats["backbone"],
                                      x, train=False)
        return classification_counts(logits, batch["label"], batch["mask"])

    return eval_step


def _main_stage_started(directory: str) -> bool:
    """The student's main stage has a committed checkpoint (resumed or finished from it, not from the init stage)."""
    if not os.path.isdir(os.path.join(directory, "checkpoints", "latest")):
        return False
    ck = StageCheckpoints(os.path.join(directory, "checkpoints"))
    try:
        return ck.latest_meta() is not None
    finally:
        ck.close()


def run(run: StageRun, name: str, modules: StudentModules, teacher: Teacher, student: TrainState, student_tx,
        meta: dict) -> TrainState:
    """Train (or resume, or reuse) the init stage of student ``name``; -> the student's state for its main stage."""
    config, cfg = run.config, run.config.students[name].init
    batch_size = run.config.student.batch_size
    t_modules, t_inputs = TeacherModules.of(teacher), teacher_inputs(teacher)
    tx = run.sgd(cfg.optimizer, batch_size)
    seed = run.seed("student", name)
    state = init_stage_state(modules, t_modules, t_inputs, student, tx, jax.random.key(seed), run.sample_images(),
                             {"num_train": len(run.data.train_labels)})
    if _main_stage_started(run.directory("students", name)):
        # its checkpoints hold everything the init stage made: only the state's layout is needed to restore them
        print(f"[student/{name}/init] skipped: the main stage has started from it", flush=True)
        return finish_init_stage(modules, state, student, student_tx)
    step = jax.jit(make_init_step(modules, t_modules, tx, config.augment), donate_argnums=0)
    eval_step = jax.jit(make_init_eval_step(modules, config.augment))
    spec = StageSpec(
        name=f"student/{name}/init", directory=run.directory("students", name, "init"), num_epochs=cfg.epochs,
        batch_size=batch_size, seed=seed + SEED_OFFSET, meta={**meta, "stage": "student_init"},
        passes=[("init", step)], evaluate=lambda st: run.evaluate(lambda b: eval_step(st, b)),
        improve=lambda best, metrics, epoch: ({**metrics, "epoch": epoch + 1}, ["last"]),
        export=lambda st, prev, improved: st, **run.loop_options(cfg.optimizer))
    _, export, _ = fit(spec, mesh_lib.replicate(state, run.mesh), t_inputs, run.data, run.mesh,
                       jax.device_get(state))
    return finish_init_stage(modules, export, student, student_tx)
