"""What the command-line tools (``evaluate``, ``analysis.robustness``, ``analysis.cka``, ``transfer``, ``export``,
``export_torch``, ``predict``, ``import_torch``, ``sweep``, ``summarize``) share.

* Command line: ``ToolParser`` (argparse whose usage mistakes are one line ``error: ...``, exit status 2),
  ``tool_parser`` (``--workdir`` and, where a tool takes one, ``--stage``), ``cli`` (a user error,
  ``mgd_jax.errors.USER_ERRORS``, is one line on stderr and exit status 2, not a stack trace),
  ``check_out_folder`` / ``write_outputs`` (an output folder refused before the work, a failed write in one line).
* A finished run: ``Run(workdir)`` holds its ``config.json``; ``check_stage`` names a mistyped ``--stage`` and
  lists the workdir's stages (``stages_of``); ``run.dataset`` is its data, ``run.restore_best`` a stage's best
  checkpoint and ``run.backbone(stage)`` a teacher's or student's backbone as the run computed it (its
  ``config.precision``).
* ``evaluate_split``: a jitted function's exact sums over a whole split.
* Config files given by path (``configs/transfer.py:stl10``, the sweep's ``configs/cifar100.py``):
  ``ConfigFile`` / ``load_config_file`` (the file's refusal of its argument in one line), ``override`` and
  ``parse_with_overrides`` (``--config.a.b=value``, typed like train.py's overrides).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import inspect
import json
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mgd_jax import precision
from mgd_jax.data import load_dataset
from mgd_jax.data.sources import with_old_defaults
from mgd_jax.errors import USER_ERRORS, AnalysisError, ConfigError, one_line
from mgd_jax.models import classifier_name, get_model
from mgd_jax.stages.common import apply_backbone
from mgd_jax.train import mesh as mesh_lib
from mgd_jax.train.checkpoint import StageCheckpoints

__all__ = ["AnalysisError", "BACKBONE_STAGES", "Backbone", "ConfigFile", "Run", "ToolParser", "check_out_folder",
           "check_stage", "check_workdir", "cli", "evaluate_split", "load_config", "load_config_file", "model_of",
           "override", "parse_with_overrides", "restore_best", "stages_of", "tool_parser", "write_outputs"]

BACKBONE_STAGES = "teacher | students/<name>"


# --- command line ------------------------------------------------------------------------------------------------
class ToolParser(argparse.ArgumentParser):
    """argparse's parser, but a usage mistake (a missing or unknown option, a value of the wrong type) is one line,
    ``error: <what>`` with exit status 2, instead of the usage block and the program's file name."""

    def __init__(self, prog: str, doc: str | None = None, **kwargs):
        super().__init__(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def tool_parser(doc: str, stage: str | None = None, stage_aliases: tuple[str, ...] = (),
                prog: str | None = None) -> ToolParser:
    """The tool's parser with ``--workdir`` (required) and, with ``stage`` (its help), a required ``--stage``.
    ``prog``: how the tool is run (``python -m mgd_jax.evaluate``), named in its usage errors."""
    p = ToolParser(prog or _prog(), doc)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py (holds config.json)")
    if stage:
        p.add_argument("--stage", *stage_aliases, dest="stage", required=True, help=stage)
    return p


def _prog() -> str:
    """``python -m mgd_jax.<module>`` for the module being run (its ``__spec__``), else the script's name."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    return f"python -m {name}" if name else os.path.basename(sys.argv[0] or "tool")


def cli(main: Callable[[Any], int]) -> Callable[[Any], int]:
    """``main(argv) -> exit status``, where a user error (``USER_ERRORS``) is one line on stderr and status 2."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2

    return run


def check_out_folder(out: str | None, flag: str = "--out") -> None:
    """Refuses, before any long computation, an output folder that is a file or cannot be created: its nearest
    existing ancestor must be a folder this process can write in.  ``None``: the tool's default folder."""
    if out is None:
        return
    if not out:
        raise AnalysisError(f"{flag} is empty: give a folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise AnalysisError(f"{flag}={out} is a file, not a folder")
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise AnalysisError(f"{flag}={out}: cannot create it, {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise AnalysisError(f"{flag}={out}: cannot create or write it, {path} is not writable")


def write_outputs(folder: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Creates ``folder`` and calls each ``writers[name](path)``; a failed write is one line (AnalysisError)."""
    name = folder
    try:
        os.makedirs(folder, exist_ok=True)
        for name, write in writers.items():
            write(os.path.join(folder, name))
    except OSError as e:
        raise AnalysisError(f"{os.path.join(folder, name) if name != folder else folder}: cannot write it "
                            f"({e.strerror or type(e).__name__})") from None


# --- a finished run ----------------------------------------------------------------------------------------------
def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """AnalysisError unless ``workdir`` is an existing folder."""
    if not workdir:
        raise AnalysisError(f"{flag} is empty: give the folder train.py wrote")
    if not os.path.exists(workdir):
        raise AnalysisError(f"{flag}={workdir} does not exist")
    if not os.path.isdir(workdir):
        raise AnalysisError(f"{flag}={workdir} is a file, not a workdir (the folder train.py wrote)")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    check_workdir(workdir)
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise AnalysisError(f"{path} is missing: analysis tools need a workdir written by train.py (config.json "
                            f"is written once its checks pass)")
    try:
        with open(path) as f:
            config = ml_collections.ConfigDict(with_old_defaults(json.load(f)))
    except (OSError, ValueError, TypeError, AttributeError) as e:  # unreadable, not JSON, not an object
        raise AnalysisError(f"{path}: not a config.json written by train.py ({type(e).__name__}: "
                            f"{_first_line(e)})") from None
    for field in ("data", "augment"):
        if not isinstance(config.get(field, None), ml_collections.ConfigDict):
            raise AnalysisError(f"{path}: not a config.json written by train.py (no {field!r} section)")
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# Folders of a workdir that hold no stage (skipped while listing its stages).
_NOT_STAGES = ("checkpoints", "tensorboard", "export", "analysis", ".jax_cache")


def stages_of(workdir: str) -> list[str]:
    """The stages a workdir holds: each folder with a ``checkpoints/`` folder, as a path relative to the workdir
    (``teacher``, ``analyzer``, ``students/<name>``, ``students/<name>/init``, ``mutual``, ``transfer/<name>``)."""
    found = []
    for root, dirs, _ in os.walk(workdir):
        depth = os.path.relpath(root, workdir).count(os.sep)
        if "checkpoints" in dirs and root != workdir:
            found.append(os.path.relpath(root, workdir).replace(os.sep, "/"))
        dirs[:] = sorted(d for d in dirs if d not in _NOT_STAGES) if depth < 3 else []
    order = {"teacher": 0, "analyzer": 1, "mutual": 2}
    return sorted(found, key=lambda st: (order.get(st, 3), st))


def _is_other_stage(stage: str) -> bool:
    """A stage path of a kind without a backbone: the analyzer, mutual learning, a student's init stage, a
    transfer."""
    parts = stage.split("/")
    return parts[0] in ("analyzer", "mutual", "transfer") or (parts[0] == "students" and len(parts) > 2)


def _is_backbone_stage(stage: str) -> bool:
    if stage == "teacher":
        return True
    parts = stage.split("/")
    return len(parts) == 2 and parts[0] == "students" and bool(parts[1])


def check_stage(workdir: str, stage: str, backbone: bool = True, also: tuple[str, ...] = (),
                purpose: str = "", refuse: dict | None = None) -> str:
    """``stage`` of ``workdir``, normalised (no trailing ``/``); AnalysisError naming the mistake and the stages
    the workdir holds when it is not one of them, or (``backbone``) when it has no backbone (``also``: other
    stages the tool takes, e.g. ``analyzer``; ``purpose``: what for, e.g. ' to export'; ``refuse``: {stage: why}
    of stages the tool does not take, never suggested for a mistyped one)."""
    import difflib

    check_workdir(workdir)
    given = stage
    stage = (stage or "").strip().strip("/")
    wanted = BACKBONE_STAGES.replace(" | ", " or ") + "".join(f" or {a}" for a in also)
    if not stage:
        raise AnalysisError(f"--stage is empty: use {wanted}")
    refuse = refuse or {}
    if stage in refuse:
        raise AnalysisError(f"--stage={given}: {refuse[stage]}")
    present = stages_of(workdir)
    usable = [st for st in present if _is_backbone_stage(st) or st in also] if backbone else present
    usable = [st for st in usable if st not in refuse]
    if backbone and stage not in also and _is_other_stage(stage):
        raise AnalysisError(f"stage {stage!r} has no backbone{purpose}; use {wanted} (here: "
                            f"{', '.join(usable) or 'none'})")
    if stage not in present:
        if not present:
            raise AnalysisError(f"--stage={given} does not exist: {workdir} holds no trained stage (no "
                                f"<stage>/checkpoints folder; is it a workdir train.py has trained in?)")
        pool = usable or [st for st in present if st not in refuse]
        close = difflib.get_close_matches(stage, pool, n=1, cutoff=0.6)
        hint = f"; did you mean --stage={close[0]}?" if close else ""
        raise AnalysisError(f"--stage={given} does not exist in {workdir} (its stages: "
                            f"{', '.join(pool) or 'none it takes'}){hint}")
    if backbone and stage not in usable:
        raise AnalysisError(f"stage {stage!r} has no backbone{purpose}; use {wanted} (here: "
                            f"{', '.join(usable) or 'none'})")
    return stage


def model_of(config, arch: str, num_classes: int):
    """The backbone as the run computed it: ``config.precision`` (float32 unless the run used bfloat16)."""
    return precision.with_compute_dtype(get_model(arch, num_classes), config.get("precision", "float32"))


def restore_best(directory: str) -> tuple[Any, dict]:
    """A stage directory's best checkpoint -> (its saved tree, its metadata)."""
    unfinished = "the stage has not finished its first epoch: run the same train.py command again to resume it"
    if not os.path.isdir(os.path.join(directory, "checkpoints", "best")):
        raise AnalysisError(f"{directory}/checkpoints/best does not exist ({unfinished})")
    ck = StageCheckpoints(os.path.join(directory, "checkpoints"))
    try:
        step = ck.best.latest_step()
        if step is None:
            raise AnalysisError(f"{directory}/checkpoints/best holds no checkpoint ({unfinished})")
        try:
            r = ck.best.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                              meta=ocp.args.JsonRestore()))
        except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged or foreign checkpoint folder
            raise AnalysisError(f"{directory}/checkpoints/best/{step}: cannot restore it ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
        if not isinstance(r["meta"], dict) or not isinstance(r["state"], dict):
            raise AnalysisError(f"{directory}/checkpoints/best/{step}: not a stage checkpoint written by train.py")
        return r["state"], dict(r["meta"])
    finally:
        ck.close()


def _classifier_kernel(params):
    """A zoo backbone's classifier weights, [pooled feature, classes]."""
    return params[classifier_name(params)]["kernel"]


@dataclasses.dataclass(eq=False)
class Backbone:
    """A teacher's or student's backbone from its best checkpoint, computing as the run did."""

    stage: str
    arch: str
    model: Any  # the zoo module in the run's precision
    variables: dict  # {'params', 'batch_stats'}: pass them to ``apply`` (a jitted function's argument)
    meta: dict  # the checkpoint's metadata (epoch, metrics, config identity)

    @property
    def num_classes(self) -> int:
        return int(_classifier_kernel(self.variables["params"]).shape[1])

    @property
    def feature_dim(self) -> int:
        """The size of the pooled feature (the last entry of the feature list), the classifier's input."""
        return int(_classifier_kernel(self.variables["params"]).shape[0])

    def apply(self, variables, x, preact: bool = False):
        """Eval mode: normalised NHWC images -> (logits, features)."""
        logits, feats, _ = apply_backbone(self.model, variables["params"], variables["batch_stats"], x, train=False,
                                          preact=preact)
        return logits, feats


class Run:
    """A workdir written by ``train.py``: its config, its data, its stages' best checkpoints."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.config = load_config(self.workdir)

    @functools.cached_property
    def dataset(self):
        return load_dataset(self.config.data)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in ("test", "train"):
            raise AnalysisError(f"unknown split {name!r}; use test or train")
        ds = self.dataset
        return (ds.test_images, ds.test_labels) if name == "test" else (ds.train_images, ds.train_labels)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    def check_stage(self, stage: str, backbone: bool = True, also: tuple[str, ...] = (), purpose: str = "",
                    refuse: dict | None = None) -> str:
        """``check_stage`` in this run's workdir."""
        return check_stage(self.workdir, stage, backbone, also, purpose, refuse)

    def restore_best(self, stage: str) -> tuple[Any, dict]:
        return restore_best(self.stage_dir(stage))

    def backbone(self, stage: str) -> Backbone:
        """``stage`` = teacher | students/<name>: its backbone (a student's without its encoders / aux modules)."""
        stage = self.check_stage(stage)
        saved, meta = self.restore_best(stage)
        try:
            if stage == "teacher":
                variables = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
            else:
                variables = {"params": saved["params"]["backbone"], "batch_stats": saved["batch_stats"]["backbone"]}
        except (KeyError, TypeError) as e:
            raise AnalysisError(f"{self.stage_dir(stage)}: its best checkpoint has no {e} entry where a "
                                f"{stage.split('/')[0].rstrip('s')}'s backbone is kept") from None
        arch = self.config.teacher.arch if stage == "teacher" else self.config.student.arch
        num_classes = int(_classifier_kernel(variables["params"]).shape[1])  # the run's classes, without its data
        return Backbone(stage, arch, model_of(self.config, arch, num_classes), variables, meta)


# --- evaluation --------------------------------------------------------------------------------------------------
def evaluate_split(step: Callable, args, images: np.ndarray, labels: np.ndarray, batch_size: int,
                   mesh=None) -> Any:
    """Exact sums of ``step(args, batch) -> pytree of sums`` over a whole split, ``step`` jitted once.

    ``batch``: ``image`` (uint8, as stored), ``label``, ``mask`` (1 on real rows) and ``index`` (each row's
    index into the split), ``batch_size`` rows, the last batch zero-padded.  ``mesh``: one device by default."""
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(jax.devices()[:1])
    run = jax.jit(step)
    args = mesh_lib.replicate(args, mesh)
    totals, n = None, len(labels)
    for start in range(0, n, batch_size):
        rows = np.arange(start, start + batch_size)
        batch = {**mesh_lib.local_rows(images, labels, rows),  # this process's rows of the batch only
                 "index": rows[mesh_lib.process_slice(batch_size)].astype(np.int32)}
        sums = jax.device_get(run(args, mesh_lib.shard_local_batch(batch, batch_size, mesh)))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return totals


# --- config files ------------------------------------------------------------------------------------------------
def _config_module(path: str):
    """The config file at ``path``, imported by path as train.py's ``--config`` flag does: its own imports
    (``from configs import default``) resolve from the working directory, the repository root."""
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else " (a relative path is read from the working directory: run from the " \
                                               "repository root)"
        raise ConfigError(f"config file {path} does not exist{where}")
    name = "mgd_config_" + "".join(ch if ch.isalnum() else "_" for ch in os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "configs":
            raise ConfigError(f"{path} imports the repository's {e.name!r}: run the command from the repository "
                              f"root (the folder that holds configs/)") from None
        raise
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{path} defines no get_config()")
    return module


class ConfigFile:
    """A config file given by path: ``get_config(argument)``, its refusal of the argument (a ``ValueError``:
    unknown dataset, method, mode ...) as one line."""

    def __init__(self, path: str):
        self.path = path
        self.module = _config_module(path)
        self.takes_argument = bool(inspect.signature(self.module.get_config).parameters)

    def get_config(self, argument: str | None = None) -> ml_collections.ConfigDict:
        if argument is not None and not self.takes_argument:
            raise ConfigError(f"--config={self.path}: its get_config() takes no argument, got {argument!r}")
        try:
            return self.module.get_config(argument) if argument is not None else self.module.get_config()
        except ValueError as e:
            spec = self.path + (f":{argument}" if argument is not None else "")
            raise ConfigError(f"--config={spec}: {e}") from None


def load_config_file(spec: str, argument: str | None = None) -> ml_collections.ConfigDict:
    """``spec`` = ``path[:argument]`` -> the file's ``get_config(argument)``; ``argument`` replaces the spec's."""
    path, colon, spec_argument = spec.partition(":")
    return ConfigFile(path).get_config(argument if argument is not None else (spec_argument if colon else None))


def _parse_value(text: str, kind: type | None, where: str):
    if kind is str:
        return text
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if kind is None:
            return text
        raise ConfigError(f"{where}: {text!r} is not a {kind.__name__} (a Python literal)") from None


def override(config: ml_collections.ConfigDict, field: str, text, where: str | None = None) -> None:
    """``--config.a.b=text``: the field must exist; ``text`` is read as the field's type (a string field takes it
    as is, other fields as a Python literal: ``10``, ``0.1``, ``(20,25)``, ``True``, ``None``); a value that is
    not a string is set as is."""
    where = where or f"--config.{field}={text}"
    *path, last = field.split(".")
    node = config
    for p in path:
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            raise ConfigError(f"{where}: the config has no field {field!r}")
        node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
        raise ConfigError(f"{where}: the config has no field {field!r}")
    kind = node.get_type(last)
    kind = None if kind is type(None) else kind
    value = _parse_value(text, kind, where) if isinstance(text, str) else text
    try:
        node[last] = value
    except (ValueError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: {why}") from None


def parse_with_overrides(p: argparse.ArgumentParser, argv=None, flag: str = "--config"):
    """``p.parse_args`` that also takes ``--config.a.b=value`` overrides -> (args, [(field, value text)])."""
    a, rest = p.parse_known_args(argv)
    bad = [x for x in rest if not (x.startswith(flag + ".") and "=" in x)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (a config override is {flag}.FIELD=VALUE)")
    return a, [tuple(x[len(flag) + 1:].split("=", 1)) for x in rest]
