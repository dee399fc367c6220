"""Transfer of a distilled student (SPEC §7, ``representation_transfer.py``, as intended): a new linear head on
the pooled feature, trained on STL-10 or CIFAR-10 (tfds) with the backbone frozen; ``--full_finetune`` trains
everything.  Works for every architecture (the reference silently trains nothing for VGG, ResNet50, MobileNetV2).

    python -m mgd_jax.transfer --workdir=runs/r56_r20 --stage=students/kd_mas --dataset=stl10

Protocol (reference): SGD lr 0.02 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students), momentum 0.9,
weight decay 5e-4, x0.1 at epochs 20 and 25, 50 epochs, batch 64; STL-10 resized to 32x32, random crop
(pad 4) and flip; the backbone's BatchNorm statistics adapt to the new data (the reference trains in train
mode; ``--no_adapt_bn`` keeps them).  Result: best and last test top-1 in
``<workdir>/transfer/<stage>_<dataset>/result.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mgd_jax import losses, optim
from mgd_jax.analysis.common import AnalysisError, load_config, model_of, restore_best
from mgd_jax.data import augment, load_dataset
from mgd_jax.models.layers import Linear
from mgd_jax.stages.common import TrainState, apply_backbone, classification_counts, step_key, train_metrics
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import flatten_config
from mgd_jax.train.loop import StageSpec, evaluate_dataset, fit

NORMALISATION = {  # STL-10: the reference's data/stl.py; CIFAR-10: the usual constants (no reference value)
    "stl10": ((0.4468, 0.4399, 0.4068), (0.2419, 0.2384, 0.2541)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
LOW_LR = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def transfer_config(dataset: str, student_arch: str, epochs: int = 50) -> ml_collections.ConfigDict:
    if dataset not in NORMALISATION:
        raise AnalysisError(f"unknown transfer dataset {dataset!r}; known: {', '.join(NORMALISATION)}")
    mean, std = NORMALISATION[dataset]
    milestones = tuple(m for m in (20, 25) if m < epochs)
    return ml_collections.ConfigDict(dict(
        data=dict(name=dataset, data_dir=None, image_size=32),
        augment=dict(pad=4, flip=True, mean=mean, std=std), batch_size=64, epochs=epochs,
        optimizer=dict(lr=0.01 if student_arch in LOW_LR else 0.02, momentum=0.9, weight_decay=5e-4,
                       milestones=milestones, gamma=0.1)))


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


def transfer(workdir: str, stage: str, dataset: str, epochs: int = 50, full_finetune: bool = False,
             adapt_bn: bool = True, devices=None, seed: int = 0) -> dict:
    if not stage.startswith("students/") and stage != "teacher":
        raise AnalysisError(f"stage {stage!r} has no backbone; use teacher or students/<name>")
    config = load_config(workdir)
    variables, source_meta = restore_best(os.path.join(workdir, stage))
    arch = config.teacher.arch if stage == "teacher" else config.student.arch
    params = variables["params"] if stage == "teacher" else variables["params"]["backbone"]
    stats = variables["batch_stats"] if stage == "teacher" else variables["batch_stats"]["backbone"]
    tcfg = transfer_config(dataset, arch, epochs)
    if config.data.get("data_dir", None):
        tcfg.data.data_dir = config.data.data_dir
    ds = load_dataset(tcfg.data)
    channels = len(config.augment.mean)
    if channels == 1 and ds.image_shape[-1] == 3:  # a grey-image model (the digits quickstart): luma images
        luma = np.asarray([0.299, 0.587, 0.114], np.float32)
        gray = lambda a: np.clip(np.round(a.astype(np.float32) @ luma), 0, 255).astype(np.uint8)[..., None]  # noqa
        ds = dataclasses.replace(ds, train_images=gray(ds.train_images), test_images=gray(ds.test_images))
        tcfg.augment.mean = (float(np.dot(luma, tcfg.augment.mean)),)
        tcfg.augment.std = (float(np.dot(luma, tcfg.augment.std)),)
    from mgd_jax.stages.student import CLASSIFIER_NAMES
    cls = next(k for k in CLASSIFIER_NAMES if k in params)
    model = model_of(config, arch, int(params[cls]["kernel"].shape[-1]))  # its classifier is kept but unused
    head = Linear(ds.num_classes)
    mesh = mesh_lib.make_mesh(devices)
    steps = mesh_lib.steps_per_epoch(len(ds.train_labels), tcfg.batch_size, mesh.devices.size)
    tx = optim.sgd(tcfg.optimizer, steps)
    sample = augment.eval_transform(ds.train_images[:2], tcfg.augment)
    d = model.apply({"params": params, "batch_stats": stats}, sample)[1][-1].shape[-1]
    trained = {"head": head.init(jax.random.key(seed), jnp.zeros((1, d)))["params"]}
    extra = {"backbone": stats}
    if full_finetune:
        trained["backbone"] = params
    else:
        extra["frozen_backbone"] = params
    state = mesh_lib.replicate(TrainState.create(trained, extra, tx), mesh)
    step = jax.jit(make_train_step(model, head, tx, tcfg.augment, adapt_bn, full_finetune), donate_argnums=0)
    ev = jax.jit(make_eval_step(model, head, tcfg.augment, full_finetune))
    name = f"{stage.replace('/', '_')}_{dataset}" + ("_full" if full_finetune else "")
    directory = os.path.join(workdir, "transfer", name)

    def improve(best, metrics, epoch):
        if not best or metrics["test/acc1"] > best["test/acc1"]:
            return {**metrics, "epoch": epoch + 1}, ["all"]
        return best, []

    # Everything that changes the result, so that a rerun with other options (or after the source stage was
    # retrained) is refused with the field's name instead of returning the old result under the new options.
    identity = {"transfer.full_finetune": full_finetune, "transfer.adapt_bn": adapt_bn, "transfer.seed": seed,
                **{k: v for k, v in flatten_config("transfer", tcfg).items() if k != "transfer.data.data_dir"},
                "config.precision": config.get("precision", "float32"),
                "source.stage": stage, "source.best_epoch": source_meta.get("epoch"),
                **{f"source.{k}": v for k, v in dict(source_meta.get("config", {})).items()}}
    spec = StageSpec(name=f"transfer/{name}", directory=directory, num_epochs=tcfg.epochs,
                     batch_size=tcfg.batch_size, seed=seed,
                     meta={"stage": "transfer", "arch": arch, "dataset": dataset, "full": full_finetune,
                           "config": identity},
                     passes=[("transfer", step)],
                     evaluate=lambda s: evaluate_dataset(lambda b: ev(s, b), ds.test_images, ds.test_labels, 500,
                                                         mesh),
                     improve=improve, export=lambda s, prev, imp: s.params["head"], progress=False)
    _, _, result = fit(spec, state, None, ds, mesh, jax.device_get(state.params["head"]))
    out = {"stage": stage, "dataset": dataset, "full_finetune": full_finetune, "adapt_bn": adapt_bn,
           "epochs": tcfg.epochs, "best_top1": result["best"].get("test/acc1"),
           "best_epoch": result["best"].get("epoch"), "last_top1": result["last"].get("test/acc1")}
    with open(os.path.join(directory, "result.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--dataset", default="stl10", choices=sorted(NORMALISATION))
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--full_finetune", action="store_true")
    p.add_argument("--no_adapt_bn", action="store_true")
    a = p.parse_args(argv)
    from mgd_jax.errors import USER_ERRORS
    try:
        out = transfer(os.path.abspath(a.workdir), a.stage, a.dataset, a.epochs, a.full_finetune,
                       not a.no_adapt_bn)
    except (AnalysisError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
