"""The package's layering (issue #12): the loop knows no stage, errors are a leaf, the package needs no configs/."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "mgd_jax")


def _imports(path):
    """Every module a file imports (top level and inside functions), absolute names."""
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _files(sub=""):
    for d, _, names in os.walk(os.path.join(PKG, sub)):
        for n in names:
            if n.endswith(".py"):
                yield os.path.join(d, n)


def test_errors_is_a_leaf():
    assert not {m for m in _imports(os.path.join(PKG, "errors.py")) if m.startswith("mgd_jax")}


@pytest.mark.parametrize("forbidden", ["mgd_jax.stages", "mgd_jax.methods", "mgd_jax.models", "mgd_jax.pipeline",
                                       "mgd_jax.config_validation", "configs"])
def test_train_imports_no_stage_method_model_or_config(forbidden):
    bad = {os.path.relpath(f, ROOT): sorted(m for m in _imports(f) if m == forbidden or m.startswith(forbidden + "."))
           for f in _files("train")}
    assert not {f: m for f, m in bad.items() if m}


def test_nothing_in_the_package_imports_configs():
    bad = {os.path.relpath(f, ROOT) for f in _files() if any(m == "configs" or m.startswith("configs.")
                                                              for m in _imports(f))}
    assert not bad
    for f in _files():
        assert "sys.path" not in open(f).read(), f"{f} edits sys.path"


def test_importing_the_loop_loads_no_stage_or_method():
    code = ("import sys, mgd_jax.errors, mgd_jax.train.loop, mgd_jax.train.distributed, mgd_jax.train.cpu\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('mgd_jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=True).stdout.split()
    assert "mgd_jax.train.loop" in out
    assert not [m for m in out if not m.startswith(("mgd_jax.train", "mgd_jax.errors")) and m != "mgd_jax"]


def test_a_checkpoint_laid_out_differently_is_one_clear_error(tmp_path):
    """A latest checkpoint whose tree differs from the state this version trains (an older version's student
    state kept its method state inside batch_stats) is refused by name, not with orbax's tree diff."""
    import numpy as np

    from mgd_jax.errors import StageMismatchError
    from mgd_jax.train.checkpoint import StageCheckpoints

    ck = StageCheckpoints(str(tmp_path / "checkpoints"))
    try:
        ck.save_latest(3, {"params": {"w": np.ones(2)}, "batch_stats": {"method": {"m": np.zeros(1)}}}, {"epoch": 1})
        with pytest.raises(StageMismatchError, match=r"latest/3: the checkpoint's variables are laid out differently"):
            ck.restore_latest({"params": {"w": np.ones(2)}, "batch_stats": {}, "method_state": {"m": np.zeros(1)}})
    finally:
        ck.close()


def test_checkpoints_of_the_earlier_layout_resume():
    """A checkpoint written before TrainState had ``method_state`` / ``frozen`` (method state in
    batch_stats['method'], the init stage's frozen modules in batch_stats['fixed']) restores into today's state."""
    import tempfile
    from typing import Any

    import chex
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mgd_jax.stages.common import TrainState, legacy_layout
    from mgd_jax.train.checkpoint import StageCheckpoints

    @flax.struct.dataclass
    class OldTrainState:  # the 4 fields of commit 19591dd
        step: Any
        params: Any
        batch_stats: Any
        opt_state: Any

    tx = optax.sgd(0.1, momentum=0.9)
    params = {"backbone": {"w": jnp.arange(3.0)}, "init": {"v": jnp.ones(2)}}
    bs = {"backbone": {"bn": {"mean": jnp.full(4, 0.5)}}}
    method = {"memory_v1": jnp.arange(6.0).reshape(2, 3)}
    frozen = {"non_feature": {"fc": {"kernel": jnp.ones((2, 2))}}, "features": {"conv": {"kernel": jnp.zeros(5)}}}
    opt = jax.tree.map(lambda x: x + 1, tx.init(params))
    cases = {  # name: (old checkpoint, the state today's code trains)
        "teacher": (OldTrainState(jnp.int32(7), params, bs, opt), TrainState(jnp.int32(7), params, bs, opt)),
        "student": (OldTrainState(jnp.int32(7), params, {**bs, "method": method}, opt),
                    TrainState(jnp.int32(7), params, bs, opt, method)),
        "init stage": (OldTrainState(jnp.int32(7), params, {**bs, "method": method,
                                                            "fixed": {"frozen": frozen["non_feature"],
                                                                      "features": frozen["features"]}}, opt),
                       TrainState(jnp.int32(7), params, bs, opt, method, frozen)),
        "analyzer": ({"a": OldTrainState(jnp.int32(7), params, {}, opt)}, {"a": TrainState(jnp.int32(7), params, {}, opt)}),
    }
    for name, (old, new) in cases.items():
        with tempfile.TemporaryDirectory() as d:
            ck = StageCheckpoints(d)
            try:
                ck.save_latest(1, old, {"epoch": 1})
                like = jax.tree.map(jnp.zeros_like, new)
                got, _ = ck.restore_latest(jax.device_get(like), legacy_layout)
            finally:
                ck.close()
        assert jax.tree.structure(got) == jax.tree.structure(new), name
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, new))
