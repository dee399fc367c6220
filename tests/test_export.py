"""Export (issue #17): a stage's backbone as ONNX (run in onnxruntime) and StableHLO (jax.export, deserialized),
checked against the JAX model at export; predicting image files from either, or from the workdir.  A test that
needs jax2onnx or onnxruntime skips where it is not installed, and fails where MGD_JAX_REQUIRE names it
(tests/_requires.py)."""
import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from _requires import need
from mgd_jax import export as ex
from mgd_jax import predict
from mgd_jax.models import ARCHITECTURES, get_model

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SIZE = 32  # the smallest input every architecture takes (the ImageNet models downsample 32x)
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.3)
# jax.export is one code path for every architecture (and the quickstart's ResNets export through it below): its
# artifact is checked here on the channel shuffle and pooled shortcut, depthwise convs, max pools (each compile of
# a deserialized artifact costs as much as the JAX reference's, ~1-3 s)
STABLEHLO_ARCHS = ("ShuffleV1", "mobilenetv1_imagenet", "vgg8")


# Session-scoped and first in a test's arguments: a missing package skips the test before the smoke run is trained.
@pytest.fixture(scope="session")
def ort():
    """onnxruntime: the ONNX artifacts' runtime."""
    return need("onnxruntime")


@pytest.fixture(scope="session")
def jax2onnx():
    """jax2onnx: the ONNX conversion."""
    return need("jax2onnx")


def _random_variables(model, rng):
    """Random weights of every kind (He-scaled kernels, BN scale / running var around 1, small biases and running
    means), without compiling ``model.init``."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


# One architecture of each family (each building block and stem): the others of a family differ only in depth and
# width, which the conversion does not see (every one of the zoo's 29 architectures converted when this was chosen).
EXPORT_SAMPLE = ("resnet8", "ResNet50", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                 "resnet18_imagenet", "resnet50_imagenet", "mobilenetv1_imagenet")


def test_the_sample_covers_every_family():
    families = {get_model(a, 10).__class__ for a in ARCHITECTURES}
    assert {get_model(a, 10).__class__ for a in EXPORT_SAMPLE} == families


@pytest.mark.timeout(150)
@pytest.mark.parametrize("arch", EXPORT_SAMPLE)
def test_every_architecture_exports(ort, jax2onnx, arch):
    """The ONNX graph of each family's architecture (ShuffleNet's channel shuffle and pooled shortcut, MobileNet's depthwise
    convs, VGG's and the ImageNet stems' max pools) gives the flax model's logits in onnxruntime, for batch 3 and
    batch 1 of one artifact taking uint8 NHWC images; the StableHLO artifact likewise, deserialized."""
    rng = np.random.default_rng(0)
    model = get_model(arch, 10)
    variables = _random_variables(model, rng)
    images = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    fn = ex.logits_fn(model, variables, MEAN, STD)
    x = (images.astype(np.float32) / 255 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    # the reference compiled without XLA's backend optimisations: ~20% less compile time over the zoo
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0], compiler_options=FAST_COMPILE)
    reference = np.asarray(apply(variables, x))
    scale = float(np.abs(reference).max())
    # Random weights without trained BN statistics let residual sums grow with depth (logits up to 1e11 for
    # resnet110): the tolerance is 1e-4 of the logits' magnitude (float32 agrees to ~1e-6 of it), and the logits
    # must differ between images (a graph that ignored its input would pass otherwise).
    tol = ex.ATOL * max(1.0, scale)
    assert float(np.mean(np.std(reference, 0))) > 1e-3 * scale, "degenerate test weights"

    blob = ex.to_onnx(fn, (SIZE, SIZE, 3), arch)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.type, inp.shape[1:], out.shape[1:]) == ("tensor(uint8)", [SIZE, SIZE, 3], [10])
    assert isinstance(inp.shape[0], str)  # a symbolic batch dimension
    for batch in (images, images[:1]):
        got = session.run(None, {inp.name: batch})[0]
        np.testing.assert_allclose(got, reference[:len(batch)], rtol=0, atol=tol)
        assert (got.argmax(-1) == reference[:len(batch)].argmax(-1)).all()
    report = ex.check({"onnx": lambda x: session.run(None, {inp.name: x})[0]}, reference, images, batch_size=3,
                      atol=tol)
    assert report["onnx"]["top1_disagreements"] == 0

    if arch in STABLEHLO_ARCHS:
        exported = jax.export.deserialize(bytearray(ex.to_stablehlo(fn, (SIZE, SIZE, 3))))
        assert exported.in_avals[0].dtype == jnp.uint8 and exported.in_avals[0].shape[1:] == (SIZE, SIZE, 3)
        assert not isinstance(exported.in_avals[0].shape[0], int)  # symbolic
        for batch in (images, images[:1]):
            got = np.asarray(exported.call(batch))
            np.testing.assert_allclose(got, reference[:len(batch)], rtol=0, atol=tol)
            assert (got.argmax(-1) == reference[:len(batch)].argmax(-1)).all()
        ex.check({"stablehlo": exported.call}, reference, images, batch_size=3, atol=tol)


@pytest.mark.parametrize("window,strides,padding,include", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), True), ((2, 2), (2, 2), "VALID", True), ((3, 3), (1, 1), "SAME", False)])
def test_onnx_pooling_equals_flax(window, strides, padding, include):
    """The pools the ONNX conversion computes from slices are flax's (the ResNet stems' and ShuffleNet's, VGG's,
    and the other cases flax's signature allows)."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 8, 3)), jnp.float32)

    @jax.jit
    def pools(x):
        return (ex._max_pool(x, window, strides=strides, padding=padding),
                nn.max_pool(x, window, strides=strides, padding=padding),
                ex._avg_pool(x, window, strides=strides, padding=padding, count_include_pad=include),
                nn.avg_pool(x, window, strides=strides, padding=padding, count_include_pad=include))

    ours_max, flax_max, ours_avg, flax_avg = pools(x)
    np.testing.assert_array_equal(ours_max, flax_max)
    np.testing.assert_allclose(ours_avg, flax_avg, rtol=1e-6, atol=1e-6)


def _softmax(logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _parse(out):
    """predict's output -> {image path: [(name, probability), ...]}."""
    result, current = {}, None
    for line in out.splitlines():
        if line.startswith("  "):
            prob, name = line.split()
            result[current].append((name, float(prob)))
        elif line:
            current = line
            result[current] = []
    return result


@pytest.mark.timeout(300)
def test_teacher_and_student_export_check_and_predict(ort, jax2onnx, smoke_workdir, tmp_path, capsys):
    """The smoke run's teacher and student export in both formats; each artifact, run here independently of the
    exporter's runtimes, gives the run's own JAX backbone's logits on the whole test split; predict on PNG files
    written here names the classes with the model's probabilities, the same through ONNX, StableHLO and the
    workdir.  A 40x30 RGB file becomes the input built here by hand: its centre 30x30 square, nearest-neighbour to
    8x8, grey."""
    from PIL import Image

    from mgd_jax.analysis.common import Run
    from mgd_jax.data.augment import eval_transform

    work, _ = smoke_workdir
    run = Run(work)
    images, labels = run.split("test")
    pngs = []
    for i in range(4):
        pngs.append(str(tmp_path / f"test_{i}.png"))
        Image.fromarray(images[i][..., 0]).save(pngs[-1])  # one channel, the input size
    # Another size and RGB, resized as the evaluation transform does (the digits': centre square, nearest): 40x30
    # pixels of coloured noise but for the 8x8 that nearest-neighbour sampling of the centre 30x30 reads (the
    # pixel under each output pixel's centre, int((i + 0.5) * 30 / 8)), which hold test image 4 in grey (R = G =
    # B).  Its input is test image 4 exactly; a shifted crop or another sampling reads noise.
    big = str(tmp_path / "large.png")
    rows = np.array([1, 5, 9, 13, 16, 20, 24, 28])
    pixels = np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pixels[rows[:, None], 5 + rows[None, :]] = images[4]  # (8, 8, 1) -> R = G = B
    Image.fromarray(pixels).save(big)
    np.testing.assert_array_equal(ex.load_image(big, (8, 8, 1), 1.0, ex.NEAREST), images[4])

    for stage in ("teacher", "students/mas_kd"):
        out = tmp_path / stage.replace("/", "_")
        assert ex.main([f"--workdir={work}", f"--stage={stage}", f"--out={out}"]) == 0
        printed = capsys.readouterr().out
        assert sorted(os.listdir(out)) == ["model.json", "model.onnx", "model.stablehlo"]
        meta = json.loads((out / "model.json").read_text())
        backbone = run.backbone(stage)
        reference = np.asarray(jax.jit(lambda v, x: backbone.apply(v, eval_transform(x, run.config.augment))[0])(
            backbone.variables, images))
        acc = float(np.mean(reference.argmax(-1) == labels))
        assert meta["arch"] == backbone.arch and meta["num_classes"] == 10 and meta["stage"] == stage
        assert meta["class_names"] == [str(i) for i in range(10)]
        assert meta["input"] == {"shape": ["batch", 8, 8, 1], "dtype": "uint8", "layout": "NHWC", "name": "images"}
        assert meta["normalization"]["mean"] == list(run.config.augment.mean)
        assert meta["normalization"]["std"] == list(run.config.augment.std)
        assert meta["check"]["examples"] == len(labels) == 100
        assert meta["accuracy"]["top1"] == {"jax": acc, "onnx": acc, "stablehlo": acc}
        assert f"jax {100 * acc:.2f}%, onnx {100 * acc:.2f}%, stablehlo {100 * acc:.2f}%" in printed

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        exported = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
        for got in (session.run(None, {"images": images})[0], np.asarray(exported.call(images)),
                    session.run(None, {"images": images[:1]})[0]):
            np.testing.assert_allclose(got, reference[:len(got)], rtol=0, atol=1e-4)
            assert (got.argmax(-1) == reference[:len(got)].argmax(-1)).all()

        if stage == "teacher":  # the files alone: a process where this package and flax cannot be imported
            np.save(tmp_path / "images.npy", images)
            code = ("import sys; sys.modules.update(mgd_jax=None, flax=None)\n"
                    "import numpy as np, onnxruntime, jax\n"
                    f"x = np.load({str(tmp_path / 'images.npy')!r})\n"
                    f"s = onnxruntime.InferenceSession({str(out / 'model.onnx')!r}, "
                    "providers=['CPUExecutionProvider'])\n"
                    f"e = jax.export.deserialize(bytearray(open({str(out / 'model.stablehlo')!r}, 'rb').read()))\n"
                    f"np.save({str(tmp_path / 'alone.npy')!r}, np.stack([s.run(None, {{'images': x}})[0], e.call(x)]))")
            subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""})
            for got in np.load(tmp_path / "alone.npy"):
                np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)

        results = []
        for source in ([f"--model={out / 'model.onnx'}"], [f"--model={out / 'model.stablehlo'}"],
                       [f"--workdir={work}", f"--stage={stage}"]):
            assert predict.main([*source, *pngs, big]) == 0
            results.append(_parse(capsys.readouterr().out))
        for i, path in [*enumerate(pngs), (4, big)]:
            top = results[0][path]
            p = _softmax(reference[i].astype(np.float64))
            assert [name for name, _ in top] == [str(c) for c in np.argsort(-p, kind="stable")[:5]]
            np.testing.assert_allclose([prob for _, prob in top], np.sort(p)[::-1][:5], atol=1e-4)
        for other in results[1:]:
            assert other.keys() == results[0].keys()
            for path in other:
                assert [n for n, _ in other[path]] == [n for n, _ in results[0][path]]
                np.testing.assert_allclose([q for _, q in other[path]], [q for _, q in results[0][path]], atol=1e-4)


class _Off:
    """A runtime whose first logit is ``off`` away from the artifact's."""

    def __init__(self, run, off):
        self.run, self.off = run, off

    def __call__(self, images):
        logits = self.run(images).copy()
        logits[0, 0] += self.off
        return logits


@pytest.mark.timeout(240)
def test_a_runtime_that_differs_is_refused_and_nothing_is_written(ort, jax2onnx, smoke_workdir, tmp_path, monkeypatch,
                                                                   capsys):
    work, _ = smoke_workdir
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    onnx_runtime = ex.RUNTIMES["onnx"]
    monkeypatch.setitem(ex.RUNTIMES, "onnx", lambda blob: _Off(onnx_runtime(blob), 3e-4))
    assert ex.main([f"--workdir={work}", "--stage=students/mas_kd", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: onnx: the runtime's logits differ from the JAX model's by up to ")
    assert "allowed 0.0001 + 0 * |logit|) and its top-1 differs on 0 of 100 images" in err
    assert err.endswith("refusing to write it") and "\n" not in err
    assert sorted(os.listdir(out)) == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"an earlier export"

    # just within the tolerance it is written (StableHLO only: the ONNX conversion is tested above), and the
    # earlier export's model.onnx, another format, is removed: the folder holds this export only
    monkeypatch.setitem(ex.RUNTIMES, "stablehlo", lambda blob, run=ex.RUNTIMES["stablehlo"]: _Off(run(blob), 5e-5))
    meta = ex.export_stage(work, "students/mas_kd", ["stablehlo"], str(out), log=lambda *_: None)
    assert 4e-5 < meta["check"]["stablehlo"]["max_abs_diff"] <= 1e-4
    assert (meta["check"]["atol"], meta["check"]["rtol"]) == (1e-4, 0.0)
    assert meta["files"] == {"stablehlo": "model.stablehlo"}
    assert sorted(os.listdir(out)) == ["model.json", "model.stablehlo"]
    stablehlo = (out / "model.stablehlo").read_bytes()
    assert meta["sha256"] == {"model.stablehlo": hashlib.sha256(stablehlo).hexdigest()}
    assert json.loads((out / "model.json").read_text())["sha256"] == meta["sha256"]

    # predict refuses a model file that this model.json does not list, or whose bytes are not the ones it records
    (out / "model.onnx").write_bytes(b"a stale export")
    (out / "model.stablehlo").write_bytes(stablehlo[:-1] + bytes([stablehlo[-1] ^ 1]))
    for name, why in (("model.onnx", "is not listed in"), ("model.stablehlo", "has another sha256 than the one")):
        assert predict.main([f"--model={out / name}", "x.png"]) == 2
        err = capsys.readouterr().err
        assert why in err and err.strip().endswith("it was not written with this model.json: re-export")
        assert err.count("\n") == 1


def test_a_top1_flip_within_the_tolerance_is_refused():
    reference = np.array([[1.0, 1.00001, 0.0], [0.0, 2.0, 1.0]], np.float32)
    flipped = reference.copy()
    flipped[0, 0] += 2e-5  # 2e-5 < 1e-4 (1 + 1), but image 0's top-1 is now class 0
    assert ex.compare("x", reference, reference.copy())["max_abs_diff"] == 0
    big = reference * 3000  # 0.2 on logits of 3000: refused by default (1e-4), within with --rtol=1e-4
    with pytest.raises(ex.ExportCheckError, match="by up to 0.2 .*--rtol=1e-6 allows a relative difference"):
        ex.compare("x", big, big + 0.2 * np.sign(big))
    assert ex.compare("x", big, big + 0.2 * np.sign(big), rtol=1e-4)["max_abs_diff"] == pytest.approx(0.2, rel=1e-3)
    with pytest.raises(ex.ExportCheckError, match="by up to 0.2 "):  # 0.2 on a logit of 0 is not
        ex.compare("x", big, big + 0.2, rtol=1e-4)
    with pytest.raises(ex.ExportCheckError, match=r"top-1 differs on 1 of 2 images"):
        ex.compare("x", reference, flipped)
    with pytest.raises(ex.ExportCheckError, match="by up to nan"):
        ex.compare("x", reference, reference * np.nan)


def test_one_line_errors(ort, jax2onnx, smoke_workdir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from mgd_jax.analysis.common import Run

    work, _ = smoke_workdir
    (tmp_path / "a_file").write_text("")
    for argv, message in (
            ([f"--workdir={work}", "--stage=analyzer"], "stage 'analyzer' has no backbone to export"),
            ([f"--workdir={work}", "--stage=mutual"], "mutual-learning peers are not exportable"),
            ([f"--workdir={work}", "--stage=teacher", f"--out={tmp_path / 'a_file' / 'under' / 'it'}"],
             f"cannot create it, {tmp_path / 'a_file'} is a file"),
            ([f"--workdir={work}", "--stage=teacher", "--format=tflite"], "--format=tflite: use one or more of"),
            ([f"--workdir={tmp_path}", "--stage=teacher"], "config.json is missing")):
        assert ex.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "teacher").exists()

    # the export extra is checked before the test split is read and the JAX reference computed
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "jax2onnx", None)
        m.setattr(Run, "split", lambda *_: pytest.fail("the split was read before the imports were checked"))
        assert ex.main([f"--workdir={work}", "--stage=teacher", f"--out={tmp_path / 'x'}"]) == 2
        assert "ONNX export needs jax2onnx and onnxruntime" in capsys.readouterr().err

    # corrupt model files (listed, with their sha256), a model.json without a key, a decompression bomb
    bad = tmp_path / "bad"
    bad.mkdir()
    png = str(tmp_path / "digit.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    meta = {"class_names": [str(i) for i in range(10)], "input": {"shape": ["batch", 8, 8, 1]},
            "eval_transform": {"resize_ratio": 1.0, "interpolation": "nearest"},
            "files": {"onnx": "model.onnx", "stablehlo": "model.stablehlo"},
            "sha256": {n: hashlib.sha256(b"").hexdigest() for n in ("model.onnx", "model.stablehlo")}}
    (bad / "model.onnx").write_bytes(b"")
    (bad / "model.stablehlo").write_bytes(b"")
    (bad / "model.json").write_text(json.dumps(meta))
    for argv, message in (([f"--model={bad / 'model.onnx'}", png],
                           "model.onnx: onnxruntime cannot load the ONNX model (InvalidArgument"),
                          ([f"--model={bad / 'model.stablehlo'}", png], "not a serialized jax.export.Exported")):
        assert predict.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    del meta["class_names"]
    (bad / "model.json").write_text(json.dumps(meta))
    assert predict.main([f"--model={bad / 'model.onnx'}", png]) == 2
    err = capsys.readouterr().err
    assert "not a model.json written by python -m mgd_jax.export (KeyError: 'class_names')" in err
    assert err.count("\n") == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8 x 8 > 2 x 10: PIL's DecompressionBombError
    assert predict.main([f"--workdir={work}", "--stage=teacher", png]) == 2
    err = capsys.readouterr().err
    assert "digit.png: cannot read it as an image (DecompressionBombError" in err and err.count("\n") == 1
    monkeypatch.undo()

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "photo.png").write_bytes(b"not a png")
    for argv, message in (([f"--model={tmp_path / 'model.onnx'}", "x.png"], "model.json is missing"),
                          ([f"--workdir={work}", "--stage=teacher", str(tmp_path / "photo.png")],
                           "photo.png: cannot read it as an image"),
                          ([str(tmp_path / "photo.png")], "give either --model=FILE or --workdir=DIR --stage=STAGE")):
        assert predict.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_image_folders_names_and_evaluation_transform(tmp_path):
    """An image folder's class names are its sorted folder names, and an image file becomes exactly the input the
    run's evaluation read of it gave (short side resized to 256/224 of the input size, centre crop)."""
    import ml_collections
    from PIL import Image

    from mgd_jax.data.streaming import load_image_folder

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, name in enumerate(("dogs", "cats", "birds")):
            (tmp_path / split / name).mkdir(parents=True)
            pixels = rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / name / "a.jpg", quality=90)
    folder = ml_collections.ConfigDict({"name": "image_folder", "dir": str(tmp_path), "image_size": 16})
    assert ex.class_names(folder, 4) == ["birds", "cats", "dogs", "3"]
    assert ex.class_names(ml_collections.ConfigDict({"name": "digits"}), 10) == [str(i) for i in range(10)]
    ratio = ex.eval_resize(folder)["resize_ratio"]
    assert ratio == pytest.approx(256 / 224)
    data = load_image_folder(folder)
    for row, name in enumerate(("birds", "cats", "dogs")):
        np.testing.assert_array_equal(ex.load_image(str(tmp_path / "val" / name / "a.jpg"), (16, 16, 3), ratio),
                                      data.test_images[row])
    data.close()


def test_an_in_memory_datasets_evaluation_transform_is_its_own_resize(tmp_path):
    """An image file of an in-memory dataset becomes exactly the run's evaluation input, resized as the data
    pipeline resized it at load: the digits (quickstart, 16x16) nearest-neighbour from their 8x8 pixels, a tfds
    dataset (STL-10's 96x96 at 32) by sources.resize_images; an image of another shape is centre-cropped first."""
    import ml_collections
    from PIL import Image

    from configs import quickstart
    from mgd_jax.data.sources import load_digits, resize_images

    data = quickstart.get_config().data
    transform = ex.eval_resize(data)
    assert transform == {"resize_ratio": 1.0, "crop": "center", "interpolation": "nearest"}
    raw, run = load_digits(8, data.test_size, data.split_seed), load_digits(data.image_size, data.test_size,
                                                                           data.split_seed)
    for i in range(0, len(raw.test_images), 45):
        path = str(tmp_path / f"digit_{i}.png")
        Image.fromarray(raw.test_images[i][..., 0]).save(path)
        got = ex.load_image(path, run.image_shape, transform["resize_ratio"], transform["interpolation"])
        np.testing.assert_array_equal(got, run.test_images[i])

    stl = ml_collections.ConfigDict({"name": "stl10", "image_size": 32})
    transform = ex.eval_resize(stl)
    assert transform["interpolation"] == ex.IN_MEMORY
    pixels = np.random.default_rng(0).integers(0, 256, (96, 110, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    got = ex.load_image(str(tmp_path / "wide.png"), (32, 32, 3), transform["resize_ratio"], transform["interpolation"])
    np.testing.assert_array_equal(got, resize_images(pixels[None, :, 7:103], 32)[0])
