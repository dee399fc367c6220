"""A baseline distillation method is one small object: which features it reads, its auxiliary variables and a
pure loss function.

``init(key, student, teacher, ctx) -> {'params': ..., 'state': ...}``: ``params`` are trained with the student
(same optimizer, schedule and weight decay); ``state`` changes without gradient (BatchNorm statistics, CRD
memory, modules frozen after an init stage).  ``loss(variables, student, teacher, batch, train)`` returns
``(loss or None, new_state)``; the student step adds ``weights.method * loss`` (SPEC §3.3 ``w_kd * L_method``).
Methods with an init stage (AB, FT, FSP) also define ``init_loss``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax


class MethodPairError(ValueError):
    """A method that cannot work for a teacher/student pair (raised before training)."""


@flax.struct.dataclass
class Outputs:
    logits: jax.Array
    features: list  # the backbone's feature list; last entry the pooled vector
    encodings: dict = flax.struct.field(default_factory=dict)  # granularity name -> encoding
    decodings: dict = flax.struct.field(default_factory=dict)  # granularity name -> decoder logits (teacher)


@dataclasses.dataclass(frozen=True)
class Method:
    """Base: no auxiliary variables and no L_method term (Hinton KD lives in the objective's logit-KD term)."""

    name: str = "none"
    teacher_preact: bool = False  # the teacher's features with preact=True (AB)
    needs_contrast: bool = False  # the batch must carry 'index' and 'contrast_idx' (CRD)
    init_student_preact: bool = False  # the student's features with preact=True in the init stage (AB)
    init_trains_student: bool = False  # the init stage also trains the student's feature layers (AB, FSP)
    init_params_key: str | None = None  # where the init stage's trained module goes in the method state

    @property
    def has_init_stage(self) -> bool:
        return type(self).init_loss is not Method.init_loss

    def init(self, key: jax.Array, student: Outputs, teacher: Outputs, ctx: dict | None = None) -> dict[str, Any]:
        return {"params": {}, "state": {}}

    def loss(self, variables: dict, student: Outputs, teacher: Outputs, batch: dict, train: bool):
        return None, variables.get("state", {})

    def init_loss(self, variables: dict, student: Outputs, teacher: Outputs, train: bool):
        """Overridden by methods with an init stage (AB, FT, FSP); ``has_init_stage`` tells which."""
        raise TypeError(f"method {self.name!r} has no init stage")

    def check_pair(self, student_arch: str, teacher_arch: str, student: Outputs, teacher: Outputs) -> None:
        """Raise MethodPairError naming method, pair and reason when the method cannot work for the pair."""
