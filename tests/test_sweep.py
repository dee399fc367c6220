"""The sweep command: methods x modes x pairs x seeds, resumable, table with the paper's numbers, plots."""
import json
import os

import jax

from conftest import ROOT
from mgd_jax import sweep as sweep_lib
from mgd_jax.paper_results import TOP1


def test_sweep_runs_resumes_and_tabulates(tmp_path, monkeypatch):
    root = str(tmp_path / "sweep")
    args = dict(config_path=str(ROOT / "configs" / "smoke.py"), pairs=[("resnet8", "resnet8")], methods=["kd"],
                modes=["none", "mas"], seeds=[0, 1], root=root, devices=jax.devices()[:1])
    res, md = sweep_lib.sweep(**args)
    assert set(res) == {("resnet8,resnet8", "kd", "none"), ("resnet8,resnet8", "kd", "mas")}
    assert all(len(v) == 2 for v in res.values())  # two seeds each
    assert "| kd | " in md and "| MAS+kd | " in md and "n=2" in md
    for f in ("results.md", "results.json", "curves.png", "gains.png"):
        assert os.path.getsize(os.path.join(root, f)) > 100
    # finished runs are not trained again
    from mgd_jax import pipeline
    original = pipeline.mesh_lib.shard_batch

    def no_training(rows, mesh):
        assert "mask" in rows, "a finished run was trained again"
        return original(rows, mesh)

    monkeypatch.setattr(pipeline.mesh_lib, "shard_batch", no_training)
    res2, md2 = sweep_lib.sweep(**args)
    assert md2 == md
    assert json.load(open(os.path.join(root, "results.json")))[0]["runs"][0]["seed"] == 0


def test_table_puts_the_paper_beside_ours():
    res = {("resnet56,resnet20", "kd", "mas"): [{"seed": 0, "best": 0.71, "last": 0.70, "curve": [0.7]},
                                                {"seed": 1, "best": 0.73, "last": 0.72, "curve": [0.72]}]}
    md = sweep_lib.table(res, [("resnet56", "resnet20")], ["kd"], ["mas"])
    assert f"72.00 ± 1.41 (last 71.00, n=2) / paper {TOP1[('kd', 'mas')]['resnet56,resnet20']:.2f}" in md
