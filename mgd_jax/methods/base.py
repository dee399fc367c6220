"""A baseline distillation method is one small object: which features it reads, its auxiliary variables
(trained with the student by the same optimizer), and a pure loss function.

The student step calls ``method.loss(method_vars, student, teacher, train)`` with
``student`` / ``teacher`` = :class:`Outputs` and adds ``weights.method * loss`` (SPEC §3.3 ``w_kd * L_method``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax


@flax.struct.dataclass
class Outputs:
    logits: jax.Array
    features: list  # the backbone's feature list; last entry the pooled vector
    encodings: dict = flax.struct.field(default_factory=dict)  # granularity name -> encoding
    decodings: dict = flax.struct.field(default_factory=dict)  # granularity name -> decoder logits (teacher)


@dataclasses.dataclass(frozen=True)
class Method:
    """Base: no auxiliary variables and no L_method term (the logit KD term lives in the objective)."""

    name: str = "none"
    teacher_preact: bool = False  # run the teacher with preact=True (AB)

    def init(self, key: jax.Array, student: Outputs, teacher: Outputs) -> dict[str, Any]:
        """-> variables {'params': ..., other collections ...}; {} when the method has none."""
        return {}

    def loss(self, variables: dict, student: Outputs, teacher: Outputs, train: bool):
        """-> (loss or None, updated non-param collections)."""
        return None, {k: v for k, v in variables.items() if k != "params"}

    def check_pair(self, student_arch: str, teacher_arch: str, student: Outputs, teacher: Outputs) -> None:
        """Raise ValueError naming method, pair and reason when the method cannot work for the pair."""
