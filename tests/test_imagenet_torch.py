"""ImageNet models against PyTorch: torchvision's ResNet-18 / 34 / 50 (their real modules and outputs) and the
benchmark's MobileNet(V1) written in torch from its reference structure; import (torch -> ours), export (ours ->
a state_dict torch loads with strict=True), the command lines and their one-line refusals.

A test that needs torch or torchvision skips where it is not installed, and fails where MGD_JAX_REQUIRE names the
package (CI installs both and sets it: tests/_requires.py)."""
import copy
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.export_torch import main as export_main
from mgd_jax.export_torch import to_state_dict
from mgd_jax.import_torch import CheckpointImportError, convert_backbone, torchvision_models
from mgd_jax.import_torch import main as import_main
from mgd_jax.models import get_model
from _requires import need

# |ours - torch| <= 1e-4 + 1e-4 |torch| per element (the "within 1e-4").  The networks are random but
# well-conditioned: each residual branch's last BN has a small weight (0.1 .. 0.3; torchvision's
# zero_init_residual takes it to 0), so float32 noise is not amplified through 16 blocks: torch float32 itself is
# within 2.2e-5 of torch float64 on every output here.  With all BN weights in 0.5 .. 1.5, torch float32 is 1e-3
# off its own float64 result on ResNet-50's last stage, and no float32 port can be checked at 1e-4.
# Measured (ours vs torchvision float32), largest |diff| / (1 + |torchvision|): 1.8e-5 on features (ResNet-50's
# last stage at 224), 1.7e-6 on logits.  Any mapping error (a transposed kernel, scale and bias or mean and
# variance swapped, a stride on the wrong conv) is O(1).
TOL = dict(atol=1e-4, rtol=1e-4)
# MobileNet (no residual path, 27 conv / BN layers) is less well conditioned: torch float32 is 1.1e-4 off torch
# float64 on its last stage; ours is as close to float64 as torch float32 is, and 1.4e-4 from torch float32.
TOL_MOBILENET = dict(atol=3e-4, rtol=3e-4)


@pytest.fixture(scope="module")
def torch():
    """torch (tests/_requires.py), with one intra-op thread for this module's tests: its threads spin against
    XLA's and the other test worker on a 2-core machine (a ResNet-34 forward took 3.2 s with 2 threads, 0.3 s with
    1)."""
    torch = need("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tvm(torch):
    """torchvision's models (``import_torch.torchvision_models``, as the command line imports them)."""
    return need("torchvision", torchvision_models)


def _assert_state_dict_like(ours, theirs):
    """Key for key in the same order, each entry of the same shape and dtype (``ours``: numpy arrays or tensors)."""
    assert list(ours) == list(theirs)  # the reference's keys in the reference's order
    for k, t in theirs.items():
        a = ours[k].numpy() if hasattr(ours[k], "numpy") else ours[k]
        assert (tuple(a.shape), a.dtype) == (tuple(t.shape), t.numpy().dtype), k


def _nhwc(t):
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def _calibrate(model, size=64):
    """Random BN affine parameters and running statistics of one train-mode pass (cumulative average): a
    BN-calibrated network whose every BatchNorm entry differs from its default."""
    import torch

    g = torch.Generator().manual_seed(1)
    residual_last = "bn3" if hasattr(model.layer1[0], "bn3") else "bn2"  # Bottleneck / BasicBlock
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                small = name.startswith("layer") and name.endswith(residual_last)
                mod.weight.uniform_(*((0.1, 0.3) if small else (0.5, 1.5)), generator=g)
                mod.bias.normal_(0.0, 0.2, generator=g)
                mod.momentum = None
        model.train()
        model(torch.randn(8, 3, size, size, generator=g))
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = 0.1
    return model.eval()


def _torchvision_outputs(model, x):
    """torchvision's logits (its own forward) and the feature list read off its modules: stem (after ReLU, before
    the max-pool), each stage's output, its last block's sum before the final ReLU (a pre-hook on that block's
    ReLU module, whose last call in the block is on the sum), the pooled vector."""
    import torch

    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        h = model.maxpool(stem)
        feats, pre = [stem], [stem]
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            seen = []
            hook = layer[-1].relu.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
            h = layer(h)
            hook.remove()
            feats.append(h)
            pre.append(seen[-1])
        pooled = torch.flatten(model.avgpool(h), 1)
        logits = model(x)
        np.testing.assert_allclose(model.fc(pooled).numpy(), logits.numpy(), rtol=1e-6, atol=1e-6)
    return logits, feats + [pooled], pre + [pooled]


def _random_statistics(variables, seed):
    """Our variables with BN running statistics other than their init (mean ~ N(0, 0.1), var ~ U(0.5, 2))."""
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: (rng.normal(0, 0.1, a.shape) if path[-1].key == "mean" else rng.uniform(0.5, 2.0, a.shape)
                         ).astype(np.float32), variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def _check_outputs(model, variables, torch_out, x, preact=True, tol=TOL):
    # jitted: one compilation of the whole network costs less than eager mode's one per operation and shape
    (logits, feats), (_, pre) = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, preact=True) if preact
                                                      else (None, None)))(variables, jnp.asarray(_nhwc(x)))
    t_logits, t_feats, t_pre = torch_out
    np.testing.assert_allclose(logits, _nhwc(t_logits), **tol)
    assert len(feats) == len(t_feats)
    for ours, theirs in zip(feats, t_feats):
        np.testing.assert_allclose(ours, _nhwc(theirs), **tol)
    if preact:
        assert len(pre) == len(t_pre)
        for ours, theirs in zip(pre, t_pre):
            np.testing.assert_allclose(ours, _nhwc(theirs), **tol)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_torchvision_resnet_imports_with_its_outputs(depth, torch, tvm):
    """Parameter count; a random, BN-calibrated torchvision ResNet imported gives its eval-mode logits and
    features (plain and preact) at 224 and at 64, and its train-mode logits and running-statistics update; its
    state_dict exported back is torchvision's, key for key."""
    tv = _calibrate(getattr(tvm, f"resnet{depth}")())
    arch = f"resnet{depth}_imagenet"
    model = get_model(arch, 1000)
    n_torch = sum(p.numel() for p in tv.parameters())
    assert n_torch == {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}[depth]
    sd = tv.state_dict()
    v = convert_backbone(arch, sd, 1000)
    assert sum(a.size for a in jax.tree.leaves(v["params"])) == n_torch
    for size in (224, 64):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        _check_outputs(model, v, _torchvision_outputs(tv, x), x)
    # train mode (batch statistics, running statistics updated with momentum 0.1 and the unbiased variance)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    trained = copy.deepcopy(tv).train()
    with torch.no_grad():
        t_logits = trained(x)
    logits, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, jnp.asarray(_nhwc(x)))
    np.testing.assert_allclose(logits[0], t_logits.numpy(), **TOL)
    after = convert_backbone(arch, trained.state_dict(), 1000)["batch_stats"]
    jax.tree.map(lambda ours, theirs: np.testing.assert_allclose(ours, theirs, **TOL), upd["batch_stats"], after)

    back = to_state_dict(arch, v)
    _assert_state_dict_like(back, sd)
    for k, t in sd.items():
        if not k.endswith("num_batches_tracked"):  # ours is 0 (we do not count batches), theirs 1 here
            np.testing.assert_array_equal(back[k], t.numpy(), err_msg=k)


# --- MobileNet(V1): not in torchvision; the reference's structure in torch -------------------------------------
def ReferenceMobileNetV1(num_classes=1000):  # noqa: N802 (the class below, defined once torch is there)
    return _reference_mobilenet_class()(num_classes)


@functools.cache
def _reference_mobilenet_class():
    import torch

    class ReferenceMobileNetV1(torch.nn.Module):
        """The ImageNet benchmark's MobileNet (mdistiller models/imagenet/mobilenetv1.py), written here from its
        structure: ``model`` = conv_bn(3, 32, 2), 13 conv_dw blocks, AvgPool2d(7); ``fc``.  ``stage_outputs`` are
        the reference's four features (blocks 3, 5, 11, 13) before and after their last ReLU."""

        BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)) + \
            ((512, 512, 1),) * 5 + ((512, 1024, 2), (1024, 1024, 1))

        def __init__(self, num_classes=1000):
            super().__init__()
            nn = torch.nn
            layers = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())]
            for cin, cout, s in self.BLOCKS:
                layers.append(nn.Sequential(nn.Conv2d(cin, cin, 3, s, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                            nn.ReLU(), nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout),
                                            nn.ReLU()))
            layers.append(nn.AvgPool2d(7))
            self.model = nn.Sequential(*layers)
            self.fc = nn.Linear(1024, num_classes)

        def forward(self, x):
            return self.fc(self.model(x).reshape(-1, 1024))

        def features(self, x):
            feats, pre = [], []
            for i, block in enumerate(self.model[:14]):
                if i in (3, 5, 11, 13):
                    pre.append(block[:-1](x))  # the block without its last ReLU
                x = block(x)
                if i in (0, 3, 5, 11, 13):
                    feats.append(x)
                if i == 0:
                    pre.append(x)
            pooled = self.model[14](x).reshape(-1, 1024)
            return feats + [pooled], pre + [pooled]

    return ReferenceMobileNetV1


def test_mobilenetv1_imports_and_exports_with_the_reference(tmp_path, torch):
    ref = ReferenceMobileNetV1()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0.0, 0.2, generator=g)
                mod.momentum = None
        ref.train()(torch.randn(4, 3, 224, 224, generator=g))
    ref.eval()
    assert sum(p.numel() for p in ref.parameters()) == 4_231_976
    v = convert_backbone("mobilenetv1_imagenet", ref.state_dict(), 1000)
    model = get_model("mobilenetv1_imagenet", 1000)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # AvgPool2d(7) needs 193..224
    with torch.no_grad():
        feats, pre = ref.features(x)
        logits = ref(x)
    _check_outputs(model, v, (logits, feats, pre), x, tol=TOL_MOBILENET)
    sd = to_state_dict("mobilenetv1_imagenet", v)
    _assert_state_dict_like(sd, ref.state_dict())
    fresh = ReferenceMobileNetV1()
    fresh.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in sd.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh.eval()(x).numpy(), logits.numpy(), rtol=1e-6, atol=1e-6)


def test_initialisation_is_torchvisions(tvm):
    """Our init against a freshly built torchvision ResNet-50 (its ``layer3.0``: every conv shape of a
    Bottleneck with a downsample, kaiming-normal fan_out): kernel statistics per layer, BN 1 / 0.  One block,
    not the whole network: initialising 25 M parameters compiles one sampler per kernel shape (seconds each).
    The classifier is ``layers.Linear`` (PyTorch's default, tests/test_models.py)."""
    from mgd_jax.models.resnet_imagenet import Bottleneck

    ours = Bottleneck(256, 2).init(jax.random.key(0), jnp.zeros((1, 4, 4, 512)), False)["params"]
    theirs = tvm.resnet50().layer3[0]
    for name in ("conv1", "conv2", "conv3", "downsample_0"):
        k = np.asarray(ours[name]["kernel"])
        t = theirs.get_submodule(name.replace("_", ".")).weight.detach().numpy()
        assert k.shape == t.transpose(2, 3, 1, 0).shape, name
        assert abs(k.std() / t.std() - 1) < 0.02 and abs(k.mean()) < 0.02 * k.std(), name
        assert abs(np.abs(k).max() / np.abs(t).max() - 1) < 0.3, name  # both untruncated normals
    for name in ("bn1", "bn2", "bn3", "downsample_1"):
        assert np.all(np.asarray(ours[name]["scale"]) == 1) and np.all(np.asarray(ours[name]["bias"]) == 0)


def test_mobilenetv1_initialisation_is_pytorchs_default(torch):
    """The reference MobileNet sets no init: PyTorch's defaults, U(+-1/sqrt(fan_in)) for every conv (fan_in 9 for a
    depthwise one) and the Linear, BN 1 / 0; our init against the torch model's, layer by layer ("rbg" keys: the
    whole network's init compiles in 2 s instead of 3.4)."""
    ours = jax.jit(get_model("mobilenetv1_imagenet", 1000).init)(jax.random.key(0, impl="rbg"),
                                                                  jnp.zeros((1, 32, 32, 3)))["params"]
    ref = ReferenceMobileNetV1()
    for name in ("model_0_0", "model_1_0", "model_1_3", "model_13_0", "model_13_3", "fc"):
        k = np.asarray(ours[name]["kernel"])
        t = ref.get_submodule(name.replace("_", ".")).weight.detach().numpy()
        bound = 1 / np.sqrt(np.prod(t.shape[1:]))  # fan_in of the torch weight (out, in / groups, kh, kw)
        assert k.size == t.size and 0.95 * bound < np.abs(k).max() <= bound and np.abs(t).max() <= bound, name
        assert abs(k.std() / t.std() - 1) < 0.1, name
    for name in ("model_0_1", "model_13_4"):
        assert np.all(np.asarray(ours[name]["scale"]) == 1) and np.all(np.asarray(ours[name]["bias"]) == 0)


# --- command lines ---------------------------------------------------------------------------------------------
def _save_student(workdir, name, arch, variables):
    """A student stage's best checkpoint as the student stage writes it (stages.student.export_variables: the
    backbone beside the encoders and the method's modules)."""
    from mgd_jax.stages.student import export_variables
    from mgd_jax.train.checkpoint import StageCheckpoints

    state = types.SimpleNamespace(
        params={"backbone": variables["params"], "analyzer": {"w": jnp.ones((3,))}, "method": {"w": jnp.ones((2,))}},
        batch_stats={"backbone": variables["batch_stats"]}, method_state={"memory": jnp.zeros((4, 2))})
    ck = StageCheckpoints(str(workdir / "students" / name / "checkpoints"))
    ck.save_best(3, export_variables(state), {"stage": "student", "arch": arch, "epoch": 3})
    ck.close()


def test_cli_teacher_round_trip_and_student_export(tmp_path, capsys, torch, tvm):
    """import_torch --arch=resnet18_imagenet (a bare torchvision state_dict, 1000 classes by default), then
    export_torch of that teacher gives torchvision's state_dict back; a student's best checkpoint exports to a
    file torchvision loads strictly, with our logits.  Bad inputs: one line, exit status 2."""
    tv = _calibrate(tvm.resnet18())
    sd = tv.state_dict()
    torch.save(sd, tmp_path / "resnet18.pth")
    work = tmp_path / "w"
    assert import_main(["--arch=resnet18_imagenet", f"--teacher={tmp_path / 'resnet18.pth'}", f"--workdir={work}"]) == 0
    # an imported teacher's best checkpoint says so at the top level, as the stage-identity check reads it
    from mgd_jax.train.checkpoint import StageCheckpoints
    assert StageCheckpoints(str(work / "teacher" / "checkpoints")).best_meta()["imported"] is True
    assert export_main([f"--workdir={work}", "--stage=teacher", f"--out={tmp_path / 't.pth'}"]) == 0
    back = torch.load(tmp_path / "t.pth", weights_only=True)
    _assert_state_dict_like(back, sd)
    for k in sd:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(back[k], sd[k]), k

    model = get_model("resnet18_imagenet", 5)
    x = jax.random.normal(jax.random.key(2), (2, 96, 96, 3))  # 96: the stride-2 stages round 3x3 maps up
    # a student's variables (initialising ours would compile a sampler per kernel shape: seconds each)
    v = _random_statistics(convert_backbone("resnet18_imagenet", tvm.resnet18(num_classes=5).state_dict(), 5),
                           seed=4)
    _save_student(work, "kd_mas", "resnet18_imagenet", v)
    out = tmp_path / "student.pth"
    assert export_main([f"--workdir={work}", "--stage=students/kd_mas", f"--out={out}"]) == 0
    student = tvm.resnet18(num_classes=5)
    student.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        t_logits = student.eval()(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(jax.jit(model.apply)(v, x)[0], t_logits.numpy(), **TOL)
    capsys.readouterr()

    cifar = get_model("resnet8", 10)
    _save_student(work, "cifar", "resnet8", jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: cifar.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))))
    bad = [
        ([f"--workdir={work}", "--stage=students/cifar", f"--out={tmp_path / 'c.pth'}"],
         "architecture 'resnet8' (a CIFAR model) has no PyTorch export; exportable: resnet18_imagenet"),
        ([f"--workdir={work}", "--stage=students/nope", f"--out={tmp_path / 'c.pth'}"], "does not exist"),
        ([f"--workdir={work}", "--stage=analyzer", f"--out={tmp_path / 'c.pth'}"], "has no backbone to export"),
        ([f"--workdir={work}", "--stage=teacher", f"--out={tmp_path / 'no' / 'c.pth'}"], "does not exist"),
        ([f"--workdir={work}", "--stage=students/kd_mas/init", f"--out={tmp_path / 'c.pth'}"],
         "has no backbone to export"),
    ]
    for argv, message in bad:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c.pth").exists()

    for argv, message in [
        (["--arch=resnet34", f"--teacher={tmp_path / 'resnet18.pth'}", f"--workdir={tmp_path / 'w2'}"],
         "torchvision's resnet34 is resnet34_imagenet here"),
        (["--arch=resnet34_imagenet", f"--teacher={tmp_path / 'resnet18.pth'}", f"--workdir={tmp_path / 'w2'}"],
         "nothing in the checkpoint for "),
        (["--arch=resnet18_imagenet", "--num_classes=10", f"--teacher={tmp_path / 'resnet18.pth'}",
          f"--workdir={tmp_path / 'w2'}"], r"key 'fc.weight' has shape (512, 1000) (flax layout) but this "
                                           r"architecture needs (512, 10) (a 1000-class classifier: pass "
                                           r"--num_classes=1000)"),
    ]:
        assert import_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_resnet50_checkpoint_as_another_architecture_names_the_key(tvm):
    sd = tvm.resnet50().state_dict()
    with pytest.raises(CheckpointImportError, match=r"key 'layer1.0.conv1.weight' has shape \(1, 1, 64, 64\) \(flax "
                                                    r"layout\) but this architecture needs \(3, 3, 64, 64\)"):
        convert_backbone("resnet34_imagenet", sd, 1000)
    with pytest.raises(CheckpointImportError, match=r"key 'conv1.weight' has no place in this architecture"):
        convert_backbone("mobilenetv1_imagenet", sd, 1000)
    with pytest.raises(CheckpointImportError, match=r"\(a 7x7 ImageNet stem: torchvision's ResNets are "
                                                    r"resnet18_imagenet, resnet34_imagenet, resnet50_imagenet\)"):
        convert_backbone("ResNet50", sd, 1000)  # the CIFAR zoo's ResNet50


def test_torchvision_models_helper_healthy_and_cuda_linked(tmp_path):
    """``torchvision_models()`` on two stand-in packages (a fresh interpreter each): a healthy torchvision is
    imported as it is; one whose operator registration fails as PyPI's CUDA build does beside the CPU torch is
    imported again with ``_meta_registrations`` stubbed, and its models are there."""
    import os
    import subprocess
    import sys

    for kind, broken in (("healthy", False), ("cuda_linked", True)):
        pkg = tmp_path / kind / "torchvision"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("from torchvision import _meta_registrations, models\n")
        (pkg / "_meta_registrations.py").write_text(
            "raise RuntimeError('operator torchvision::nms does not exist')\n" if broken else "REAL = True\n")
        (pkg / "models.py").write_text("def resnet18():\n    return 'resnet18'\n")
        code = ("import sys; from mgd_jax.import_torch import torchvision_models; m = torchvision_models(); "
                "print(m.resnet18(), hasattr(sys.modules['torchvision._meta_registrations'], 'REAL'))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / kind)})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["resnet18", str(not broken)], r.stdout
