"""Import PyTorch checkpoints into a workdir: the reference code's (RepDistiller / the authors' zoo) and
torchvision's ImageNet ResNets.

    python -m mgd_jax.import_torch --arch=resnet56 --teacher=ckpt/best.pth \
        [--tube64=teacher_high_best.pth --tube256=teacher_low_best.pth] --workdir=runs/x
    python -m mgd_jax.import_torch --arch=resnet34_imagenet --teacher=resnet34.pth --workdir=runs/r34_r18

writes ``runs/x/teacher/checkpoints`` (and ``runs/x/analyzer/checkpoints``) as finished stages, so
``train.py --workdir=runs/x`` goes straight to the students.  A teacher file is ``{'model': state_dict}``
(RepDistiller) or a bare ``state_dict`` (``torch.save(torchvision.models.resnet34().state_dict(), ...)``; the
``*_imagenet`` models have torchvision's keys, ``mobilenetv1_imagenet`` the benchmark reference's).  Files are
read with ``torch.load(..., weights_only=True)``: a file that needs arbitrary pickled objects is refused, never
run.  The way back, a trained student to a PyTorch ``state_dict``, is ``mgd_jax.export_torch``.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mgd_jax.analyzer import PAPER_GRANULARITIES, parse_granularities
from mgd_jax.errors import CheckpointImportError  # noqa: F401 - raised here
from mgd_jax.models import get_model, reference_num_classes


def load_torch_file(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointImportError("importing PyTorch checkpoints needs torch: pip install torch==2.13.0") from None
    if os.path.isdir(path):
        raise CheckpointImportError(f"{path} is a folder, not a PyTorch checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointImportError(f"{path}: no such file") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # what torch raises for a file that is not a weights-only checkpoint: pickled code (UnpicklingError),
        # not a torch zip file (RuntimeError), empty (EOFError), unreadable (OSError), a text file read as a
        # legacy pickle (KeyError / IndexError from the unpickler's memo); the cause stays chained
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or ["empty file"]
        first = next((ln for ln in lines if "GLOBAL" in ln), lines[0])  # the refused global names the problem
        raise CheckpointImportError(f"{path}: refused, it is not a weights-only PyTorch checkpoint "
                                    f"({type(e).__name__}: {first})") from e
    return obj


def torchvision_models():
    """``torchvision.models``, also where torchvision's compiled operators cannot load.

    The PyPI torchvision built for a torch release is linked against CUDA; beside the CPU build of that torch its
    import fails while registering the compiled operators' shape functions (``torchvision/_meta_registrations``:
    ``operator torchvision::nms does not exist``).  The model definitions need none of those operators, so after
    such a failure the half-imported package is dropped and imported again with an empty module in place of
    ``torchvision._meta_registrations``: the models work, the detection operators (nms, roi_align) do not.  A
    healthy torchvision is imported as it is.
    """
    try:
        import torchvision.models
        return torchvision.models
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision.models
    return torchvision.models


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


# --- key map: torch state-dict key -> (collection, flax path) ---------------------------------------------------
# Our modules are named after the reference's: a numeric token joins the name before it ("layer1.0.conv1" ->
# layer1_0/conv1, "blocks.0.0.conv.3" -> blocks_0_0/conv_3).  A module with running statistics is a BatchNorm.
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}
_LINEAR_OR_CONV = {"weight": ("params", "kernel"), "bias": ("params", "bias")}


def _module_path(torch_module: str) -> tuple[str, ...]:
    out: list[str] = []
    for tok in torch_module.split("."):
        if tok.isdigit() and out:
            out[-1] = f"{out[-1]}_{tok}"
        else:
            out.append(tok)
    return tuple(out)


def map_keys(state_dict: dict) -> list[tuple[str, tuple | None]]:
    """[(torch key, (collection, *flax path) or None)] for every key but ``num_batches_tracked``."""
    bn_modules = {k.rsplit(".", 1)[0] for k in state_dict if k.endswith(".running_mean")}
    out = []
    for k in state_dict:
        if k.endswith("num_batches_tracked"):
            continue
        module, attr = k.rsplit(".", 1) if "." in k else ("", k)
        table = _BN if module in bn_modules else _LINEAR_OR_CONV
        if attr not in table:
            out.append((k, None))
            continue
        col, leaf = table[attr]
        out.append((k, (col,) + _module_path(module) + (leaf,)))
    return out


def _to_flax(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # linear (out, in) -> (in, out)
        return value.T
    return value


def _shape_hint(got, need) -> str:
    """What a shape mismatch most likely means: another class count, or an ImageNet stem for a CIFAR model."""
    got, need = tuple(got), tuple(need)
    if len(got) == 2 and len(need) == 2 and got[0] == need[0] and got[1] != need[1]:
        return f" (a {got[1]}-class classifier: pass --num_classes={got[1]})"
    if len(got) == 4 and got[:2] == (7, 7) and need[:2] != (7, 7):
        return " (a 7x7 ImageNet stem: torchvision's ResNets are resnet18_imagenet, resnet34_imagenet, resnet50_imagenet)"
    return ""


def _fill(expected: dict, items, where: str) -> dict:
    """expected: flat {(collection, *path): ShapeDtypeStruct}; items: [(torch_key, (collection, path), array)]."""
    out = {}
    for key, target, value in items:
        if target is None or target not in expected:
            raise CheckpointImportError(f"{where}: key {key!r} has no place in this architecture")
        if target in out:
            raise CheckpointImportError(f"{where}: key {key!r} fills {'/'.join(target)} a second time")
        value = _to_flax(value)
        if tuple(value.shape) != tuple(expected[target].shape):
            raise CheckpointImportError(f"{where}: key {key!r} has shape {tuple(value.shape)} (flax layout) but "
                                        f"this architecture needs {tuple(expected[target].shape)}"
                                        f"{_shape_hint(value.shape, expected[target].shape)}")
        out[target] = value.astype(np.float32)
    missing = [k for k in expected if k not in out]
    if missing:
        raise CheckpointImportError(f"{where}: nothing in the checkpoint for {'/'.join(missing[0])}"
                                    f" ({len(missing)} entries missing)")
    return out


def convert_backbone(arch: str, state_dict: dict, num_classes: int, where: str = "checkpoint") -> dict:
    """A torch ``state_dict`` of ``arch`` -> flax variables ``{'params', 'batch_stats'}``."""
    model = get_model(arch, num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    expected = {(col,) + k: v for col in shapes for k, v in traverse_util.flatten_dict(shapes[col]).items()}
    items = [(k, target, _np(state_dict[k])) for k, target in map_keys(state_dict)]
    flat = _fill(expected, items, where)
    out = {}
    for (col, *path), v in flat.items():
        out.setdefault(col, {})[tuple(path)] = v
    return {col: traverse_util.unflatten_dict(d) for col, d in out.items()}


def convert_tube(ckpt: dict, dim: int, feature_dim: int, num_classes: int, where: str = "tube") -> dict:
    """``{'encoder_state_dict', 'decoder_state_dict'}`` (nn.Sequential keys 0.* / 2.*) -> one Tube's params."""
    for k in ("encoder_state_dict", "decoder_state_dict"):
        if k not in ckpt:
            raise CheckpointImportError(f"{where}: expected a tube checkpoint with {k!r}, found keys {sorted(ckpt)}")
    from mgd_jax.analyzer import Tube
    shapes = jax.eval_shape(lambda: Tube(dim, num_classes).init(jax.random.key(0), jnp.zeros((1, feature_dim))))
    expected = {("params",) + k: v for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    items = []
    for part in ("encoder", "decoder"):
        for k, v in ckpt[f"{part}_state_dict"].items():
            m = re.fullmatch(r"(0|2)\.(weight|bias)", k)
            t = None if not m else ("params", part, {"0": "fc1", "2": "fc2"}[m.group(1)],
                                    {"weight": "kernel", "bias": "bias"}[m.group(2)])
            items.append((f"{part}_state_dict.{k}", t, _np(v)))
    flat = _fill(expected, items, where)
    return traverse_util.unflatten_dict({k[1:]: v for k, v in flat.items()})


def check_arch(arch: str) -> None:
    """CheckpointImportError unless ``arch`` is in the zoo (torchvision's name of one of ours is pointed to it)."""
    from mgd_jax.models import ARCHITECTURES
    from mgd_jax.models.resnet_imagenet import TORCHVISION_NAMES

    if arch in ARCHITECTURES:
        return
    ours = {tv: name for name, tv in TORCHVISION_NAMES.items()}.get(arch)
    if ours:
        raise CheckpointImportError(f"--arch={arch!r}: torchvision's {arch} is {ours} here (ResNet50 and the "
                                    f"resnet<depth> names without _imagenet are the CIFAR zoo's)")
    raise CheckpointImportError(f"--arch={arch!r}: unknown architecture; known: {', '.join(ARCHITECTURES)}")


def import_to_workdir(arch: str, teacher_path: str, workdir: str, num_classes: int | None = None,
                      tubes: dict | None = None, granularities=PAPER_GRANULARITIES) -> None:
    """Writes the teacher (and analyzer) stage checkpoints of ``workdir`` as finished stages.  ``num_classes``:
    the checkpoint's classes, by default its reference's (``models.reference_num_classes``: 1000 for an
    ``*_imagenet`` model, else 100).  Everything is read and converted before anything is written."""
    from mgd_jax.train.checkpoint import StageCheckpoints

    check_arch(arch)
    num_classes = reference_num_classes(arch) if num_classes is None else num_classes
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise CheckpointImportError(f"--num_classes={num_classes}: must be an integer >= 1")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise CheckpointImportError(f"--workdir={workdir} is a file, not a folder")
    for flag, path in [("--teacher", teacher_path), *((f"--tube{dim}", p) for dim, p in (tubes or {}).items())]:
        if not os.path.isfile(path):
            why = "a folder, not a checkpoint file" if os.path.isdir(path) else "no such file"
            raise CheckpointImportError(f"{flag}={path}: {why}")
    for stage_name in ("teacher", "analyzer") if tubes else ("teacher",):
        for which in ("latest", "best"):  # an earlier import killed between its two saves leaves only best
            d = os.path.join(workdir, stage_name, "checkpoints", which)
            if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):
                raise CheckpointImportError(f"{workdir} already has a {stage_name} stage ({d}); import into a new "
                                            f"--workdir or delete {os.path.dirname(os.path.dirname(d))}")
    ck = load_torch_file(teacher_path)
    sd = ck.get("model", ck) if isinstance(ck, dict) else ck
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        what = type(sd).__name__ if not isinstance(sd, dict) else "dict with keys that are not names"
        raise CheckpointImportError(f"{teacher_path}: holds a {what}, not a state_dict (a dict of tensors by "
                                    f"name) or {{'model': state_dict}}")
    variables = convert_backbone(arch, sd, num_classes, where=teacher_path)
    tube_params, grans = {}, None
    if tubes:
        model = get_model(arch, num_classes)
        d = jax.eval_shape(lambda: model.apply(variables, jnp.zeros((1, 32, 32, 3))))[1][-1].shape[-1]  # pooled dim
        grans = parse_granularities(granularities)
        for g in grans:
            if g.dim not in tubes:
                raise CheckpointImportError(f"no tube checkpoint for granularity {g.name} (have dims {sorted(tubes)})")
            tube = load_torch_file(tubes[g.dim])
            if not isinstance(tube, dict):
                raise CheckpointImportError(f"{tubes[g.dim]}: holds a {type(tube).__name__}, not a tube checkpoint")
            tube_params[g.name] = convert_tube(tube, g.dim, d, num_classes, where=tubes[g.dim])
    meta = {"stage": "teacher", "arch": arch, "num_classes": num_classes,
            "imported_from": os.path.abspath(teacher_path)}
    best = {"imported": True, "epoch": 0}
    stage = StageCheckpoints(os.path.join(workdir, "teacher", "checkpoints"))
    stage.save_best(0, variables, {**meta, "epoch": 0, "best": best, "imported": True})
    stage.save_latest(0, variables, {**meta, "epoch": 0, "best": best, "last": {}, "imported": True})
    stage.close()
    if tubes:
        meta = {"stage": "analyzer", "teacher_arch": arch, "num_classes": num_classes,
                "granularities": [[g.dim, g.temperature] for g in grans]}
        stage = StageCheckpoints(os.path.join(workdir, "analyzer", "checkpoints"))
        stage.save_best(0, tube_params, {**meta, "epoch": 0, "best": best, "imported": True})
        stage.save_latest(0, tube_params, {**meta, "epoch": 0, "best": best, "last": {}, "imported": True})
        stage.close()


def main(argv=None):
    from mgd_jax.analysis.common import ToolParser

    p = ToolParser("python -m mgd_jax.import_torch", __doc__)
    p.add_argument("--arch", required=True)
    p.add_argument("--teacher", required=True, help="{'model': state_dict} file (teacher.py's ckpt/best.pth) or a "
                                                    "bare state_dict (torchvision's)")
    p.add_argument("--tube64", help="64-d tube (teacher_high_best.pth)")
    p.add_argument("--tube256", help="256-d tube (teacher_low_best.pth)")
    p.add_argument("--num_classes", type=int, default=None,
                   help="the checkpoint's classes (default: 1000 for an *_imagenet model, else 100)")
    p.add_argument("--workdir", required=True)
    a = p.parse_args(argv)
    tubes = {k: v for k, v in ((64, a.tube64), (256, a.tube256)) if v}
    from mgd_jax.errors import USER_ERRORS, one_line
    try:
        import_to_workdir(a.arch, a.teacher, a.workdir, a.num_classes, tubes or None)
    except (CheckpointImportError, *USER_ERRORS) as e:  # this module's class too: `python -m` runs it as __main__
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"imported {a.arch} into {a.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
