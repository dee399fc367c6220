"""Export a trained ImageNet backbone (a student, or a teacher) as a PyTorch ``state_dict``.

    python -m mgd_jax.export_torch --workdir=runs/r34_r18 --stage=students/kd_mas --out=resnet18_student.pth

writes the stage's best checkpoint's backbone, without the student's encoders and method modules, as a plain
``state_dict`` (``torch.save`` of a dict of tensors; it loads with ``torch.load(weights_only=True)``):

* ``resnet18_imagenet`` / ``resnet34_imagenet`` / ``resnet50_imagenet``: torchvision's keys, so
  ``torchvision.models.resnet18(num_classes=N).load_state_dict(torch.load(path), strict=True)`` takes it and
  computes our eval-mode logits (``N`` = the run's classes, 1000 for ImageNet-1k).
* ``mobilenetv1_imagenet`` (not in torchvision): the benchmark reference's keys (mdistiller's ``MobileNetV1``):
  ``model.0.0.weight`` (stem conv), ``model.0.1.*`` (its BN), for block i = 1..13 ``model.i.0.weight``
  (depthwise conv), ``model.i.1.*`` (BN), ``model.i.3.weight`` (pointwise conv), ``model.i.4.*`` (BN); then
  ``fc.weight`` / ``fc.bias``.

Every BatchNorm comes with ``weight``, ``bias``, ``running_mean``, ``running_var`` (our running statistics) and
``num_batches_tracked`` (0: we do not count batches, and PyTorch reads it only for ``BatchNorm(momentum=None)``).
Conv kernels go back to OIHW, Linear weights to (out, in).  Only the ImageNet models export (the CIFAR zoo's
students stay JAX checkpoints); anything else is one line naming the problem.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
from flax import traverse_util

from mgd_jax.errors import AnalysisError

_BN_LEAVES = (("params", "scale", "weight"), ("params", "bias", "bias"), ("batch_stats", "mean", "running_mean"),
              ("batch_stats", "var", "running_var"))


def _torch_module(path: tuple[str, ...]) -> str:
    """Our module path -> the torch module name: a ``_<digits>`` suffix is a numeric token of its own
    (``layer1_0/downsample_1`` -> ``layer1.0.downsample.1``, ``model_13_4`` -> ``model.13.4``); the inverse of
    ``import_torch._module_path``."""
    return ".".join(re.sub(r"_(\d+)", r".\1", p) for p in path)


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv HWIO -> OIHW
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if value.ndim == 2:  # linear (in, out) -> (out, in)
        return np.ascontiguousarray(value.T)
    return np.asarray(value)


def _abstract_init(model) -> tuple[dict, list[tuple[str, ...]]]:
    """The model's variable shapes and its parameterised modules in the order they are called, which is the
    order the reference defines them in (a checkpoint restores its dicts sorted by name; jax sorts them too)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    called = []

    def record(call, args, kwargs, context):
        if context.method_name == "__call__":
            called.append(tuple(context.module.path))
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    params = traverse_util.flatten_dict(dict(shapes["params"]))
    with_params = {k[:-1] for k in params}
    return shapes, [m for m in dict.fromkeys(called) if m in with_params]


def to_state_dict(arch: str, variables: dict) -> dict[str, np.ndarray]:
    """An ImageNet backbone's ``{'params', 'batch_stats'}`` -> ``{torch key: array}`` in the module order of the
    reference (float32; ``num_batches_tracked`` int64).  Raises AnalysisError for another architecture or for
    variables that are not that architecture's (the first differing entry named)."""
    from mgd_jax.import_torch import map_keys
    from mgd_jax.models import ARCHITECTURES, IMAGENET_ARCHITECTURES, get_model

    if arch not in IMAGENET_ARCHITECTURES:
        known = "a CIFAR model" if arch in ARCHITECTURES else "unknown"
        raise AnalysisError(f"architecture {arch!r} ({known}) has no PyTorch export; exportable: "
                            f"{', '.join(IMAGENET_ARCHITECTURES)}")
    params = traverse_util.flatten_dict(dict(variables["params"]))
    stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    num_classes = int(params[("fc", "kernel")].shape[1]) if ("fc", "kernel") in params else 1
    shapes, modules = _abstract_init(get_model(arch, num_classes))
    expected = {(col,) + k: v.shape for col in ("params", "batch_stats")
                for k, v in traverse_util.flatten_dict(dict(shapes.get(col, {}))).items()}
    given = {("params",) + k: v for k, v in params.items()} | {("batch_stats",) + k: v for k, v in stats.items()}
    for key, shape in expected.items():
        if key not in given:
            raise AnalysisError(f"the variables have no {'/'.join(key)}: they are not a {arch}'s")
        if tuple(given[key].shape) != tuple(shape):
            raise AnalysisError(f"{'/'.join(key)} has shape {tuple(given[key].shape)} but {arch} needs {tuple(shape)}")
    extra = sorted(set(given) - set(expected))
    if extra:
        raise AnalysisError(f"{'/'.join(extra[0])} has no place in {arch} ({len(extra)} extra entries)")

    out: dict[str, np.ndarray] = {}
    for module in modules:
        name = _torch_module(module)
        if module + ("mean",) in stats:  # a BatchNorm
            for col, leaf, key in _BN_LEAVES:
                out[f"{name}.{key}"] = np.asarray((params if col == "params" else stats)[module + (leaf,)], np.float32)
            out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
        else:
            out[f"{name}.weight"] = _to_torch_layout(np.asarray(params[module + ("kernel",)], np.float32))
            if module + ("bias",) in params:
                out[f"{name}.bias"] = np.asarray(params[module + ("bias",)], np.float32)
    # the import maps every key back to the entry it came from: the two key maps are each other's inverse
    if sorted(t for _, t in map_keys(out)) != sorted(expected):
        raise AssertionError(f"{arch}: the export's keys do not import back")  # a naming bug, not user input
    return out


def read_backbone(workdir: str, stage: str) -> tuple[str, dict]:
    """A stage's best checkpoint -> (its architecture, its backbone's ``{'params', 'batch_stats'}``)."""
    from mgd_jax.analysis.common import check_stage, restore_best

    stage = check_stage(workdir, stage, purpose=" to export")  # names a mistyped stage and lists the workdir's
    directory = os.path.join(workdir, stage)
    saved, meta = restore_best(directory)
    arch = meta.get("arch")
    if arch is None:
        raise AnalysisError(f"{directory}: the best checkpoint does not name its architecture")
    if meta.get("stage") not in ("teacher", "student"):
        raise AnalysisError(f"{directory}: the best checkpoint is a {meta.get('stage')!r} stage's, not a teacher's or "
                            f"a student's")
    try:
        if meta["stage"] == "student":  # stages/student.py export_variables: the backbone beside encoders / method
            return arch, {"params": saved["params"]["backbone"], "batch_stats": saved["batch_stats"]["backbone"]}
        return arch, {"params": saved["params"], "batch_stats": saved["batch_stats"]}
    except (KeyError, TypeError) as e:
        raise AnalysisError(f"{directory}: the best checkpoint has no {e} entry where a {meta['stage']}'s backbone "
                            f"is kept") from None


def _check_out_file(out: str) -> None:
    """``--out`` must name a file in an existing, writable folder (checked before anything is read)."""
    if not out or out.endswith(os.sep):
        raise AnalysisError(f"--out={out!r}: give a file name (e.g. student.pth)")
    if os.path.isdir(out):
        raise AnalysisError(f"--out={out} is a folder: give a file name (e.g. {os.path.join(out, 'student.pth')})")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise AnalysisError(f"--out={out}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AnalysisError(f"--out={out}: the folder {parent} is not writable")


def export_stage(workdir: str, stage: str, out: str) -> tuple[str, int]:
    """Writes ``stage``'s best backbone to ``out`` (torch.save of a state_dict); returns (arch, number of keys)."""
    _check_out_file(out)
    arch, variables = read_backbone(workdir, stage)
    state_dict = to_state_dict(arch, variables)
    try:
        import torch
    except ImportError:
        raise AnalysisError("writing a PyTorch state_dict needs torch: pip install torch==2.13.0") from None
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    _check_out_file(out)
    tmp = f"{out}.tmp"
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, out)  # never a half-written file under the name asked for
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
        if os.path.isfile(tmp):
            os.remove(tmp)
        first = (str(e).strip().splitlines() or [""])[0]
        raise AnalysisError(f"--out={out}: cannot write it ({type(e).__name__}: {first})") from e
    return arch, len(tensors)


def main(argv=None) -> int:
    from mgd_jax.analysis.common import BACKBONE_STAGES, ToolParser, cli

    p = ToolParser("python -m mgd_jax.export_torch", __doc__)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py (or import_torch)")
    p.add_argument("--stage", required=True, help=BACKBONE_STAGES)
    p.add_argument("--out", required=True, help="the .pth file to write")

    @cli
    def run(argv):
        a = p.parse_args(argv)
        arch, n = export_stage(a.workdir, a.stage, a.out)
        print(f"exported {a.stage} ({arch}, {n} keys) to {a.out}")
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
