"""Loading a workdir's stages for analysis: its config, its data, a stage's best checkpoint as a function."""
from __future__ import annotations

import json
import os

import ml_collections
import orbax.checkpoint as ocp

from mgd_jax import precision
from mgd_jax.data import load_dataset
from mgd_jax.models import get_model
from mgd_jax.stages.common import apply_backbone
from mgd_jax.train.checkpoint import StageCheckpoints


class AnalysisError(ValueError):
    pass


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise AnalysisError(f"{path} is missing: analysis tools need a workdir written by train.py")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def model_of(config, arch: str, num_classes: int):
    """The backbone as the run computed it: ``config.precision`` (float32 unless the run used bfloat16)."""
    return precision.with_compute_dtype(get_model(arch, num_classes), config.get("precision", "float32"))


def restore_best(directory: str):
    if not os.path.isdir(os.path.join(directory, "checkpoints", "best")):
        raise AnalysisError(f"{directory}/checkpoints/best does not exist (has this stage run?)")
    ck = StageCheckpoints(os.path.join(directory, "checkpoints"))
    try:
        step = ck.best.latest_step()
        if step is None:
            raise AnalysisError(f"{directory}/checkpoints/best holds no checkpoint")
        r = ck.best.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                          meta=ocp.args.JsonRestore()))
        return r["state"], dict(r["meta"])
    finally:
        ck.close()


def backbone_fn(workdir: str, stage: str, config, num_classes: int, preact: bool = False):
    """``stage`` = teacher | students/<name> -> (f(x_normalized) -> (logits, features), meta)."""
    if stage != "teacher" and not stage.startswith("students/"):
        raise AnalysisError(f"stage {stage!r} has no backbone; use teacher or students/<name>")
    variables, meta = restore_best(os.path.join(workdir, stage))
    arch = config.teacher.arch if stage == "teacher" else config.student.arch
    model = model_of(config, arch, num_classes)
    params = variables["params"] if stage == "teacher" else variables["params"]["backbone"]
    stats = variables["batch_stats"] if stage == "teacher" else variables["batch_stats"]["backbone"]

    def fn(x):
        logits, feats, _ = apply_backbone(model, params, stats, x, train=False, preact=preact)
        return logits, feats

    return fn, meta


def load_data(config):
    return load_dataset(config.data)
