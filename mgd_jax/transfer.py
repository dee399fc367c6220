"""Transfer of a distilled student (the paper's transfer experiment; the authors' ``representation_transfer.py`` as
intended): a new linear head on the pooled feature, trained on STL-10 or CIFAR-10 (tfds) with the backbone frozen;
``--full_finetune`` trains everything.  Works for every architecture (the reference silently trains nothing for VGG, ResNet50, MobileNetV2).

    python -m mgd_jax.transfer --workdir=runs/r56_r20 --stage=students/kd_mas --dataset=stl10
    python -m mgd_jax.transfer --workdir=runs/r56_r20 --stage=students/kd_mas --config=configs/transfer.py:cifar10 \
        --config.epochs=30

The recipe is the config file's (``--config``, default ``configs/transfer.py``, read from the repository root;
``--config.FIELD=VALUE`` overrides a field): the reference's SGD lr 0.02 (the config's ``low_lr`` for a
``mgd_jax.models.LOW_LR_ARCHITECTURES`` backbone), x0.1 at epochs 20 and 25, 50 epochs, batch 64, STL-10 resized
to 32x32; the backbone's BatchNorm statistics adapt to the new data (the reference trains in train mode;
``--no_adapt_bn`` keeps them).  ``--dataset``, ``--epochs``, ``--full_finetune`` and ``--no_adapt_bn`` are
shorthands for the config's argument and fields.  Result: best and last test top-1 in
``<workdir>/transfer/<stage>_<dataset>/result.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mgd_jax import losses, optim
from mgd_jax.analysis.common import (BACKBONE_STAGES, Run, cli, load_config_file, override, parse_with_overrides,
                                     tool_parser)
from mgd_jax.config_validation import validate_transfer_config
from mgd_jax.data import augment, load_dataset
from mgd_jax.errors import ConfigError
from mgd_jax.models import LOW_LR_ARCHITECTURES
from mgd_jax.models.layers import Linear
from mgd_jax.stages.common import (TrainState, apply_backbone, classification_counts, legacy_layout, step_key,
                                   train_metrics)
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import flatten_config
from mgd_jax.train.loop import StageSpec, evaluate_dataset, fit

DEFAULT_CONFIG = "configs/transfer.py"
# Config fields that do not change the result (``low_lr`` acts through the recipe's ``optimizer.lr``).
_NOT_RESULT_FIELDS = ("data.data_dir", "eval_batch_size", "low_lr")


def recipe(config: ml_collections.ConfigDict, arch: str) -> ml_collections.ConfigDict:
    """The transfer config as a backbone ``arch`` trains under it: the config's ``low_lr`` for a
    ``LOW_LR_ARCHITECTURES`` backbone, milestones at or after the last epoch dropped."""
    r = config.copy_and_resolve_references()
    r.optimizer.lr = config.low_lr if arch in LOW_LR_ARCHITECTURES else config.optimizer.lr
    r.optimizer.milestones = tuple(m for m in config.optimizer.milestones if m < config.epochs)
    return r


def make_train_step(model, head, tx, aug, adapt_bn: bool, full: bool):
    def step(state: TrainState, frozen, batch, base_key):
        x = augment.train_transform(batch["image"], step_key(base_key, state.step), aug)

        def loss_fn(params):
            backbone = params["backbone"] if full else state.batch_stats["frozen_backbone"]
            _, feats, new_bs = apply_backbone(model, backbone, state.batch_stats["backbone"], x,
                                              train=adapt_bn or full)
            h = feats[-1] if full else jax.lax.stop_gradient(feats[-1])
            logits = head.apply({"params": params["head"]}, h)
            ce = losses.cross_entropy(logits, batch["label"])
            return ce, ({"ce": ce}, logits, new_bs)

        (loss, (terms, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        stats = {**state.batch_stats, "backbone": new_bs}
        return state.apply_gradients(grads, tx, stats), train_metrics(loss, terms, logits, batch["label"], grads)

    return step


def make_eval_step(model, head, aug, full: bool):
    def eval_step(state, batch):
        x = augment.eval_transform(batch["image"], aug)
        backbone = state.params["backbone"] if full else state.batch_stats["frozen_backbone"]
        _, feats, _ = apply_backbone(model, backbone, state.batch_stats["backbone"], x, train=False)
        logits = head.apply({"params": state.params["head"]}, feats[-1])
        return classification_counts(logits, batch["label"], batch["mask"])

    return eval_step


def transfer(workdir: str, stage: str, config: ml_collections.ConfigDict, devices=None) -> dict:
    """Trains (or resumes, or returns the finished result of) the transfer of ``stage``'s backbone under
    ``config`` (``configs/transfer.py``)."""
    run = Run(workdir)
    stage = run.check_stage(stage)
    # the recipe is checked before the (slower) restore: the backbone's architecture is the run config's
    tcfg = recipe(config, run.config.teacher.arch if stage == "teacher" else run.config.student.arch)
    validate_transfer_config(tcfg)
    if not os.access(run.workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={run.workdir}: not writable (the transfer writes into <workdir>/transfer/)")
    backbone = run.backbone(stage)
    if not tcfg.data.get("data_dir", None) and run.config.data.get("data_dir", None):
        tcfg.data.data_dir = run.config.data.data_dir
    ds = load_dataset(tcfg.data)
    channels = len(run.config.augment.mean)
    if channels == 1 and ds.image_shape[-1] == 3:  # a grey-image model (the digits quickstart): luma images
        luma = np.asarray([0.299, 0.587, 0.114], np.float32)
        gray = lambda a: np.clip(np.round(a.astype(np.float32) @ luma), 0, 255).astype(np.uint8)[..., None]  # noqa
        ds = dataclasses.replace(ds, train_images=gray(ds.train_images), test_images=gray(ds.test_images))
        tcfg.augment.mean = (float(np.dot(luma, tcfg.augment.mean)),)
        tcfg.augment.std = (float(np.dot(luma, tcfg.augment.std)),)
    model = backbone.model  # its classifier is kept but unused
    head = Linear(ds.num_classes)
    mesh = mesh_lib.make_mesh(devices)
    steps = mesh_lib.steps_per_epoch(len(ds.train_labels), tcfg.batch_size, mesh.devices.size)
    tx = optim.sgd(tcfg.optimizer, steps)
    trained = {"head": head.init(jax.random.key(tcfg.seed), jnp.zeros((1, backbone.feature_dim)))["params"]}
    extra = {"backbone": backbone.variables["batch_stats"]}
    if tcfg.full_finetune:
        trained["backbone"] = backbone.variables["params"]
    else:
        extra["frozen_backbone"] = backbone.variables["params"]
    state = mesh_lib.replicate(TrainState.create(trained, extra, tx), mesh)
    step = jax.jit(make_train_step(model, head, tx, tcfg.augment, tcfg.adapt_bn, tcfg.full_finetune),
                   donate_argnums=0)
    ev = jax.jit(make_eval_step(model, head, tcfg.augment, tcfg.full_finetune))
    name = f"{stage.replace('/', '_')}_{tcfg.data.name}" + ("_full" if tcfg.full_finetune else "")
    directory = os.path.join(run.workdir, "transfer", name)

    def improve(best, metrics, epoch):
        if not best or metrics["test/acc1"] > best["test/acc1"]:
            return {**metrics, "epoch": epoch + 1}, ["all"]
        return best, []

    # Everything that changes the result, so that a rerun with other options (or after the source stage was
    # retrained) is refused with the field's name instead of returning the old result under the new options.
    source = backbone.meta
    identity = {**{k: v for k, v in flatten_config("transfer", tcfg).items()
                   if k.split(".", 1)[1] not in _NOT_RESULT_FIELDS},
                "config.precision": run.config.get("precision", "float32"),
                "source.stage": stage, "source.best_epoch": source.get("epoch"),
                **{f"source.{k}": v for k, v in dict(source.get("config", {})).items()}}
    spec = StageSpec(name=f"transfer/{name}", directory=directory, num_epochs=tcfg.epochs,
                     batch_size=tcfg.batch_size, seed=tcfg.seed,
                     meta={"stage": "transfer", "arch": backbone.arch, "dataset": tcfg.data.name,
                           "full": tcfg.full_finetune, "config": identity},
                     passes=[("transfer", step)],
                     evaluate=lambda s: evaluate_dataset(lambda b: ev(s, b), ds.test_images, ds.test_labels,
                                                         tcfg.eval_batch_size, mesh),
                     improve=improve, export=lambda s, prev, imp: s.params["head"], progress=False,
                     legacy_layout=legacy_layout)
    _, _, result = fit(spec, state, None, ds, mesh, jax.device_get(state.params["head"]))
    out = {"stage": stage, "dataset": tcfg.data.name, "full_finetune": tcfg.full_finetune, "adapt_bn": tcfg.adapt_bn,
           "epochs": tcfg.epochs, "best_top1": result["best"].get("test/acc1"),
           "best_epoch": result["best"].get("epoch"), "last_top1": result["last"].get("test/acc1")}
    with open(os.path.join(directory, "result.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def config_from_flags(a, overrides) -> ml_collections.ConfigDict:
    """--config (its argument or --dataset), then the shorthand flags, then --config.FIELD=VALUE overrides."""
    path, colon, argument = a.config.partition(":")
    if a.dataset and colon and argument != a.dataset:
        raise ConfigError(f"--dataset={a.dataset} contradicts --config={a.config}")
    config = load_config_file(path, a.dataset or (argument if colon else None))
    shorthands = [("epochs", a.epochs is not None, str(a.epochs)), ("full_finetune", a.full_finetune, "True"),
                  ("adapt_bn", a.no_adapt_bn, "False")]
    for field, given, text in shorthands:
        if given:
            override(config, field, text)
    for field, text in overrides:
        override(config, field, text)
    return config


@cli
def main(argv=None):
    p = tool_parser(__doc__, stage=BACKBONE_STAGES, prog="python -m mgd_jax.transfer")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the recipe: a config file[:dataset]; "
                                                           "--config.FIELD=VALUE overrides one of its fields")
    p.add_argument("--dataset", help="the config file's argument: stl10 (its default) or cifar10")
    p.add_argument("--epochs", type=int, help="--config.epochs")
    p.add_argument("--full_finetune", action="store_true", help="--config.full_finetune=True")
    p.add_argument("--no_adapt_bn", action="store_true", help="--config.adapt_bn=False")
    a, overrides = parse_with_overrides(p, argv)
    print(json.dumps(transfer(a.workdir, a.stage, config_from_flags(a, overrides)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
