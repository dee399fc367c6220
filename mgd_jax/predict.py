"""The top classes of image files, from an exported model or straight from a workdir's stage.

    python -m mgd_jax.predict --model=runs/quickstart/students/mas_kd/export/model.onnx digit.png more/*.jpg
    python -m mgd_jax.predict --model=DIR/model.stablehlo digit.png
    python -m mgd_jax.predict --workdir=runs/quickstart --stage=students/mas_kd digit.png

Each image (PNG, JPEG, ... of any size) becomes the model's input as the run's evaluation transform makes it
(``mgd_jax.export.load_image``: RGB, or grayscale for a one-channel model; the short side resized, the centre
cropped); the top ``--top`` (5) classes are printed with their softmax probabilities and the dataset's class names.
An exported model reads its names, input size and transform from the ``model.json`` beside it, and runs in its
own runtime (onnxruntime; jax for the StableHLO file) without this package's model code; a model file that
``model.json`` does not list, or whose sha256 differs from the one it records, is refused (re-export).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

import numpy as np

from mgd_jax.errors import AnalysisError
from mgd_jax.export import (METADATA, STREAMED, OnnxRuntime, StableHLORuntime, batched_logits, class_names,
                            eval_resize, load_image, read_stage, sha256)

TOP = 5


class Classifier:
    """``logits(uint8 images) -> logits``, its class names, input shape and evaluation transform (``eval_resize``:
    resize ratio and interpolation)."""

    def __init__(self, logits: Callable, names: list[str], image_shape, resize_ratio: float, source: str,
                 interpolation: str = STREAMED):
        self.logits, self.names, self.source = logits, list(names), source
        self.image_shape, self.resize_ratio = tuple(int(d) for d in image_shape), float(resize_ratio)
        self.interpolation = interpolation

    @classmethod
    def from_export(cls, path: str) -> "Classifier":
        """``path``: an exported ``model.onnx`` or ``model.stablehlo``, ``model.json`` beside it."""
        if os.path.isdir(path):
            raise AnalysisError(f"--model={path} is a folder: give its model.onnx or model.stablehlo")
        if not os.path.isfile(path):
            raise AnalysisError(f"--model={path} does not exist")
        if not path.endswith((".onnx", ".stablehlo")):
            raise AnalysisError(f"--model={path}: not a .onnx or .stablehlo file (python -m mgd_jax.export writes "
                                f"them; or use --workdir=DIR --stage=STAGE)")
        meta_path = os.path.join(os.path.dirname(os.path.abspath(path)), METADATA)
        if not os.path.isfile(meta_path):
            raise AnalysisError(f"{meta_path} is missing: --model takes a file written by python -m mgd_jax.export")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            transform = meta["eval_transform"]
            args = (meta["class_names"], meta["input"]["shape"][1:], float(transform["resize_ratio"]), path,
                    transform.get("interpolation", STREAMED))
            listed = os.path.basename(path) in meta["files"].values()
            recorded = meta.get("sha256", {}).get(os.path.basename(path))
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:  # a missing key, a corrupt JSON
            raise AnalysisError(f"{meta_path}: not a model.json written by python -m mgd_jax.export ("
                                f"{type(e).__name__}: {e})") from None
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise AnalysisError(f"--model={path}: cannot read it ({e.strerror})") from None
        if not listed or recorded != sha256(blob):
            why = "is not listed in" if not listed else "has another sha256 than the one recorded in"
            raise AnalysisError(f"--model={path} {why} {meta_path}: it was not written with this model.json: "
                                f"re-export")
        try:
            run = OnnxRuntime(blob) if path.endswith(".onnx") else StableHLORuntime(blob)
        except AnalysisError as e:
            raise AnalysisError(f"--model={path}: {e}") from None
        return cls(run, *args)

    @classmethod
    def from_stage(cls, workdir: str, stage: str) -> "Classifier":
        """A workdir's teacher or student, computed by JAX (float32) from its best checkpoint."""
        import jax

        from mgd_jax.analysis.common import Run
        from mgd_jax.export import logits_fn

        run = Run(workdir)
        model = read_stage(run, stage)
        fn = jax.jit(lambda variables, x: logits_fn(model.model, variables, model.mean, model.std)(x))
        transform = eval_resize(run.config.data)
        return cls(lambda x: fn(model.variables, x), class_names(run.config.data, model.num_classes),
                   model.image_shape, transform["resize_ratio"], f"{workdir}:{stage}", transform["interpolation"])

    def top(self, paths: list[str], k: int = TOP) -> list[tuple[str, list[tuple[str, float]]]]:
        """-> for each image, its ``k`` most probable classes as (name, probability), most probable first."""
        images = np.stack([load_image(p, self.image_shape, self.resize_ratio, self.interpolation) for p in paths])
        logits = batched_logits(self.logits, images, batch_size=min(len(images), 100)).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = []
        for path, p in zip(paths, probs):
            order = np.argsort(-p, kind="stable")[:k]
            out.append((path, [(self.names[i], float(p[i])) for i in order]))
        return out


def main(argv=None) -> int:
    from mgd_jax.analysis.common import BACKBONE_STAGES, ToolParser, cli

    p = ToolParser("python -m mgd_jax.predict", __doc__)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", help="an exported model.onnx or model.stablehlo (model.json beside it)")
    p.add_argument("--workdir", help="a workdir written by train.py (with --stage, instead of --model)")
    p.add_argument("--stage", help=BACKBONE_STAGES)
    p.add_argument("--top", type=int, default=TOP, help="how many classes to print per image")

    @cli
    def run(argv):
        a = p.parse_args(argv)
        if bool(a.model) == bool(a.workdir) or bool(a.workdir) != bool(a.stage):
            raise AnalysisError("give either --model=FILE or --workdir=DIR --stage=STAGE")
        if a.top < 1:
            raise AnalysisError(f"--top={a.top}: must be at least 1")
        classifier = Classifier.from_export(a.model) if a.model else Classifier.from_stage(a.workdir, a.stage)
        for path, top in classifier.top(a.images, a.top):
            print(path)
            for name, prob in top:
                print(f"  {prob:.4f}  {name}")
        return 0

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
