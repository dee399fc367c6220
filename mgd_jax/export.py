"""Export a teacher's or student's backbone for deployment: ONNX (checked in onnxruntime) and StableHLO (jax.export).

    python -m mgd_jax.export --workdir=runs/quickstart --stage=students/mas_kd [--format=onnx,stablehlo] [--out=DIR]

writes the stage's best checkpoint into DIR (default ``<workdir>/<stage>/export``):

* ``model.onnx``: the ONNX graph (opset 23), converted by jax2onnx;
* ``model.stablehlo``: a serialized ``jax.export.Exported``; ``jax.export.deserialize(bytes).call(images)`` runs it
  with jax alone, without this package;
* ``model.json``: what a caller needs beside the graph: class names, input shape, mean / std, the evaluation
  resize, the accuracy measured at export, and the files with their sha256 (``predict`` refuses a model file that
  is not listed there or whose sha256 differs).

A successful export removes the files of the formats it did not export from DIR, so the folder holds exactly one
export; a refused export leaves the folder as it was.

Each artifact is the eval-mode backbone only (a student without its encoders and method modules): uint8 NHWC
images ``[batch, H, W, C]``, any batch size, normalised inside the graph with the run's mean / std, -> float32
logits ``[batch, classes]``.  Before anything is written every artifact runs on the whole test split in its own
runtime (onnxruntime; the deserialized StableHLO) and is refused, with nothing written, when its logits differ from
the JAX model's by more than ``atol + rtol * |JAX logit|`` anywhere or its top-1 differs on any image.  By default
``atol = 1e-4`` and ``rtol = 0`` (the default: 1e-4 in float32).  ``--rtol`` allows a relative part for models
with large logits, where float32 rounding grows with the magnitude: the exported graph bakes the weights in as
constants, which XLA compiles differently from the reference that passes them as arguments (the StableHLO's logits
are bitwise those of ``jit`` of the same function with the weights baked in); on logits of ~3000 (a 1-epoch
ResNet-18), where float32's spacing is 2.4e-4, that reorders float32 sums by ~1e-3.  ``--rtol=1e-6`` admits that.
The graphs compute in float32 (a bfloat16 run's float32 parameters, computed in float32).

ONNX: jax2onnx replaces ``flax.linen.max_pool`` / ``avg_pool`` during a conversion by its own primitives, which
take neither a positional window nor explicit padding pairs (our ResNet stems, VGG, ShuffleNet v1 use both), and
a plain ``lax.reduce_window`` becomes a MaxPool over all four axes that onnxruntime refuses ("Unsupported pooling
size").  ``_onnx_pooling`` therefore computes those pools, while converting, as the max / mean of strided slices
of the padded input (exactly the same numbers).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import sys
from typing import Callable

import numpy as np

from mgd_jax.errors import AnalysisError

FORMATS = ("onnx", "stablehlo")
FILES = {"onnx": "model.onnx", "stablehlo": "model.stablehlo"}
METADATA = "model.json"
ATOL = 1e-4  # |runtime logit - JAX logit| <= ATOL + RTOL * |JAX logit| on every logit of the test split
RTOL = 0.0
ONNX_OPSET = 23
CHECK_BATCH = 100  # images per runtime call while checking (the last batch is padded to it)
# StableHLO lowered for each: the artifact runs on any of them (checked at export on this machine's, the CPU)
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")


class ExportCheckError(AnalysisError):
    """An exported model whose runtime's logits or top-1 differ from the JAX model's: nothing is written."""


# --- the graph: uint8 images -> logits ---------------------------------------------------------------------------
def logits_fn(model, variables: dict, mean, std) -> Callable:
    """uint8 NHWC images -> float32 logits of ``model`` in eval mode, the normalisation inside (``variables`` are
    closed over: they become the graph's constants)."""
    import jax.numpy as jnp

    from mgd_jax.data.augment import normalize

    def logits(images):
        out, _ = model.apply(variables, normalize(images, mean, std), train=False)
        return out.astype(jnp.float32)

    return logits


def _window_reduce(x, window, strides, padding, reduce, pad_value):
    """``reduce`` over the strided slices of the padded NHWC ``x``: a pooling window as elementwise ops."""
    import jax.numpy as jnp
    from jax import lax

    window = tuple(window)
    strides = tuple(strides) if strides is not None else (1,) * len(window)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=pad_value)
    h, w = x.shape[1:3]
    oh, ow = (h - window[0]) // strides[0] + 1, (w - window[1]) // strides[1] + 1
    parts = [x[:, dy:dy + strides[0] * (oh - 1) + 1:strides[0], dx:dx + strides[1] * (ow - 1) + 1:strides[1], :]
             for dy in range(window[0]) for dx in range(window[1])]
    return functools.reduce(reduce, parts)


def _max_pool(inputs, window_shape, strides=None, padding="VALID"):
    import jax.numpy as jnp

    return _window_reduce(inputs, window_shape, strides, padding, jnp.maximum, -jnp.inf)


def _avg_pool(inputs, window_shape, strides=None, padding="VALID", count_include_pad=True):
    import jax.numpy as jnp

    total = _window_reduce(inputs, window_shape, strides, padding, jnp.add, 0.0)
    if count_include_pad:
        return total / float(np.prod(window_shape))
    ones = jnp.ones((1, *inputs.shape[1:3], 1), inputs.dtype)
    return total / _window_reduce(ones, window_shape, strides, padding, jnp.add, 0.0)


@contextlib.contextmanager
def _onnx_pooling():
    """``flax.linen.max_pool`` / ``avg_pool`` as slices while converting (see the module docstring)."""
    from flax import linen

    saved = linen.max_pool, linen.avg_pool
    linen.max_pool, linen.avg_pool = _max_pool, _avg_pool
    try:
        yield
    finally:
        linen.max_pool, linen.avg_pool = saved


@contextlib.contextmanager
def _quiet_converter():
    """jax2onnx prints debug lines and logs every plugin that does not import with this jax (none that we use)."""
    loggers = [logging.getLogger(n) for n in ("jax2onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def to_onnx(fn: Callable, image_shape: tuple[int, int, int], name: str = "backbone") -> bytes:
    """``fn`` (uint8 [batch, H, W, C] -> logits) as a serialized ONNX model with a dynamic batch dimension."""
    import jax
    import jax.numpy as jnp

    try:
        from jax2onnx import to_onnx as convert
    except ImportError:
        raise AnalysisError("ONNX export needs jax2onnx and onnxruntime: pip install -e '.[export]'") from None
    def with_onnx_pooling(images):  # entered while jax2onnx traces, after it has patched flax's pools
        with _onnx_pooling():
            return fn(images)

    spec = jax.ShapeDtypeStruct(("batch", *image_shape), jnp.uint8)
    with _quiet_converter():
        proto = convert(with_onnx_pooling, [spec], model_name=name, opset=ONNX_OPSET, input_names=["images"],
                        output_names=["logits"])
    return proto.SerializeToString()


def to_stablehlo(fn: Callable, image_shape: tuple[int, int, int]) -> bytes:
    """``fn`` as a serialized ``jax.export.Exported`` (StableHLO) with a symbolic batch dimension, lowered for
    ``STABLEHLO_PLATFORMS``."""
    import jax
    import jax.numpy as jnp

    h, w, c = image_shape
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {h}, {w}, {c}"), jnp.uint8)
    return bytes(jax.export.export(jax.jit(fn), platforms=STABLEHLO_PLATFORMS)(spec).serialize())


# --- runtimes: the artifact's own, no model code ----------------------------------------------------------------
class OnnxRuntime:
    """An ONNX model in onnxruntime (CPU): ``runtime(uint8 images) -> float32 logits``."""

    name = "onnx"

    def __init__(self, model: bytes | str):
        try:
            import onnxruntime as ort
        except ImportError:
            raise AnalysisError("running an ONNX model needs onnxruntime: pip install -e '.[export]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's InvalidArgument / Fail / ... on a corrupt model
            what = f"{model}: onnxruntime cannot load it" if isinstance(model, str) else \
                "onnxruntime cannot load the ONNX model"
            raise AnalysisError(f"{what} ({type(e).__name__}: {_first_line(e)})") from e
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: np.ascontiguousarray(images, np.uint8)})[0], np.float32)


class StableHLORuntime:
    """A serialized ``jax.export.Exported``, deserialized and called: ``runtime(uint8 images) -> logits``."""

    name = "stablehlo"

    def __init__(self, serialized: bytes):
        import jax

        try:
            self.exported = jax.export.deserialize(bytearray(serialized))
        except Exception as e:  # noqa: BLE001 - struct.error, flatbuffers' errors, ... on a corrupt file
            raise AnalysisError(f"not a serialized jax.export.Exported ({type(e).__name__}: {_first_line(e)})") from e

    def __call__(self, images: np.ndarray) -> np.ndarray:  # compiled once per batch size
        return np.asarray(self.exported.call(np.asarray(images, np.uint8)), np.float32)


RUNTIMES = {"onnx": OnnxRuntime, "stablehlo": StableHLORuntime}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def open_runtime(fmt: str, artifact: bytes):
    return RUNTIMES[fmt](artifact)


# --- the check ---------------------------------------------------------------------------------------------------
def batched_logits(run: Callable, images, batch_size: int = CHECK_BATCH) -> np.ndarray:
    """``run`` over ``images`` (an array, or a streaming dataset's view) in batches of ``batch_size`` (the last one
    zero-padded, so that a compiled runtime sees one shape)."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], np.uint8)
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)])
        out.append(np.asarray(run(batch), np.float32)[:n])
    return np.concatenate(out)


def compare(name: str, reference: np.ndarray, logits: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """-> {max_abs_diff, max_rel_diff (max |logits - reference| / |reference|), top1_disagreements}; raises
    ExportCheckError unless |logits - reference| <= atol + rtol * |reference| everywhere and every image's top-1 is
    the same."""
    if logits.shape != reference.shape:
        raise ExportCheckError(f"{name}: logits of shape {logits.shape}, the JAX model's are {reference.shape}")
    err = np.abs(logits.astype(np.float64) - reference)
    magnitude = np.abs(reference.astype(np.float64))
    diff = float(np.max(err)) if err.size else 0.0
    rel = float(np.max(err / np.maximum(magnitude, np.finfo(np.float32).tiny))) if err.size else 0.0
    flips = int(np.sum(np.argmax(logits, -1) != np.argmax(reference, -1)))
    within = bool(np.all(err <= atol + rtol * magnitude))  # False on NaN
    if not within or flips:
        big = float(np.max(magnitude, initial=0))
        hint = ""
        if not within and big >= 100:  # float32 rounding alone: ~6e-8 of the magnitude per operation
            hint = (f"; logits this large round by ~{big * 6e-8:.1g} in float32 alone: --rtol=1e-6 allows a relative "
                    f"difference")
        raise ExportCheckError(f"{name}: the runtime's logits differ from the JAX model's by up to {diff:.3g} "
                               f"(|logit| up to {big:.3g}; allowed {atol:g} + {rtol:g} * |logit|) and its top-1 "
                               f"differs on {flips} of {len(reference)} images: refusing to write it{hint}")
    return {"max_abs_diff": diff, "max_rel_diff": rel, "top1_disagreements": flips}


def check(runtimes: dict, reference: np.ndarray, images, labels: np.ndarray | None = None,
          batch_size: int = CHECK_BATCH, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Runs each of ``runtimes`` ({format: callable}) on ``images`` and compares its logits with ``reference``
    (the JAX model's on the same images): -> {format: {max_abs_diff, top1_disagreements[, top1]}}; raises
    ExportCheckError on the first that differs."""
    report = {}
    for fmt, run in runtimes.items():
        logits = batched_logits(run, images, batch_size)
        report[fmt] = compare(fmt, reference, logits, atol, rtol)
        if labels is not None:
            report[fmt]["top1"] = top1(logits, labels)
    return report


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels))) if len(labels) else float("nan")


# --- the run's metadata: class names, input, evaluation transform -------------------------------------------------
def class_names(data_cfg, num_classes: int) -> list[str]:
    """The dataset's class names, index by index: the digits' '0'..'9', tfds' label names (CIFAR-10 / -100, STL-10,
    ImageNet's WordNet ids, from the prepared dataset's info), an image folder's sorted class folder names; an index
    without a name is its number."""
    names: list[str] = []
    if data_cfg.get("dir", None):
        from mgd_jax.data.streaming import FOLDER_SPLITS

        root = os.path.join(os.path.expanduser(data_cfg.dir), FOLDER_SPLITS["train"])
        if os.path.isdir(root):
            names = sorted(d.name for d in os.scandir(root) if d.is_dir())
    elif data_cfg.name == "digits":
        names = [str(i) for i in range(10)]
    else:
        import tensorflow_datasets as tfds

        data_dir = os.path.expanduser(data_cfg.data_dir) if data_cfg.get("data_dir", None) else None
        try:
            names = list(tfds.builder(data_cfg.name, data_dir=data_dir).info.features["label"].names)
        except Exception:  # noqa: BLE001 - an unprepared or unknown dataset has no names: indices stand in
            names = []
    return (names + [str(i) for i in range(len(names), num_classes)])[:num_classes]


# eval_transform["interpolation"] in model.json: how the run's own pipeline resized its evaluation images
STREAMED = "bilinear, antialiased"  # a streamed dataset: streaming.eval_image (PIL), also an older model.json's
NEAREST = "nearest"  # the digits: 8x8 images repeated to the input size at load (sources.load_digits)
IN_MEMORY = "bilinear, antialiased, jax.image.resize"  # a tfds dataset held in memory (sources.resize_images)


def eval_resize(data_cfg) -> dict:
    """How an image file of any size becomes the model's input, as the run's own pipeline made its evaluation
    images.  A streamed dataset: resize the short side to ``round(size * resize_ratio)``, centre crop (PIL,
    bilinear, antialiased: ``streaming.eval_image``).  An in-memory dataset is stored at its input size
    (``resize_ratio`` 1): the centre square, resized as ``sources`` resized it at load: the digits
    nearest-neighbour (``load_digits`` repeats each pixel), the others by ``sources.resize_images``."""
    from mgd_jax.data.sources import STREAMING
    from mgd_jax.data.streaming import EVAL_RESIZE_RATIO

    if bool(data_cfg.get("dir", None)) or data_cfg.name in STREAMING:
        ratio, interpolation = float(data_cfg.get("eval_resize_ratio", EVAL_RESIZE_RATIO)), STREAMED
    else:
        ratio, interpolation = 1.0, NEAREST if data_cfg.name == "digits" else IN_MEMORY
    return {"resize_ratio": ratio, "crop": "center", "interpolation": interpolation}


def _center_square(pixels: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """uint8 [H, W, C] -> its centre square resized to ``size`` x ``size`` as ``sources`` resizes at load."""
    from mgd_jax.data.sources import resize_images

    h, w = pixels.shape[:2]
    side = min(h, w)
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    square = pixels[top:top + side, left:left + side]
    if interpolation == IN_MEMORY:
        return resize_images(square[None], size)[0]
    if size % side == 0:  # load_digits' own upsampling
        return square.repeat(size // side, axis=0).repeat(size // side, axis=1)
    idx = np.minimum((np.arange(size) + 0.5) * side / size, side - 1).astype(int)  # nearest, for other sizes
    return square[idx][:, idx]


def load_image(path: str, image_shape, resize_ratio: float = 1.0, interpolation: str = STREAMED) -> np.ndarray:
    """An image file (PNG, JPEG, ...) -> uint8 [H, W, C]: RGB (or grayscale for C = 1), resized and centre-cropped
    as ``eval_resize``'s ``resize_ratio`` and ``interpolation`` say."""
    from PIL import Image

    from mgd_jax.data.streaming import eval_image

    h, w, c = (int(d) for d in image_shape)
    if h != w:
        raise AnalysisError(f"input {h}x{w} is not square: no evaluation transform for it")
    if interpolation not in (STREAMED, NEAREST, IN_MEMORY):
        raise AnalysisError(f"evaluation interpolation {interpolation!r}: use one of {STREAMED!r}, {NEAREST!r}, "
                            f"{IN_MEMORY!r}")
    try:  # PIL's decode errors, as streaming.decode catches them
        with Image.open(path) as img:
            if interpolation == STREAMED:
                rgb = eval_image(img, h, resize_ratio)
                if c == 1:
                    return np.asarray(Image.fromarray(rgb).convert("L"), np.uint8)[..., None]
                return rgb
            pixels = np.asarray(img.convert("L" if c == 1 else "RGB"), np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise AnalysisError(f"{path}: cannot read it as an image ({type(e).__name__}: {e})") from None
    return _center_square(pixels.reshape(*pixels.shape[:2], c), h, interpolation)


# --- the stage ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Deployable:
    """A stage's backbone as it deploys: the float32 model, its variables and the run's normalisation."""

    stage: str
    arch: str
    model: object
    variables: dict
    mean: tuple
    std: tuple
    image_shape: tuple
    meta: dict

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def logits_fn(self) -> Callable:
        return logits_fn(self.model, self.variables, self.mean, self.std)

    def jax_logits(self, images, batch_size: int = CHECK_BATCH) -> np.ndarray:
        """The reference: the JAX model (jitted, the variables an argument) on ``images``."""
        import jax

        fn = jax.jit(lambda variables, x: logits_fn(self.model, variables, self.mean, self.std)(x))
        return batched_logits(lambda x: fn(self.variables, x), images, batch_size)


def read_stage(run, stage: str) -> Deployable:
    """``stage`` (teacher | students/<name>) of ``run`` (an ``analysis.common.Run``) -> its Deployable."""
    from mgd_jax.export_torch import read_backbone
    from mgd_jax.models import classifier_name, get_model

    if stage.strip("/").split("/")[0] == "mutual":
        raise AnalysisError(f"stage {stage!r}: mutual-learning peers are not exportable (export teacher or "
                            f"students/<name>)")
    stage = run.check_stage(stage, purpose=" to export")
    arch, variables = read_backbone(run.workdir, stage)  # refuses what has no backbone, names the architecture
    _, meta = run.restore_best(stage)  # its metadata (the epoch)
    params = variables["params"]
    model = get_model(arch, int(params[classifier_name(params)]["kernel"].shape[1]))
    return Deployable(stage, arch, model, variables, tuple(run.config.augment.mean), tuple(run.config.augment.std),
                      image_shape(run), meta)


def image_shape(run) -> tuple[int, int, int]:
    """The run's input (H, W, C) from its config, without loading the data where the config says it (the digits,
    a streamed dataset, a resized tfds one); else the loaded dataset's."""
    from mgd_jax.data.sources import STREAMING

    data = run.config.data
    if data.name == "digits" and not data.get("dir", None):
        size = int(data.get("image_size", 16))
        return (size, size, 1)
    if data.get("dir", None) or data.name in STREAMING:
        size = int(data.get("image_size", 224))
        return (size, size, 3)
    if data.get("image_size", None):
        return (int(data.image_size), int(data.image_size), 3)
    return tuple(int(d) for d in run.dataset.image_shape)


def export_stage(workdir: str, stage: str, formats=FORMATS, out: str | None = None, batch_size: int = CHECK_BATCH,
                 log=print, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Exports ``stage``'s best backbone in ``formats``, checks each in its runtime on the whole test split, and
    only then writes them and ``model.json`` into ``out`` (default ``<workdir>/<stage>/export``).  -> the
    metadata written."""
    from mgd_jax.analysis.common import Run, check_out_folder

    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise AnalysisError(f"--format={','.join(formats)}: use one or more of {', '.join(FORMATS)}")
    if "onnx" in formats:  # the export extra, before the long part
        import importlib

        try:
            for name in ("jax2onnx", "onnxruntime"):
                importlib.import_module(name)
        except ImportError:
            raise AnalysisError("ONNX export needs jax2onnx and onnxruntime: pip install -e '.[export]'") from None
    if not (atol >= 0 and rtol >= 0):
        raise AnalysisError(f"--atol={atol:g} --rtol={rtol:g}: tolerances must be >= 0")
    if batch_size < 1:
        raise AnalysisError(f"batch_size={batch_size}: must be >= 1")
    run = Run(workdir)
    model = read_stage(run, stage)
    stage = model.stage
    out = out or os.path.join(run.stage_dir(stage), "export")
    check_out_folder(out)  # before the long check
    images, labels = run.split("test")
    log(f"{stage}: {model.arch}, {model.num_classes} classes, input {'x'.join(map(str, model.image_shape))} uint8; "
        f"{len(labels)} test images")
    reference = model.jax_logits(images, batch_size)
    fn = model.logits_fn()
    artifacts = {}
    for fmt in formats:
        artifacts[fmt] = (to_onnx(fn, model.image_shape, model.arch) if fmt == "onnx"
                          else to_stablehlo(fn, model.image_shape))
    report = check({fmt: open_runtime(fmt, blob) for fmt, blob in artifacts.items()}, reference, images, labels,
                   batch_size, atol, rtol)
    accuracy = {"jax": top1(reference, labels), **{fmt: r["top1"] for fmt, r in report.items()}}
    log("top-1 on the test split: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items()))
    for fmt, r in report.items():
        log(f"{fmt}: largest |logit - JAX logit| {r['max_abs_diff']:.2e}, relative {r['max_rel_diff']:.2e} "
            f"(allowed {atol:g} + {rtol:g} * |logit|); top-1 identical")

    metadata = {
        "arch": model.arch, "stage": stage, "workdir": os.path.abspath(workdir),
        "checkpoint_epoch": model.meta.get("epoch"), "dataset": run.config.data.name,
        "num_classes": model.num_classes, "class_names": class_names(run.config.data, model.num_classes),
        "input": {"shape": ["batch", *model.image_shape], "dtype": "uint8", "layout": "NHWC", "name": "images"},
        "output": {"shape": ["batch", model.num_classes], "dtype": "float32", "name": "logits"},
        "normalization": {"mean": list(model.mean), "std": list(model.std),
                          "formula": "(image / 255 - mean) / std, inside the graph"},
        "eval_transform": eval_resize(run.config.data),
        "precision": "float32",
        "files": {fmt: FILES[fmt] for fmt in formats},
        "sha256": {FILES[fmt]: sha256(blob) for fmt, blob in artifacts.items()},
        "check": {"split": "test", "examples": int(len(labels)), "rule": f"|logit - JAX logit| <= {atol:g} + "
                  f"{rtol:g} * |JAX logit|, same top-1", "atol": atol, "rtol": rtol,
                  **{fmt: {k: r[k] for k in ("max_abs_diff", "max_rel_diff")} for fmt, r in report.items()}},
        "accuracy": {"top1": accuracy},
        "versions": _versions(formats),
    }
    if "onnx" in formats:
        metadata["onnx_opset"] = ONNX_OPSET
    if "stablehlo" in formats:
        metadata["stablehlo_platforms"] = list(STABLEHLO_PLATFORMS)
    blobs = {FILES[fmt]: blob for fmt, blob in artifacts.items()}
    blobs[METADATA] = (json.dumps(metadata, indent=1) + "\n").encode()
    stale = [FILES[fmt] for fmt in FORMATS if fmt not in formats]
    _write_all(out, blobs, stale)
    for name in blobs:
        log(f"wrote {os.path.join(out, name)}")
    return metadata


def _versions(formats) -> dict:
    from importlib import metadata as md

    wanted = ["jax", "jaxlib"] + (["jax2onnx", "onnx", "onnxruntime"] if "onnx" in formats else [])
    out = {}
    for name in wanted:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _write_all(folder: str, blobs: dict[str, bytes], stale=()) -> None:
    """Each file first as ``.<name>.tmp``, then all renamed into place: no half-written file under a real name;
    then the ``stale`` files (another export's formats) removed, so that the folder holds this export only."""
    tmps = {name: os.path.join(folder, f".{name}.tmp") for name in blobs}
    try:
        os.makedirs(folder, exist_ok=True)
        for name, blob in blobs.items():
            with open(tmps[name], "wb") as f:
                f.write(blob)
        for name in blobs:
            os.replace(tmps[name], os.path.join(folder, name))
        for name in stale:
            if os.path.lexists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    except OSError as e:
        raise AnalysisError(f"{folder}: cannot write the export ({type(e).__name__}: {e})") from e
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def main(argv=None) -> int:
    from mgd_jax.analysis.common import BACKBONE_STAGES, cli, tool_parser

    p = tool_parser(__doc__, stage=BACKBONE_STAGES, prog="python -m mgd_jax.export")
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated: " + ", ".join(FORMATS))
    p.add_argument("--out", default=None, help="the folder to write (default <workdir>/<stage>/export)")
    p.add_argument("--atol", type=float, default=ATOL, help="allowed |logit - JAX logit| (default %(default)g)")
    p.add_argument("--rtol", type=float, default=RTOL,
                   help="plus this times |JAX logit| (default %(default)g; e.g. 1e-6 for logits in the thousands)")

    @cli
    def run(argv):
        a = p.parse_args(argv)
        export_stage(a.workdir, a.stage, [f.strip() for f in a.format.split(",") if f.strip()], a.out,
                     atol=a.atol, rtol=a.rtol)
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
