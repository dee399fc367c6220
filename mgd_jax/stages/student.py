"""Stage 3: the student (SPEC §3.3).

    L = w_ce CE(z_s, y) + w_kd L_method + w_div KD_T(z_s || target) + sum_g w_g KD_{T_g}(e_g^s || e_g^t)

with target = z_t (MAG, or no granularity) or the stable-excitation mean of z_t and the teacher's decoder
logits (MAS).  The teacher (backbone + analyzer) is an argument of the step, run in inference mode; gradients
are taken w.r.t. the student's parameters only.

A logit method (DKD, DIST; ``Method.logit_method``) distils towards the same target: its loss reads the target
where its formula has the teacher's logits; its config weights replace the KD term (``w_logit_kd`` 0).  With
``logit_standardization`` (config ``student.logit_standardization``; Sun et al., CVPR 2024) every logit-level KL
of the objective (the KD / stable-excitation term and a ``logit_kl`` method's loss, DKD) reads z-scored logits of
the student and of the target.  The granularity terms (KLs of encodings, not logits) are left as they are.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mgd_jax import losses
from mgd_jax.analyzer import Granularity, GranularityAnalyzer
from mgd_jax.data import augment
from mgd_jax.methods import Method, Outputs, get_method
from mgd_jax.models import get_model
from mgd_jax.stages.common import (StageRun, TrainState, apply_backbone, best_by, classification_counts,
                                   stage_config, step_key, train_metrics)
from mgd_jax.stages.teacher import Teacher
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.loop import Fresh, StageSpec, data_orders, fit, fit_group, lockstep_groups

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
    logit_standardization: bool = False  # z-score the logits of every logit-level KL (Sun et al. 2024)
    # Optimizer steps per epoch: the step tells the method its 1-based epoch (batch['epoch'], for the warm-ups of
    # DKD and ReviewKD).  0: not told (a warm-up then counts as finished).
    steps_per_epoch: int = 0

    def __post_init__(self):
        if self.mode not in GRANULARITY_MODES:
            raise ValueError(f"unknown granularity mode {self.mode!r}; known: {', '.join(GRANULARITY_MODES)}")
        if not self.temperature > 0:
            raise ValueError(f"student.temperature must be > 0, got {self.temperature}")


def distillation_target(objective: Objective, teacher: Outputs) -> jax.Array:
    """The logits the student distils towards: the stable-excitation target in mode mas, else the teacher's."""
    if objective.mode == "mas":
        return losses.stable_excitation_target(teacher.logits, list(teacher.decodings.values()))
    return teacher.logits


def method_inputs(method: Method, objective: Objective, student: Outputs, teacher: Outputs) -> tuple:
    """(student, teacher) outputs as ``method.loss`` reads them: for a logit method the teacher's logits are the
    objective's target, both sides standardized for a ``logit_kl`` method under ``logit_standardization``."""
    if not method.logit_method:
        return student, teacher
    s_logits, t_logits = student.logits, distillation_target(objective, teacher)
    if method.logit_kl and objective.logit_standardization:
        s_logits, t_logits = losses.standardize(s_logits), losses.standardize(t_logits)
    return student.replace(logits=s_logits), teacher.replace(logits=t_logits)


def objective_terms(objective: Objective, student: Outputs, teacher: Outputs, labels, method_loss) -> dict:
    """The paper's terms as ``{name: (weight, value)}``; a term whose weight is 0 is not computed (nor logged)."""
    terms = {}
    if objective.w_ce:
        terms["ce"] = (objective.w_ce, losses.cross_entropy(student.logits, labels))
    if objective.w_logit_kd:
        name = "stable_excitation" if objective.mode == "mas" else "logit_kd"
        terms[name] = (objective.w_logit_kd, losses.logit_kd(student.logits, distillation_target(objective, teacher),
                                                             objective.temperature,
                                                             standardize=objective.logit_standardization))
    if method_loss is not None and objective.w_method:
        terms["method"] = (objective.w_method, method_loss)
    if objective.mode != "none" and objective.w_granularity:
        for g in objective.granularities:
            terms[f"granularity/{g.name}"] = (objective.w_granularity, losses.granularity_kl(
                student.encodings[g.name], teacher.encodings[g.name], g.temperature))
    return terms


def total_loss(terms: dict) -> jax.Array:
    """L = sum over terms of weight * value."""
    return sum(w * v for w, v in terms.values())


@dataclasses.dataclass(frozen=True)
class StudentModules:
    backbone: object
    analyzer: GranularityAnalyzer | None  # encoders only; None for mode 'none'
    method: Method


@dataclasses.dataclass(frozen=True)
class TeacherModules:
    """The teacher's modules; their variables enter each step as an argument (``teacher_inputs``)."""

    backbone: object
    analyzer: GranularityAnalyzer

    @classmethod
    def of(cls, teacher: Teacher) -> "TeacherModules":
        return cls(teacher.backbone, teacher.analyzer)


def teacher_inputs(teacher: Teacher) -> dict:
    """The frozen teacher's variables as the student steps take them: ``{'backbone', 'analyzer'}``."""
    return {"backbone": teacher.variables, "analyzer": teacher.tubes}


def teacher_forward(t: TeacherModules, teacher, x, *, decode: bool, preact: bool) -> Outputs:
    logits, feats, _ = apply_backbone(t.backbone, teacher["backbone"]["params"], teacher["backbone"]["batch_stats"],
                                      x, train=False, preact=preact)
    out = t.analyzer.apply({"params": teacher["analyzer"]}, feats[-1], decode=decode)
    return Outputs(logits, feats, {n: e for n, (e, _) in out.items()},
                   {n: d for n, (e, d) in out.items()} if decode else {})


def student_forward(s: StudentModules, params, batch_stats, x, *, train: bool,
                    preact: bool = False) -> tuple[Outputs, dict]:
    """``preact``: the stage features before their last ReLU (OFD); logits and the pooled vector are the same."""
    logits, feats, new_bs = apply_backbone(s.backbone, params["backbone"], batch_stats["backbone"], x, train=train,
                                           preact=preact)
    enc = {}
    if s.analyzer is not None:
        enc = {n: e for n, (e, _) in s.analyzer.apply({"params": params["analyzer"]}, feats[-1], decode=False).items()}
    return Outputs(logits, feats, enc), new_bs


def init_state(s: StudentModules, t: TeacherModules, teacher, tx, key, sample_images, ctx=None,
               sample_batch=None) -> TrainState:
    """Fresh student: backbone, its own encoders (modes mag/mas) and the method's variables (the method's ``ctx``
    gains ``teacher_model`` and ``teacher_variables``: the teacher backbone and its variables)."""
    k_b, k_a, k_m = jax.random.split(key, 3)
    v = s.backbone.init(k_b, sample_images, train=False)
    params, batch_stats = {"backbone": v["params"]}, {"backbone": v["batch_stats"]}
    logits, feats = s.backbone.apply(v, sample_images, train=False, preact=s.method.student_preact)
    if s.analyzer is not None:
        params["analyzer"] = s.analyzer.init(k_a, feats[-1], decode=False)["params"]
    t_out = teacher_forward(t, teacher, sample_images, decode=False, preact=s.method.teacher_preact)
    ctx = {**(ctx or {}), "teacher_model": t.backbone, "teacher_variables": teacher["backbone"]}
    mvars = s.method.init(k_m, Outputs(logits, feats), t_out, ctx)
    if mvars["params"]:
        params["method"] = mvars["params"]
    return TrainState.create(params, batch_stats, tx, method_state=mvars["state"])


def method_variables(state: TrainState, params) -> dict:
    return {"params": params.get("method", {}), "state": state.method_state}


def _update(s: StudentModules, objective: Objective, tx, state: TrainState, x, t_out: Outputs, batch):
    """One optimizer step of one student on the augmented images ``x`` and the teacher's outputs ``t_out``."""
    if objective.steps_per_epoch:  # the 1-based epoch of this step, for a method's warm-up
        batch = {**batch, "epoch": (state.step // objective.steps_per_epoch + 1).astype(jnp.float32)}

    def loss_fn(params):
        s_out, new_bs = student_forward(s, params, state.batch_stats, x, train=True, preact=s.method.student_preact)
        method_loss, method_state = s.method.loss(method_variables(state, params),
                                                  *method_inputs(s.method, objective, s_out, t_out), batch, True)
        terms = objective_terms(objective, s_out, t_out, batch["label"], method_loss)
        return total_loss(terms), (terms, s_out.logits, new_bs, method_state)

    (loss, (terms, logits, new_bs, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads, tx, {"backbone": new_bs}, method_state if state.method_state else None)
    values = {k: v for k, (_, v) in terms.items()}
    return new_state, train_metrics(loss, values, logits, batch["label"], grads)


def make_train_step(s: StudentModules, t: TeacherModules, objective: Objective, tx, aug_cfg):
    decode = objective.mode == "mas"

    def train_step(state: TrainState, teacher, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, state.step), aug_cfg)
        t_out = teacher_forward(t, teacher, x, decode=decode, preact=s.method.teacher_preact)
        return _update(s, objective, tx, state, x, t_out, batch)

    return train_step


GROUP_SEP = "::"  # a group's batch carries each student's extra arrays (CRD's indices) as '<name>::<key>'

# ``config.student.vmap``: whether a fused group's compatible students run as one vmapped program.  'auto' picks per
# backend what measured faster (docs/speed.md "Fused students"): on XLA:CPU the unrolled loop; elsewhere (GPU, TPU:
# small launch-bound kernels) vmapped, not yet measured there.
VMAP_CHOICES = ("auto", "on", "off")
VMAP_AUTO = {"cpu": False}  # backend -> vmapped, where measured (docs/speed.md); a backend not named: unrolled


def vmap_students(setting: str = "auto", backend: str | None = None) -> bool:
    """``config.student.vmap`` ('auto' | 'on' | 'off') on ``backend`` (default: JAX's) -> run vmapped or not."""
    if setting not in VMAP_CHOICES:
        raise ValueError(f"student.vmap must be one of {', '.join(VMAP_CHOICES)}, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    return VMAP_AUTO.get(backend or jax.default_backend(), False)


def _compatible(a, b) -> bool:
    """Two group members ``(StudentModules, Objective, tx)`` can share one vmapped program: the same backbone,
    method (options included), optimizer object, temperature and logit standardization; their modes and weights may
    differ (per-member data), a mode-'none' student's missing encoders are padded with zeros.  A contrastive method
    (CRD: a memory bank per student, per-student batch extras) always runs alone."""
    (sa, oa, ta), (sb, ob, tb) = a, b
    return (sa.backbone == sb.backbone and sa.method == sb.method and not sa.method.needs_contrast and ta is tb
            and (sa.analyzer is None or sb.analyzer is None or sa.analyzer == sb.analyzer)
            and (oa.granularities, oa.temperature, oa.logit_standardization, oa.steps_per_epoch)
            == (ob.granularities, ob.temperature, ob.logit_standardization, ob.steps_per_epoch))


def vmap_subgroups(members: dict) -> list[list[str]]:
    """``members`` ({name: (StudentModules, Objective, tx)}) split into runs of one program: lists of names, in
    first-member order (the paper table's 8 methods x 3 modes: 8 subgroups of 3)."""
    groups = []
    for name, m in members.items():
        for g in groups:
            if _compatible(members[g[0]], m):
                g.append(name)
                break
        else:
            groups.append([name])
    return groups


def _pad_like(tree, like):
    """``tree`` with the structure of ``like``, whose paths include all of ``tree``'s: a leaf ``tree`` lacks (a
    mode-'none' student's encoders, their momentum) is zeros of ``like``'s."""
    have = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return treedef.unflatten([have[p] if p in have else jnp.zeros_like(x) for p, x in leaves])


def _crop_like(tree, like):
    """``tree`` cut to the structure of ``like`` (the inverse of ``_pad_like``)."""
    have = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return treedef.unflatten([have[p] for p, _ in leaves])


_TERM_WEIGHTS = ("ce", "kd", "method", "granularity")


def _vmapped_update(entries: list, states: dict, inputs: list):
    """One optimizer step of the compatible students ``entries`` ([(name, StudentModules, Objective, tx)]) as one
    vmapped program: their states stacked (a mode-'none' student's padded with zero encoders at granularity weight
    0, its padding dropped after), each term's weight and the distillation target (MAS: stable excitation, else the
    teacher's logits) per-member data.  ``inputs``: each member's ``(x, t_out, batch)`` (its data order's augmented
    images, the teacher's outputs on them, its labels), one shared object where the members share their data
    order (then not stacked), else per-member data too.
    -> ({name: state}, {name: metrics}), each member's metrics named as alone."""
    full = next((e for e in entries if e[1].analyzer is not None), entries[0])
    s, tx, ref = full[1], full[3], states[full[0]]
    method, objective = s.method, full[2]
    objs = [o for _, _, o, _ in entries]
    rows = [[o.w_ce, o.w_logit_kd, o.w_method, o.w_granularity if o.mode != "none" else 0.0] for o in objs]
    use = {k: any(r[i] for r in rows) for i, k in enumerate(_TERM_WEIGHTS)}
    weights = jnp.asarray(rows, jnp.float32)
    mas = {}  # id(t_out) -> its stable-excitation target, computed once per data order
    for o, (_, t_out, _) in zip(objs, inputs):
        if o.mode == "mas" and id(t_out) not in mas:
            mas[id(t_out)] = losses.stable_excitation_target(t_out.logits, list(t_out.decodings.values()))
    targets = jnp.stack([mas[id(t)] if o.mode == "mas" else t.logits for o, (_, t, _) in zip(objs, inputs)])
    shared = all(i is inputs[0] for i in inputs)
    data = inputs[0] if shared else jax.tree.map(lambda *a: jnp.stack(a), *inputs)

    def update(state, w, target, data):
        x, t_out, b = data
        if objective.steps_per_epoch:
            b = {**b, "epoch": (state.step // objective.steps_per_epoch + 1).astype(jnp.float32)}

        def loss_fn(params):
            s_out, new_bs = student_forward(s, params, state.batch_stats, x, train=True,
                                            preact=method.student_preact)
            s_in, t_in = s_out, t_out
            if method.logit_method:
                s_logits, t_logits = s_out.logits, target
                if method.logit_kl and objective.logit_standardization:
                    s_logits, t_logits = losses.standardize(s_logits), losses.standardize(t_logits)
                s_in, t_in = s_out.replace(logits=s_logits), t_out.replace(logits=t_logits)
            method_loss, method_state = method.loss(method_variables(state, params), s_in, t_in, b, True)
            terms = {}  # objective_terms' order, every term some member weighs
            if use["ce"]:
                terms["ce"] = (w[0], losses.cross_entropy(s_out.logits, b["label"]))
            if use["kd"]:
                terms["kd"] = (w[1], losses.logit_kd(s_out.logits, target, objective.temperature,
                                                     standardize=objective.logit_standardization))
            if method_loss is not None and use["method"]:
                terms["method"] = (w[2], method_loss)
            if use["granularity"]:
                for g in objective.granularities:
                    terms[f"granularity/{g.name}"] = (w[3], losses.granularity_kl(
                        s_out.encodings[g.name], t_out.encodings[g.name], g.temperature))
            return total_loss(terms), ({k: v for k, (_, v) in terms.items()}, s_out.logits, new_bs, method_state)

        (loss, (terms, logits, new_bs, method_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        new = state.apply_gradients(grads, tx, {"backbone": new_bs}, method_state if state.method_state else None)
        return new, (loss, terms, logits, grads)

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[_pad_like(states[n], ref) for n, _, _, _ in entries])
    new, (loss, terms, logits, grads) = jax.vmap(update, in_axes=(0, 0, 0, None if shared else 0))(
        stacked, weights, targets, data)
    out_states, out_metrics = {}, {}
    for i, (name, _, o, _) in enumerate(entries):
        labels = inputs[i][2]["label"]
        own = states[name]
        out_states[name] = _crop_like(jax.tree.map(lambda a: a[i], new), own)
        kd = "stable_excitation" if o.mode == "mas" else "logit_kd"
        names = {"ce": "ce" if o.w_ce else None, "kd": kd if o.w_logit_kd else None,
                 "method": "method" if o.w_method else None}
        values = {}
        for k, v in terms.items():
            mine = names.get(k, k if o.mode != "none" and o.w_granularity else None)
            if mine is not None:
                values[mine] = v[i]
        out_metrics[name] = train_metrics(loss[i], values, logits[i], labels,
                                          _crop_like(jax.tree.map(lambda a: a[i], grads), own.params))
    return out_states, out_metrics


def make_group_train_step(members: dict, t: TeacherModules, aug_cfg, vmap: bool = False,
                          orders: dict | None = None, devices: int = 1):
    """One step of several students on one batch: the teacher (backbone + tubes) runs once per batch (twice when
    some student reads its pre-activation features, as AB), then every student takes its own step.
    ``members``: {name: (StudentModules, Objective, tx)}; the state is {name: TrainState}, in lockstep.  ``vmap``:
    the students that can share one program (``vmap_subgroups``: same method and options, any mode) take their steps
    as one vmapped program, each convolution one batched kernel; else one after another.
    ``orders``: {name: its data order's index} where members differ in seed (``loop.data_orders``): the batch then
    holds one batch per order (``mesh.interleave`` over the mesh's ``devices``) and the key one key per order; each
    order is augmented with its own key, the teacher runs once on all of them, every student steps on its own."""
    decode = any(objective.mode == "mas" for _, objective, _ in members.values())
    preacts = sorted({s.method.teacher_preact for s, _, _ in members.values()})
    first = next(iter(members))
    subgroups = vmap_subgroups(members) if vmap else [[name] for name in members]
    orders = orders or {name: 0 for name in members}
    count = max(orders.values()) + 1

    def group_step(states, teacher, batch, base_key):
        shared = {k: v for k, v in batch.items() if GROUP_SEP not in k}
        step = states[first].step
        if count == 1:
            x = augment.train_transform(batch["image"], step_key(base_key, step), aug_cfg)
            t_outs = {p: teacher_forward(t, teacher, x, decode=decode, preact=p) for p in preacts}
            inputs = [{p: (x, t_outs[p], shared) for p in preacts}]
        else:  # one batch per data order: augmented each with its key, the teacher once on all of them (in the
            # batch's interleaved layout, so that no rows move between devices)
            split = {k: mesh_lib.deinterleave(v, count, devices) for k, v in shared.items()}
            xs = [augment.train_transform(split["image"][o], step_key(base_key[o], step), aug_cfg)
                  for o in range(count)]
            x_all = mesh_lib.reinterleave(jnp.stack(xs), devices)
            inputs = [{} for _ in range(count)]
            for p in preacts:
                t_all = jax.tree.map(lambda a: mesh_lib.deinterleave(a, count, devices),
                                     teacher_forward(t, teacher, x_all, decode=decode, preact=p))
                for o in range(count):
                    inputs[o][p] = (xs[o], jax.tree.map(lambda a: a[o], t_all),
                                    {k: v[o] for k, v in split.items() if k != "image"})
        new, metrics = {}, {}
        for names in subgroups:
            preact = members[names[0]][0].method.teacher_preact
            if len(names) > 1:  # compatible members never carry batch extras (no contrastive method)
                n, m = _vmapped_update([(k, *members[k]) for k in names], states,
                                       [inputs[orders[k]][preact] for k in names])
                new.update(n)
                metrics.update(m)
                continue
            name = names[0]
            s, objective, tx = members[name]
            x, t_out, mine = inputs[orders[name]][preact]
            own = {k.split(GROUP_SEP, 1)[1]: v for k, v in batch.items() if k.startswith(name + GROUP_SEP)}
            new[name], metrics[name] = _update(s, objective, tx, states[name], x, t_out, {**mine, **own})
        return {k: new[k] for k in members}, {k: metrics[k] for k in members}

    return group_step


def make_eval_step(s: StudentModules, aug_cfg):
    def eval_step(variables, batch):
        x = augment.eval_transform(batch["image"], aug_cfg)
        out, _ = student_forward(s, variables["params"], variables["batch_stats"], x, train=False)
        return classification_counts(out.logits, batch["label"], batch["mask"])

    return eval_step




def export_variables(state: TrainState) -> dict:
    """A student's best-epoch export: ``{'params': {backbone, analyzer?, method?}, 'batch_stats': {backbone,
    method?}}`` (the checkpoint format analysis tools read; the method's state is kept beside the backbone's
    BatchNorm statistics there, as checkpoints of earlier versions have it)."""
    stats = dict(state.batch_stats)
    if state.method_state:
        stats["method"] = state.method_state
    return {"params": state.params, "batch_stats": stats}


def method_of(student_cfg) -> Method:
    """The method of one ``config.students`` entry, with its ``method_options``."""
    return get_method(student_cfg.method, **dict(student_cfg.get("method_options", None) or {}))


def objective_of(student_cfg, granularities, steps_per_epoch: int = 0,
                 logit_standardization: bool = False) -> Objective:
    """The objective of one ``config.students`` entry over the teacher's granularities (``logit_standardization``:
    config ``student.logit_standardization``)."""
    w = student_cfg.weights
    return Objective(mode=student_cfg.granularity, granularities=tuple(granularities),
                     temperature=student_cfg.temperature, w_ce=w.ce, w_logit_kd=w.logit_kd, w_method=w.method,
                     w_granularity=w.granularity, logit_standardization=bool(logit_standardization),
                     steps_per_epoch=int(steps_per_epoch))


def spec_meta(config, name: str, num_classes: int) -> dict:
    """What identifies a student's checkpoints (checked on resume and before a run starts)."""
    s = config.students[name]
    return {"stage": "student", "arch": config.student.arch, "teacher_arch": config.teacher.arch,
            "method": s.method, "granularity": s.granularity, "num_classes": num_classes,
            "config": stage_config(config, "student", name)}


def output_shapes(model, x) -> dict:
    """-> {preact: Outputs} of ``model`` on ``x``, shapes only (``jax.eval_shape``: two traces of the network, the
    initialization's forward pass giving the post-activation features)."""
    def both():
        plain, variables = model.init_with_output(jax.random.key(0), x, preact=False)
        return plain, model.apply(variables, x, preact=True)

    plain, pre = jax.eval_shape(both)
    return {False: Outputs(*plain), True: Outputs(*pre)}


def check_pairs(config, num_classes: int, image_shape) -> None:
    """Refuse, before anything is trained, a method that cannot work for the configured pair (one line)."""
    x = jnp.zeros((2, *image_shape), jnp.float32)
    shapes = {arch: output_shapes(get_model(arch, num_classes), x)
              for arch in dict.fromkeys((config.teacher.arch, config.student.arch))}
    outs = {(who, preact): shapes[config[who].arch][preact] for who in ("teacher", "student")
            for preact in (False, True)}
    for scfg in config.students.values():
        m = method_of(scfg)
        m.check_pair(config.student.arch, config.teacher.arch,
                     outs["student", m.init_student_preact or m.student_preact], outs["teacher", m.teacher_preact])


@dataclasses.dataclass
class _Student:
    """One student of a run, built and ready to train (its init stage done)."""

    name: str
    modules: StudentModules
    objective: Objective
    tx: object
    state: Fresh  # made only if the student starts from scratch
    spec: StageSpec


def _build(run: StageRun, name: str, teacher: Teacher) -> _Student:
    from mgd_jax.stages import init_stage

    config, cfg, scfg = run.config, run.config.student, run.config.students[name]
    method = method_of(scfg)
    granularities = teacher.analyzer.granularities  # the student's encoders mirror the teacher's tubes
    analyzer = None if scfg.granularity == "none" else GranularityAnalyzer(granularities, run.data.num_classes, False)
    modules = StudentModules(run.backbone(cfg.arch), analyzer, method)
    t_modules, t_inputs = TeacherModules.of(teacher), teacher_inputs(teacher)
    tx = run.sgd(cfg.optimizer, cfg.batch_size)
    seed = run.seed("student", name)
    ctx = {"num_train": len(run.data.train_labels)}
    def make():
        return init_state(modules, t_modules, t_inputs, tx, jax.random.key(seed), run.sample_images(), ctx)

    meta = spec_meta(config, name, run.data.num_classes)
    if method.has_init_stage:  # AB / FT / FSP: SPEC_BASELINES §3
        after_init = init_stage.run(run, name, modules, teacher, make(), tx, meta)

        def make():
            return after_init
    extras = None
    if method.needs_contrast:
        from mgd_jax.data.contrast import ContrastSampler
        extras = ContrastSampler(run.data.train_labels, method.nce_k, method.mode, seed)
    objective = objective_of(scfg, granularities, run.steps_per_epoch(cfg.batch_size),
                             cfg.get("logit_standardization", False))
    step = jax.jit(make_train_step(modules, t_modules, objective, tx, config.augment), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(modules, config.augment))
    spec = StageSpec(
        name=f"student/{name}", directory=run.directory("students", name), num_epochs=cfg.epochs,
        batch_size=cfg.batch_size, seed=seed, meta=meta, passes=[("student", step)],
        evaluate=lambda s: run.evaluate(lambda b: eval_step(export_variables(s), b)),
        improve=best_by("test/acc1"), export=lambda s, prev, improved: export_variables(s),
        **run.loop_options(cfg.optimizer), batch_extras=extras)
    return _Student(name, modules, objective, tx, Fresh(make, export_variables), spec)


def run(run: StageRun, name: str, teacher: Teacher) -> tuple[dict, dict]:
    """Train (or resume, or reuse) the student ``config.students[name]`` alone against the frozen ``teacher`` (its
    init stage first for AB / FT / FSP); -> (its best-epoch variables, {'best', 'last'})."""
    st = _build(run, name, teacher)
    _, export, result = fit(st.spec, st.state, teacher_inputs(teacher), run.data, run.mesh)
    return export, result


def _group_extras(students: list):
    samplers = {st.spec.name: (st.spec.seed, st.spec.batch_extras) for st in students
                if st.spec.batch_extras is not None}
    if not samplers:
        return None

    def extras(idx_of, epoch, pass_id, i):  # each sampler reads its own student's rows (its seed's data order)
        return {f"{name}{GROUP_SEP}{k}": v for name, (seed, sampler) in samplers.items()
                for k, v in sampler(idx_of[seed], epoch, pass_id, i).items()}
    return extras


def run_all(run: StageRun, teacher: Teacher) -> dict:
    """Every student of ``config.students``, fused in groups of ``config.student.group_size`` (0: all) that share
    one teacher pass per batch (students of one method as one vmapped program where ``config.student.vmap`` says
    so); each keeps its own checkpoints, metrics and best epoch, as if run alone.  A group killed between its
    members' saves resumes together from the newest step all of them saved (``lockstep_groups``).
    -> {name: (export, result)}, in config order."""
    names = list(run.config.students)
    size = int(run.config.student.get("group_size", 0) or 0) or len(names)
    vmap = vmap_students(run.config.student.get("vmap", "auto"))
    t_modules, t_inputs = TeacherModules.of(teacher), teacher_inputs(teacher)
    out = {}
    for start in range(0, len(names), size):
        chunk = [_build(run, name, teacher) for name in names[start:start + size]]
        by_spec = {id(st.spec): st for st in chunk}
        groups = [([by_spec[id(spec)] for spec in specs], step)
                  for specs, step in lockstep_groups([st.spec for st in chunk])]
        for group, step_from in groups:
            if len(group) == 1:
                st = group[0]
                _, export, result = fit(st.spec, st.state, t_inputs, run.data, run.mesh)
                out[st.name] = (export, result)
                continue
            # one optimizer object: every student's is run.sgd of the same config.student.optimizer (a vmapped
            # subgroup shares its members' optimizer)
            members = {st.spec.name: (st.modules, st.objective, group[0].tx) for st in group}
            seeds = data_orders([st.spec for st in group])
            orders = {st.spec.name: seeds.index(st.spec.seed) for st in group}
            step = jax.jit(make_group_train_step(members, t_modules, run.config.augment, vmap, orders,
                                                 run.mesh.devices.size), donate_argnums=0)
            states = {st.spec.name: st.state for st in group}
            _, exports, results = fit_group([st.spec for st in group], [("students", step)], states, t_inputs,
                                            run.data, run.mesh, None, _group_extras(group), step_from)
            for st in group:
                out[st.name] = (exports[st.spec.name], results[st.spec.name])
    return {name: out[name] for name in names}
