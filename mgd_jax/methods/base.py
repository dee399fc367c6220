"""A baseline distillation method is one small object: which features it reads, its auxiliary variables, a pure
loss function, and the defaults a config takes from it.  One file per method in this package; the file's
``@register`` puts it in the registry (``get_method(name)``, ``known_methods()``).

What a stage uses:

* ``init(key, student, teacher, ctx) -> {'params': ..., 'state': ...}``: ``params`` are trained with the student
  (same optimizer, schedule and weight decay); ``state`` changes without gradient (BatchNorm statistics, CRD
  memory, modules frozen after an init stage).  ``ctx``: ``{'num_train': N}``.
* ``loss(variables, student, teacher, batch, train) -> (loss or None, new_state)``; ``variables`` is
  ``{'params': ..., 'state': ...}`` as ``init`` made them.  The student step adds ``weights.method * loss``
  (SPEC §3.3 ``w_kd * L_method``); None: no L_method term.
* Forward options: ``teacher_preact`` / ``student_preact`` (the teacher's / student's features with
  ``preact=True``: AB, ReviewKD, OFD), ``needs_contrast`` (the batch carries ``index`` and ``contrast_idx``: CRD),
  ``check_pair`` (raises ``MethodPairError`` before training).  The batch ``loss`` sees also carries ``label`` and,
  from the student stage, ``epoch``: the 1-based epoch of the step (a traced scalar; ``common.warmup``).
* Logit methods (``logit_method``: DKD, DIST) read ``teacher.logits``; the student step hands them the objective's
  distillation target there (MAS: the stable-excitation target).  ``logit_kl``: the loss is a KL of logits, so the
  student run's ``logit_standardization`` standardizes the student's and the target's logits it reads (DKD).
* ``init``'s ``ctx`` from the student stage also carries ``teacher_model`` and ``teacher_variables`` (the frozen
  teacher backbone and its variables: OFD's margins come from its BatchNorm parameters).
* Init stage (AB, FT, FSP; ``has_init_stage``): ``init_stage_params(key, student, teacher, ctx)`` are the
  parameters it trains besides the student's feature modules (``init_trains_student``) and ``init_loss`` its
  loss; after it they are frozen into ``state[init_params_key]``.

What a config takes (``configs/default.py: student_run``): ``loss_weights(protocol)``, ``options()`` (a run's
``method_options``), ``init_epochs`` and ``init_lr(student_arch, student_lr)``; for a named pair also
``pair_options(teacher_arch, student_arch)`` (option values the method's authors set per pair: DKD's beta) and
``pair_beta(teacher_arch, student_arch)`` (the L_method weight per pair: ReviewKD's).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax
import jax

from mgd_jax.errors import MethodPairError  # a method's check_pair raises it

__all__ = ["PROTOCOLS", "Method", "MethodPairError", "Outputs", "get_method", "known_methods", "register"]

# Weight protocols of a student run (configs/default.py STUDENT_MODES names which mode uses which):
# 'mg': the authors' MG scripts (scripts/cifar100_*.sh): CE 1, logit KD (T = 4) 1, the method at its beta;
# 'repdistiller': the paper's baseline protocol, RepDistiller's "-a 0 -b beta": CE 1, no logit KD, the method at
# its beta.  Hinton KD and 'none' have their own (kd.py, none.py).
PROTOCOLS = ("mg", "repdistiller")


@flax.struct.dataclass
class Outputs:
    logits: jax.Array
    features: list  # the backbone's feature list; last entry the pooled vector
    encodings: dict = flax.struct.field(default_factory=dict)  # granularity name -> encoding
    decodings: dict = flax.struct.field(default_factory=dict)  # granularity name -> decoder logits (teacher)


@dataclasses.dataclass(frozen=True)
class Method:
    """Base: no auxiliary variables and no L_method term.  Fields are the options ``get_method`` (and a config's
    ``method_options``, for the names in ``config_options``) may override; class variables are fixed defaults."""

    name: str = "none"
    teacher_preact: bool = False  # the teacher's features with preact=True (AB, ReviewKD, OFD)
    student_preact: bool = False  # the student's features with preact=True in the main stage (OFD)
    needs_contrast: bool = False  # the batch must carry 'index' and 'contrast_idx' (CRD)
    init_student_preact: bool = False  # the student's features with preact=True in the init stage (AB)
    init_trains_student: bool = False  # the init stage also trains the student's feature layers (AB, FSP)
    init_params_key: str | None = None  # where the init stage's trained parameters go in the method state

    # Position in known_methods(): the README table's order.  A new method leaves it: listed after the others,
    # in the order the files are imported (alphabetical).
    order: ClassVar[float] = float("inf")
    # Weight of L_method under both protocols (PROTOCOLS); each method says where its number comes from.
    beta: ClassVar[float] = 1.0
    # The fields a config sets in a student run's ``method_options`` (student_run writes their defaults).
    config_options: ClassVar[tuple[str, ...]] = ()
    # Init stage (RepDistiller's pretrain.py): 30 epochs at a constant lr (``init_lr``).
    init_epochs: ClassVar[int] = 30
    # A logit method (DKD, DIST): ``teacher.logits`` in ``loss`` is the objective's target (MAS: stable excitation).
    logit_method: ClassVar[bool] = False
    # Its loss is a KL of logits: ``logit_standardization`` standardizes the logits ``loss`` sees (DKD).
    logit_kl: ClassVar[bool] = False

    @property
    def has_init_stage(self) -> bool:
        return type(self).init_loss is not Method.init_loss

    def loss_weights(self, protocol: str) -> dict[str, float]:
        """``{'ce', 'logit_kd', 'method'}`` weights under a protocol (PROTOCOLS)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown weight protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        return dict(ce=1.0, logit_kd=1.0 if protocol == "mg" else 0.0, method=self.beta)

    def options(self) -> dict[str, Any]:
        """The config-visible options (``config_options``) and their values."""
        return {k: getattr(self, k) for k in self.config_options}

    def pair_options(self, teacher_arch: str, student_arch: str) -> dict[str, Any]:
        """Option values the method's authors set for this teacher -> student pair (default: none)."""
        return {}

    def pair_beta(self, teacher_arch: str, student_arch: str) -> float | None:
        """The L_method weight for this pair where the method's authors set one per pair (None: ``beta``)."""
        return None

    def init_lr(self, student_arch: str, student_lr: float) -> float:
        """The init stage's lr (pretrain.py: the student's)."""
        return student_lr

    def init(self, key: jax.Array, student: Outputs, teacher: Outputs, ctx: dict | None = None) -> dict[str, Any]:
        return {"params": {}, "state": {}}

    def loss(self, variables: dict, student: Outputs, teacher: Outputs, batch: dict, train: bool):
        return None, variables.get("state", {})

    def init_stage_params(self, key: jax.Array, student: Outputs, teacher: Outputs, ctx: dict | None = None) -> dict:
        """The parameters the init stage trains besides the student's feature modules (AB's connectors, FT's
        paraphraser; FSP: none), initialised from ``key`` as ``init`` initialises them from the same key."""
        return {}

    def init_loss(self, variables: dict, student: Outputs, teacher: Outputs, train: bool):
        """Overridden by methods with an init stage (AB, FT, FSP); ``has_init_stage`` tells which.  ``variables``:
        ``{'params': init_stage_params, 'state': init's state}`` -> ``(loss, new_state)``."""
        raise TypeError(f"method {self.name!r} has no init stage")

    def check_pair(self, student_arch: str, teacher_arch: str, student: Outputs, teacher: Outputs) -> None:
        """Raise MethodPairError naming method, pair and reason when the method cannot work for the pair."""


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: the method (its default instance) becomes ``get_method(cls.name)``."""
    method = cls()
    old = _REGISTRY.get(method.name)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method name {method.name!r} is taken by {type(old).__module__}.{type(old).__qualname__}")
    _REGISTRY[method.name] = method
    return cls


def known_methods() -> tuple[str, ...]:
    """Registered names by ``order`` (then registration order)."""
    return tuple(sorted(_REGISTRY, key=lambda n: _REGISTRY[n].order))


def get_method(name: str, **options) -> Method:
    """The registered method, with ``options`` overriding its fields (e.g. crd: nce_k=4096, mode='relax')."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(known_methods())}")
    m = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(m)}
    bad = sorted(set(options) - fields)
    if bad:
        raise ValueError(f"method {name!r} has no option {bad[0]!r}; options: {', '.join(sorted(fields - {'name'}))}")
    return dataclasses.replace(m, **options) if options else m
