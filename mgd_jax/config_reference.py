"""docs/config.md: every config field with its default and meaning, generated from the config files.

    python -m mgd_jax.config_reference            # writes docs/config.md (run from the repository root)
    python -m mgd_jax.config_reference --check    # exit status 1 when docs/config.md is not what the configs give

The config files are read by path from the working directory, as train.py's ``--config`` and the sweep read them
(nothing in the package imports ``configs/``).  Every field must have a meaning in ``DESCRIPTIONS`` (the training
configs) or ``TRANSFER_DESCRIPTIONS`` (``configs/transfer.py``): a field without one is one ``error:`` line naming
the field, the config that has it and the table to add it to (exit status 2), and so is a description of a field
that no config has any more.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import sys
from typing import Any

import ml_collections

OUT = os.path.join("docs", "config.md")
THIS_FILE = "mgd_jax/config_reference.py"

# The training configs, in the column order of the reference: (label, file[:argument]).  default.py is the base the
# others override; the last entry only shows the fields of a method with an init stage (students.<name>.init.*).
TRAIN_CONFIGS = (
    ("default.py", "configs/default.py"),
    ("cifar100.py", "configs/cifar100.py"),
    ("quickstart.py", "configs/quickstart.py"),
    ("smoke.py", "configs/smoke.py"),
    ("imagenet.py", "configs/imagenet.py"),
    ("dml.py", "configs/dml.py"),
    ("cifar100.py:resnet56,resnet20,factor,mas", "configs/cifar100.py:resnet56,resnet20,factor,mas"),
)
TRANSFER_CONFIGS = (
    ("transfer.py", "configs/transfer.py"),
    ("transfer.py:cifar10", "configs/transfer.py:cifar10"),
)
# A student run's key in ``students`` is its name (its folder students/<name>/); the reference shows it as <name>.
STUDENT = "students.<name>"
# A method's options are one field here (their defaults per method: the table at the end).
METHOD_OPTIONS = STUDENT + ".method_options"

_OPT = {  # the SGD block every stage has (configs/default.py: sgd)
    "*optimizer.lr": "learning rate until the first milestone (SGD)",
    "*optimizer.momentum": "SGD momentum (the paper's 0.9)",
    "*optimizer.weight_decay": "L2 weight decay on every trained parameter, added to the gradient (PyTorch's SGD)",
    "*optimizer.milestones": "epochs after which the learning rate is multiplied by `gamma` (each must lie before "
                             "the stage's last epoch; `()`: constant)",
    "*optimizer.gamma": "learning-rate factor at each milestone",
}

# Meanings of the training configs' fields (train.py --config=...).  Keys are dotted field names; a key with '*'
# matches any prefix (fnmatch).
DESCRIPTIONS: dict[str, str] = {
    "seed": "seed of the initialisations, the data order and the augmentation (a run is a function of it; 0 to "
            "4294966)",
    "data.name": "dataset: `digits` (scikit-learn's, bundled), `cifar100`, `cifar10`, `stl10` (tfds), "
                 "`imagenet2012` (tfds, streamed), `image_folder` (streamed from `data.dir`) or `synthetic_cifar` "
                 "(random images of CIFAR-100's shapes made in memory, for timing: nothing to learn)",
    "data.data_dir": "tfds data directory (`None`: tfds' default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`)",
    "data.train_limit": "use only the first N training images (smoke runs and tests; `None`: all)",
    "data.test_limit": "use only the first N test images (`None`: all)",
    "data.on_device": "keep the training set on every device and send a step only its row indices (`None`: on "
                      "GPU / TPU, not on CPU)",
    "data.image_size": "image side in pixels: the digits are upsampled (nearest) from 8x8 to it (a multiple of 8); "
                       "streamed images are cropped to it",
    "data.test_size": "digits: images held out for the test split (stratified)",
    "data.split_seed": "digits: seed of the stratified train / test split",
    "data.split": "digits: how the train / test split is drawn: `stratified` (mgd-jax's own: each class's share of "
                  "the test images by largest remainder, its members drawn at random) or `sklearn` (scikit-learn's "
                  "`train_test_split`, the split of workdirs written before this field existed)",
    "data.dir": "an image folder with `train/<class>/` and `val/<class>/` (`None`: tfds `imagenet2012` in "
                "`data_dir`)",
    "data.flip": "streamed data: random horizontal flip on the host",
    "data.crop_scale": "streamed data: RandomResizedCrop's range of the crop's area (fraction of the image)",
    "data.eval_resize_ratio": "streamed data: evaluation resizes the short side to `image_size` x this, then "
                              "crops the centre (256 / 224)",
    "data.workers": "streamed data: decoding threads per process (`None`: one per core)",
    "data.prefetch": "streamed data: batches decoded ahead of the step",
    "data.skip_unreadable": "streamed data: replace a file that cannot be decoded by a black image (named in a "
                            "warning) instead of stopping with an error",
    "data.loader": "streamed data: `threads` (a host thread pool) or `grain` (`pip install -e '.[imagenet]'`)",
    "data.processes": "streamed data with `loader=grain`: decode training batches in this many worker processes "
                      "(0: threads)",
    "data.num_classes": "image folder: the classifier's class count (`None`: the number of class folders)",
    "augment.pad": "zero padding in pixels before the random crop back to the image size (0: no crop on the "
                   "device)",
    "augment.flip": "random horizontal flip on the device",
    "augment.mean": "per-channel mean subtracted after scaling pixels to [0, 1]",
    "augment.std": "per-channel standard deviation the pixels are divided by",
    "drop_remainder": "drop the last, smaller training batch of an epoch (`False`: kept, as the reference does; "
                      "trimmed to a multiple of the device count)",
    "eval_batch_size": "batch size of the evaluations (does not change the numbers)",
    "granularities": "the analyzer's granularities, (encoding dim, temperature) each (the paper: 64-d at T=2, "
                     "256-d at T=8)",
    "progress": "a progress bar while an epoch trains (on a terminal only)",
    "compilation_cache": "persistent XLA compilation cache in `<workdir>/.jax_cache` (or "
                         "`$JAX_COMPILATION_CACHE_DIR`): a resumed or repeated run skips compiling; off for a run of "
                         "several CPU processes (each compiles its own steps)",
    "cpu_devices": "CPU only: XLA devices the batch is split over (`None`: one per core; 0: XLA's single CPU "
                   "device); ignored when `XLA_FLAGS` sets a device count",
    "precision": "compute dtype of the backbones: `float32` (the paper's) or `bfloat16` (float32 parameters, "
                 "BatchNorm statistics, tubes and losses)",
    "checkpoint.every_steps": "also write the latest checkpoint every N steps inside an epoch (a kill redoes at "
                              "most N steps)",
    "checkpoint.keep": "latest checkpoints kept per stage (besides the best)",
    "distributed.coordinator_address": "multi-host: `host:port` of process 0 (`None`: from the launcher or "
                                       "`$JAX_COORDINATOR_ADDRESS`)",
    "distributed.num_processes": "multi-host: number of processes (`None`: from the launcher or "
                                 "`$JAX_NUM_PROCESSES`; 1: one process whatever the launcher says)",
    "distributed.process_id": "multi-host: this process's index (`None`: from the launcher or `$JAX_PROCESS_ID`)",
    "distributed.timeout_seconds": "multi-host: how long a process waits for the others to join",
    "distributed.heartbeat_timeout_seconds": "multi-host: a process silent this long counts as lost; every other "
                                             "process then stops in one line with exit status 75 (restartable)",
    "teacher.arch": "stage 1: the teacher's architecture (a name of the model zoo)",
    "teacher.epochs": "stage 1: training epochs",
    "teacher.batch_size": "stage 1: global batch size (split over all devices and processes)",
    "analyzer.epochs": "stage 2: epochs of each granularity's tube on the frozen teacher",
    "analyzer.batch_size": "stage 2: global batch size",
    "analyzer.shared_pass": "stage 2: train every tube on one teacher pass per batch (`False`: one pass per "
                            "granularity, as the reference; the same losses)",
    "student.arch": "stage 3: the students' architecture",
    "student.epochs": "stage 3: training epochs of every student",
    "student.batch_size": "stage 3: global batch size",
    "student.group_size": "stage 3: students trained fused, this many per group, sharing one teacher pass per "
                          "batch (0: all in one group; 1: one after another)",
    "student.vmap": "stage 3: in a fused group, the students of one method (any mode) run as one vmapped program, "
                    "each convolution one batched kernel: `on`, `off` or `auto` (vmapped where it measured faster; "
                    "unrolled on CPU, where it is slower, and on GPU / TPU until measured there: docs/speed.md)",
    "student.logit_standardization": "stage 3: z-score the logits of every logit-level KL of the objective (the KD "
                                     "/ stable-excitation term, DKD) before the temperature (Sun et al., CVPR "
                                     "2024); off in the paper",
    STUDENT + ".method": "the student's baseline method (`none`, `kd`, `hint`, ... `factor`: the table below)",
    STUDENT + ".granularity": "granularity terms: `none`, `mag` (granularity-wise distillation) or `mas` (stable "
                              "excitation)",
    STUDENT + ".protocol": "weight protocol: `mg` (the authors' scripts) or `repdistiller` (the paper's baseline "
                           "numbers); set by the config argument's mode",
    STUDENT + ".temperature": "temperature of the logit-KD term",
    STUDENT + ".seed": "the student's own seed (its initialisation, data order and augmentation; `-1`: the run's "
                       "`seed`): students differing only in seed train fused, one vmapped program where "
                       "`student.vmap` is on, each with its own batches",
    STUDENT + ".weights.ce": "weight of the cross-entropy term",
    STUDENT + ".weights.logit_kd": "weight of the logit-KD term (MAS: against the stable-excitation target)",
    STUDENT + ".weights.method": "weight of the method's own loss (its beta)",
    STUDENT + ".weights.granularity": "weight of the granularity terms (KL of the student's encodings)",
    METHOD_OPTIONS: "the method's options (CRD's feature dim, negatives, ...); defaults per method in the table "
                    "below",
    STUDENT + ".init.epochs": "AB / FT / FSP: epochs of the init stage before the student trains",
    "mutual.peers": "mutual learning: the peers' architectures (two or more)",
    "mutual.granularity": "mutual learning: every peer carries the granularity tubes (MDP-DML; `False`: DML)",
    "mutual.epochs": "mutual learning: training epochs",
    "mutual.batch_size": "mutual learning: global batch size",
    "mutual.low_lr": "mutual learning: the learning rate of MobileNetV2 / ShuffleV1 / ShuffleV2 peers",
    **_OPT,
}

# Meanings of configs/transfer.py's fields (python -m mgd_jax.transfer --config=...).
TRANSFER_DESCRIPTIONS: dict[str, str] = {
    "seed": "seed of the new head's initialisation, the data order and the augmentation",
    "data.name": "target dataset: `stl10` or `cifar10` (tfds)",
    "data.data_dir": "tfds data directory (`None`: the source run's `data.data_dir`, else tfds' default)",
    "data.image_size": "images are resized to this side (the reference: STL-10 at 32x32)",
    "augment.pad": "zero padding before the random crop",
    "augment.flip": "random horizontal flip",
    "augment.mean": "per-channel mean of the target dataset",
    "augment.std": "per-channel standard deviation of the target dataset",
    "batch_size": "batch size",
    "epochs": "training epochs (milestones at or after the last epoch are dropped)",
    "low_lr": "replaces `optimizer.lr` for MobileNetV2 / ShuffleV1 / ShuffleV2 backbones",
    "adapt_bn": "the backbone's BatchNorm statistics adapt to the new data (the reference trains in train mode)",
    "full_finetune": "train the whole network, not only the new linear head",
    "eval_batch_size": "batch size of the evaluations",
    **_OPT,
}


class ReferenceError(Exception):
    """A field without a meaning, or a meaning without a field: the lines to print."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def flatten(config: ml_collections.ConfigDict) -> dict[str, tuple[Any, str]]:
    """``{dotted field: (value, type name)}``; students' names become ``<name>`` and ``method_options`` one field
    (a config with several students gives a field the list of their distinct values)."""
    out: dict[str, tuple[list, str]] = {}

    def walk(node, prefix):
        for key in sorted(node.keys()):
            value = node[key]
            path = f"{prefix}{key}"
            if prefix == "students.":
                path = STUDENT
            if path == METHOD_OPTIONS:
                value = "per method"
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, path + ".")
                continue
            kind = node.get_type(key) if isinstance(node, ml_collections.ConfigDict) else type(value)
            values, _ = out.setdefault(path, ([], getattr(kind, "__name__", str(kind))))
            if value not in values:
                values.append(value)

    walk(config, "")
    return {k: (v[0] if len(v) == 1 else tuple(v), kind) for k, (v, kind) in out.items()}


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return f"`None` ({kind})" if kind and kind != "NoneType" else "`None`"
    if isinstance(value, float):
        text = repr(value) if len(repr(value)) <= 8 else f"{value:.6g}"
        return f"`{text}`"
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return "`" + repr(value) + "`"
    if value == "per method":
        return "per method"
    return f"`{value!r}`"


def describe(field: str, table: dict[str, str]) -> str | None:
    if field in table:
        return table[field]
    for pattern, text in table.items():
        if "*" in pattern and fnmatch.fnmatchcase(field, pattern):
            return text
    return None


def load(spec: str) -> ml_collections.ConfigDict:
    """``path[:argument]`` -> the file's ``get_config([argument])``, the file imported by path as train.py's
    ``--config`` imports it (its ``from configs import ...`` resolves from the working directory)."""
    path, colon, argument = spec.partition(":")
    name = "mgd_config_reference_" + "".join(ch if ch.isalnum() else "_" for ch in os.path.abspath(path))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if colon else module.get_config()


def _rows(configs, table, table_name):
    """[(field, [(label, value, kind) for each config having it], meaning)], the errors' lines."""
    loaded = [(label, spec, flatten(load(spec))) for label, spec in configs]
    fields = sorted({f for _, _, flat in loaded for f in flat}, key=_order)
    rows, errors = [], []
    for field in fields:
        meaning = describe(field, table)
        if meaning is None:
            first = next(spec for _, spec, flat in loaded if field in flat)
            errors.append(f"error: config field {field!r} ({first.split(':')[0]}) has no description: add "
                          f"\"{field}\": \"<what it means>\" to {table_name} in {THIS_FILE}")
        rows.append((field, [(label, *flat[field]) for label, _, flat in loaded if field in flat], meaning))
    for key in table:
        if "*" not in key and key not in fields:
            errors.append(f"error: {table_name} in {THIS_FILE} describes {key!r}, which no config has: remove it "
                          f"(or rename it as the field is now called)")
    return rows, errors


_SECTION_ORDER = ("seed", "data", "augment", "drop_remainder", "eval_batch_size", "granularities", "precision",
                  "teacher", "analyzer", "student", "students", "mutual", "checkpoint", "compilation_cache",
                  "cpu_devices", "distributed", "progress")


def _order(field: str):
    head = field.split(".")[0]
    return (_SECTION_ORDER.index(head) if head in _SECTION_ORDER else len(_SECTION_ORDER), field.count(".") > 1
            and "optimizer" in field, field)


def _table(rows, base_label):
    lines = [f"| field | `{base_label}` | elsewhere | meaning |", "|---|---|---|---|"]
    for field, values, meaning in rows:
        base = next(((v, k) for label, v, k in values if label == base_label), None)
        base_text = _fmt(*base) if base else "-"
        others = [f"{label}: {_fmt(v, k)}" for label, v, k in values
                  if label != base_label and (base is None or v != base[0])]
        lines.append(f"| `{field}` | {base_text} | {'; '.join(others) or ''} | {meaning} |")
    return lines


def _methods_table():
    from mgd_jax.methods import get_method, known_methods
    from mgd_jax.methods.base import Method

    lines = ["| method | weights `mg` (ce, logit KD, method) | weights `repdistiller` | `method_options` "
             "(defaults) | init stage |", "|---|---|---|---|---|"]
    for name in known_methods():
        m = get_method(name)
        w = [m.loss_weights(p) for p in ("mg", "repdistiller")]
        own_loss = type(m).loss is not Method.loss  # without one, the method weight multiplies nothing
        weights = [", ".join(f"{x[k]:g}" if k != "method" or own_loss else "-" for k in ("ce", "logit_kd", "method"))
                   for x in w]
        options = ", ".join(f"`{k}={v!r}`" for k, v in m.options().items()) or "-"
        init = f"{m.init_epochs} epochs" if m.has_init_stage else "-"
        lines.append(f"| `{name}` | {weights[0]} | {weights[1]} | {options} | {init} |")
    return lines


def render() -> str:
    """The reference's text; raises ReferenceError listing every field without a meaning."""
    train_rows, errors = _rows(TRAIN_CONFIGS, DESCRIPTIONS, "DESCRIPTIONS")
    transfer_rows, transfer_errors = _rows(TRANSFER_CONFIGS, TRANSFER_DESCRIPTIONS, "TRANSFER_DESCRIPTIONS")
    if errors or transfer_errors:
        raise ReferenceError(errors + transfer_errors)
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m mgd_jax.config_reference` from the files in configs/: do not edit by hand. -->",
        "",
        "Every field of the configs, its value in `configs/default.py` (the paper's CIFAR-100 setup, which the other "
        "configs start from), the configs where it differs, and what it means. Override any of them on the command "
        "line: `python train.py --config=configs/cifar100.py:resnet56,resnet20,kd,mas --config.student.epochs=10 "
        "--config.seed=1`. A field that a config does not have cannot be added (`error: ... the config has no "
        "field ...`).",
        "",
        "Configs: `default.py` (base), `cifar100.py` (the paper's CIFAR-100 runs; argument "
        "`teacher,student,method,mode[,teacher_schedule]`), `quickstart.py` (the offline digits run, "
        "`python train.py`), `smoke.py` (seconds-long run of all stages), `imagenet.py`, `dml.py` (mutual "
        "learning). The last column's `cifar100.py:...,factor,mas` shows the fields a method with an init stage "
        "adds. A student run's fields are under `students.<name>` (its folder `students/<name>/`); a config with "
        "several students lists their distinct values. `None (int)`: unset, takes an int.",
        "",
        "## Training configs (`train.py --config=...`)",
        "",
        *_table(train_rows, "default.py"),
        "",
        "## Methods: weights and options",
        "",
        "A student run takes its weights from its method and mode (`configs/default.py: student_run`): modes "
        "`none`, `mag`, `mas` use the `mg` weights, mode `baseline` the `repdistiller` ones (see "
        "[methods](methods.md)); the granularity terms always have weight 1. `-`: the method has no loss term of "
        "its own (`kd` is the logit-KD term; `fsp` and `abound` distill in their init stage).",
        "",
        *_methods_table(),
        "",
        "## Transfer config (`python -m mgd_jax.transfer --config=configs/transfer.py[:dataset]`)",
        "",
        *_table(transfer_rows, "transfer.py"),
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help=f"exit 1 if {OUT} is not current (write nothing)")
    p.add_argument("--out", default=OUT, help=f"where to write (default {OUT})")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join("configs", "default.py")):
        print("error: configs/default.py not found: run from the repository root (the folder that holds configs/)",
              file=sys.stderr)
        return 2
    try:
        text = render()
    except ReferenceError as e:
        print("\n".join(e.lines), file=sys.stderr)
        return 2
    if a.check:
        current = open(a.out).read() if os.path.isfile(a.out) else None
        if current != text:
            why = "is missing" if current is None else "is out of date"
            print(f"error: {a.out} {why}: run `python -m mgd_jax.config_reference` from the repository root and "
                  f"commit the result", file=sys.stderr)
            return 1
        print(f"{a.out} is current")
        return 0
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
