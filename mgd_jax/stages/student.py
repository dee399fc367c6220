"""Stage 3: the student (SPEC §3.3).

    L = w_ce CE(z_s, y) + w_kd L_method + w_div KD_T(z_s || target) + sum_g w_g KD_{T_g}(e_g^s || e_g^t)

with target = z_t (MAG, or no granularity) or the stable-excitation mean of z_t and the teacher's decoder
logits (MAS).  The teacher (backbone + analyzer) is an argument of the step, run in inference mode; gradients
are taken w.r.t. the student's parameters only.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import optax
from flax import linen as nn

from mgd_jax import losses
from mgd_jax.analyzer import Granularity, GranularityAnalyzer
from mgd_jax.data import augment
from mgd_jax.methods import Method, Outputs
from mgd_jax.models import non_feature_modules
from mgd_jax.models.layers import BatchNorm
from mgd_jax.stages.common import TrainState, apply_backbone, classification_counts, step_key, train_metrics

GRANULARITY_MODES = ("none", "mag", "mas")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Weights and temperatures of the student objective (config ``student.*``; paper values by default)."""

    mode: str  # none | mag | mas
    granularities: tuple[Granularity, ...]
    temperature: float = 4.0  # logit KD
    w_ce: float = 1.0
    w_logit_kd: float = 1.0
    w_method: float = 1.0
    w_granularity: float = 1.0  # hard-coded 1 in the reference

    def __post_init__(self):
        if self.mode not in GRANULARITY_MODES:
            raise ValueError(f"unknown granularity mode {self.mode!r}; known: {', '.join(GRANULARITY_MODES)}")
        if not self.temperature > 0:
            raise ValueError(f"student.temperature must be > 0, got {self.temperature}")


def objective_terms(obj: Objective, student: Outputs, teacher: Outputs, labels, method_loss) -> dict:
    """The paper's terms, unweighted.  A term whose weight is 0 is not computed (and not logged)."""
    terms = {}
    if obj.w_ce:
        terms["ce"] = losses.cross_entropy(student.logits, labels)
    if obj.w_logit_kd:
        if obj.mode == "mas":
            target = losses.stable_excitation_target(teacher.logits, list(teacher.decodings.values()))
            terms["stable_excitation"] = losses.logit_kd(student.logits, target, obj.temperature)
        else:
            terms["logit_kd"] = losses.logit_kd(student.logits, teacher.logits, obj.temperature)
    if method_loss is not None and obj.w_method:
        terms["method"] = method_loss
    if obj.mode != "none" and obj.w_granularity:
        for g in obj.granularities:
            terms[f"granularity/{g.name}"] = losses.granularity_kl(
                student.encodings[g.name], teacher.encodings[g.name], g.temperature)
    return terms


def weight_of(obj: Objective, term: str) -> float:
    if term in ("logit_kd", "stable_excitation"):
        return obj.w_logit_kd
    if term.startswith("granularity/"):
        return obj.w_granularity
    return {"ce": obj.w_ce, "method": obj.w_method}[term]


def total_loss(obj: Objective, terms: dict) -> jax.Array:
    return sum(weight_of(obj, k) * v for k, v in terms.items())


@dataclasses.dataclass(frozen=True)
class StudentModules:
    backbone: object
    analyzer: GranularityAnalyzer | None  # encoders only; None for mode 'none'
    method: Method


@dataclasses.dataclass(frozen=True)
class TeacherModules:
    backbone: object
    analyzer: GranularityAnalyzer


def teacher_forward(t: TeacherModules, teacher, x, *, decode: bool, preact: bool) -> Outputs:
    logits, feats, _ = apply_backbone(t.backbone, teacher["backbone"]["params"], teacher["backbone"]["batch_stats"],
                                      x, train=False, preact=preact)
    out = t.analyzer.apply({"params": teacher["analyzer"]}, feats[-1], decode=decode)
    return Outputs(logits, feats, {n: e for n, (e, _) in out.items()},
                   {n: d for n, (e, d) in out.items()} if decode else {})


def student_forward(s: StudentModules, params, batch_stats, x, *, train: bool) -> tuple[Outputs, dict]:
    logits, feats, new_bs = apply_backbone(s.backbone, params["backbone"], batch_stats["backbone"], x, train=train)
    enc = {}
    if s.analyzer is not None:
        enc = {n: e for n, (e, _) in s.analyzer.apply({"params": params["analyzer"]}, feats[-1], decode=False).items()}
    return Outputs(logits, feats, enc), new_bs


def init_state(s: StudentModules, t: TeacherModules, teacher, tx, key, sample_images, ctx=None,
               sample_batch=None) -> TrainState:
    """Fresh student: backbone, its own encoders (modes mag/mas) and the method's variables."""
    k_b, k_a, k_m = jax.random.split(key, 3)
    v = s.backbone.init(k_b, sample_images, train=False)
    params, batch_stats = {"backbone": v["params"]}, {"backbone": v["batch_stats"]}
    logits, feats = s.backbone.apply(v, sample_images, train=False)
    if s.analyzer is not None:
        params["analyzer"] = s.analyzer.init(k_a, feats[-1], decode=False)["params"]
    t_out = teacher_forward(t, teacher, sample_images, decode=False, preact=s.method.teacher_preact)
    mvars = s.method.init(k_m, Outputs(logits, feats), t_out, ctx)
    if mvars["params"]:
        params["method"] = mvars["params"]
    if mvars["state"]:
        batch_stats["method"] = mvars["state"]
    return TrainState.create(params, batch_stats, tx)


def method_variables(params, batch_stats) -> dict:
    return {"params": params.get("method", {}), "state": batch_stats.get("method", {})}


def make_train_step(s: StudentModules, t: TeacherModules, obj: Objective, tx, aug_cfg):
    decode = obj.mode == "mas"

    def train_step(state: TrainState, teacher, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, state.step), aug_cfg)
        t_out = teacher_forward(t, teacher, x, decode=decode, preact=s.method.teacher_preact)

        def loss_fn(params):
            s_out, new_bs = student_forward(s, params, state.batch_stats, x, train=True)
            new_stats = {"backbone": new_bs}
            method_loss, mstate = s.method.loss(method_variables(params, state.batch_stats), s_out, t_out, batch,
                                                True)
            if "method" in state.batch_stats:
                new_stats["method"] = mstate
            terms = objective_terms(obj, s_out, t_out, batch["label"], method_loss)
            return total_loss(obj, terms), (terms, s_out.logits, new_stats)

        (loss, (terms, logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, tx, new_stats)
        return new_state, train_metrics(loss, terms, logits, batch["label"], grads)

    return train_step


def make_eval_step(s: StudentModules, aug_cfg):
    def eval_step(variables, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        out, _ = student_forward(s, variables["params"], variables["batch_stats"], x, train=False)
        return classification_counts(out.logits, batch["label"], batch["mask"])

    return eval_step


# --- init stage (AB, FT, FSP; SPEC_BASELINES §3) ------------------------------------------------------------------


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
    """The init stage trains the method's init module and, for AB / FSP, the student's feature modules
    (RepDistiller's ``get_feat_modules()``).  The rest of the backbone (``models.non_feature_modules``: the
    classifier, WRN's final BN, MobileNetV2's / ShuffleV2's last conv + BN) and, for FT, the whole backbone are
    frozen: outside the optimizer (no update, no weight decay), riding along in ``batch_stats["fixed"]``."""
    logits, feats = s.backbone.apply({"params": student.params["backbone"],
                                      "batch_stats": student.batch_stats["backbone"]}, sample_images)
    t_out = teacher_forward(t, teacher, sample_images, decode=False, preact=s.method.teacher_preact)
    init_params = s.method.init(jax.random.fold_in(key, 1), Outputs(logits, feats), t_out, ctx).get("init_params", {})
    backbone = dict(student.params["backbone"])
    frozen = {k: backbone.pop(k) for k in non_feature_modules(s.backbone)}
    params = {"init": init_params}
    fixed = {"frozen": frozen}
    if s.method.init_trains_student:
        params["features"] = backbone
    else:
        fixed["features"] = backbone
    return TrainState.create(params, {**student.batch_stats, "fixed": fixed}, tx)


def _init_backbone_params(params, batch_stats):
    features = params["features"] if "features" in params else batch_stats["fixed"]["features"]
    return {**features, **batch_stats["fixed"]["frozen"]}


def make_init_step(s: StudentModules, t: TeacherModules, tx, aug_cfg):
    """One init-stage step.  The feature modules (AB / FSP) run in train mode, the frozen modules in eval mode
    (their BN statistics stay as they are; WRN's final BN is on AB's last preact map)."""
    m = s.method
    frozen = non_feature_modules(s.backbone)

    def init_step(state: TrainState, teacher, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, state.step), aug_cfg)
        t_out = teacher_forward(t, teacher, x, decode=False, preact=m.teacher_preact)

        def loss_fn(params):
            bb = _init_backbone_params(params, state.batch_stats)
            with _eval_mode(frozen):
                logits, feats, new_bs = apply_backbone(s.backbone, bb, state.batch_stats["backbone"], x,
                                                       train=m.init_trains_student, preact=m.init_student_preact)
            mvars = {"params": params["init"], "state": state.batch_stats.get("method", {})}
            loss, mstate = m.init_loss(mvars, Outputs(logits, feats), t_out, True)
            return loss, (new_bs, mstate)

        (loss, (new_bs, mstate)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        stats = {**state.batch_stats, "backbone": new_bs}
        if "method" in state.batch_stats:
            stats["method"] = mstate
        new_state = state.apply_gradients(grads, tx, stats)
        return new_state, {"loss": loss, "loss/init": loss, "grad_norm": optax.tree.norm(grads)}

    return init_step


def finish_init_stage(s: StudentModules, init_state_: TrainState, student: TrainState, tx) -> TrainState:
    """The student state for the main stage after the init stage (fresh optimizer, as the reference)."""
    params = dict(student.params)
    params["backbone"] = _init_backbone_params(init_state_.params, init_state_.batch_stats)
    stats = {k: v for k, v in init_state_.batch_stats.items() if k != "fixed"}
    key = s.method.init_params_key
    if key is not None:
        stats["method"] = {**stats.get("method", {}), key: init_state_.params["init"]}
    return TrainState.create(params, stats, tx)


def make_init_eval_step(s: StudentModules, aug_cfg):
    def eval_step(state, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        bb = _init_backbone_params(state.params, state.batch_stats)
        logits, _, _ = apply_backbone(s.backbone, bb, state.batch_stats["backbone"], x, train=False)
        return classification_counts(logits, batch["label"], batch["mask"])

    return eval_step
