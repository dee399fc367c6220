"""Evaluation of stage checkpoints: accuracy / NLL / ECE against numpy, on a real smoke workdir."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgd_jax.errors import AnalysisError
from mgd_jax.evaluate import calibration_sums, evaluate_stage, main, summarize


def test_calibration_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7)) * 3
    labels = rng.integers(0, 7, 50)
    mask = np.ones(50, np.float32)
    mask[-5:] = 0  # padding rows do not count
    got = summarize(jax.device_get(calibration_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                                    jnp.asarray(mask))), 45)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p, y = p[:45], labels[:45]
    conf, pred = p.max(1), p.argmax(1)
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(np.sum((pred == y)[bins == b]) - np.sum(conf[bins == b])) for b in range(15)) / 45
    np.testing.assert_allclose(got["ece"], ece, rtol=1e-5)
    np.testing.assert_allclose(got["top1"], np.mean(pred == y))
    np.testing.assert_allclose(got["nll"], -np.mean(np.log(p[np.arange(45), y])), rtol=1e-5)
    top5 = np.argsort(-p, 1)[:, :5]
    np.testing.assert_allclose(got["top5"], np.mean([y[i] in top5[i] for i in range(45)]))


def test_evaluate_every_stage_of_a_workdir(smoke_workdir):
    work, summary = smoke_workdir
    student = evaluate_stage(work, "students/mas_kd")
    row = summary["rows"][-1]
    assert student["model"]["top1"] == pytest.approx(row["best_acc1"])  # the best checkpoint's test top-1
    assert 0 <= student["model"]["ece"] <= 1
    an = evaluate_stage(work, "analyzer")
    assert set(an) >= {"teacher", "decoder/16d_T2", "decoder/32d_T8"}
    assert an["decoder/16d_T2"]["top1"] == pytest.approx(summary["rows"][1]["best_acc1"])
    assert json.load(open(os.path.join(work, "analyzer", "eval_test.json")))["examples"] == 100
    assert main([f"--workdir={work}", "--stage=teacher", "--split=train"]) == 0
    with pytest.raises(AnalysisError, match=r"--stage=students/nope does not exist in .*\(its stages: teacher, "
                                            r"analyzer"):
        evaluate_stage(work, "students/nope")


def test_tools_report_user_errors_in_one_line(smoke_workdir, tmp_path, capsys):
    """A wrong workdir or stage is one line on stderr and exit status 2 in every tool, not a stack trace."""
    work, _ = smoke_workdir
    capsys.readouterr()
    for tool, argv in [(main, [f"--workdir={tmp_path}", "--stage=teacher"]),
                       (main, [f"--workdir={work}", "--stage=students/nope"]),
                       (rob.main, [f"--workdir={work}", "--stages=analyzer"]),
                       (cka_lib.main, [f"--workdir={work}", "--stage=students/nope"])]:
        assert tool(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


# --- robustness and CKA ---------------------------------------------------------------------------------------
from mgd_jax.analysis import cka as cka_lib  # noqa: E402
from mgd_jax.analysis import robustness as rob  # noqa: E402


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.3 * rng.normal(size=(40, 7))
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    np.testing.assert_allclose(cka_lib.linear_cka(x, y), feature_form, rtol=1e-10)
    np.testing.assert_allclose(cka_lib.linear_cka(x, x), 1.0, rtol=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    np.testing.assert_allclose(cka_lib.linear_cka(x, 3.0 * x @ q + 1.0), 1.0, rtol=1e-10)  # rotation/scale/shift
    assert cka_lib.linear_cka(x, rng.normal(size=(40, 12))) < 0.6


def test_corruptions():
    key = jax.random.key(0)
    x = jax.random.uniform(key, (8, 16, 16, 3))
    for kind, sev in rob.CORRUPTIONS.items():
        np.testing.assert_array_equal(rob.corrupt(x, kind, 0.0, key), x)
    g = rob.corrupt(x, "gaussian_noise", 0.2, key)
    assert float(g.min()) >= 0 and float(g.max()) <= 1 and float(jnp.abs(g - x).mean()) > 0.05
    sp = rob.corrupt(x, "salt_pepper", 0.1, key)
    changed = np.mean(np.any(np.asarray(sp != x), axis=-1))
    assert 0.05 < changed < 0.15 and set(np.unique(np.asarray(sp)[np.asarray(sp != x)])) <= {0.0, 1.0}
    c = rob.corrupt(x, "contrast", 0.5, key)
    np.testing.assert_allclose(c.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(c.std(axis=(1, 2, 3)), 0.5 * x.std(axis=(1, 2, 3)), rtol=1e-4)


def test_robustness_and_cka_tools_on_a_workdir(smoke_workdir):
    work, _ = smoke_workdir
    clean = evaluate_stage(work, "students/mas_kd")["model"]["top1"]
    assert rob.main([f"--workdir={work}", "--stages=teacher,students/mas_kd"]) == 0
    res = json.load(open(os.path.join(work, "analysis", "robustness.json")))
    per = res["results"]["students/mas_kd"]
    assert set(per) == set(rob.CORRUPTIONS)
    for kind in per:  # severity 0 is the clean test accuracy of the best checkpoint
        assert per[kind]["top1"][0] == pytest.approx(clean)
    assert os.path.getsize(os.path.join(work, "analysis", "robustness.png")) > 1000
    assert cka_lib.main([f"--workdir={work}", "--student=students/mas_kd", "--examples=64"]) == 0  # --student = --stage
    c = json.load(open(os.path.join(work, "analysis", "cka_students_mas_kd.json")))
    m = np.asarray(c["cka"])
    assert m.shape == (5, 5) and np.all((m >= -1e-9) & (m <= 1 + 1e-9))
    assert os.path.getsize(os.path.join(work, "analysis", "cka_students_mas_kd.png")) > 1000
    # each image's corruption is a function of (seed, its index): the numbers do not depend on the batch size
    small = rob.robustness(work, ["students/mas_kd"], {"gaussian_noise": (0.3,), "salt_pepper": (0.1,)},
                           batch_size=48)["results"]["students/mas_kd"]
    assert small["gaussian_noise"]["top1"] == per["gaussian_noise"]["top1"][4:5]
    assert small["salt_pepper"]["top1"] == per["salt_pepper"]["top1"][3:4]


def test_a_typo_is_never_pointed_at_a_stage_the_tool_refuses(tmp_path):
    """cka refuses the teacher: a mistyped --stage is not suggested as it, even where the workdir holds no student
    (the stages listed are the others)."""
    from mgd_jax.analysis.common import check_stage

    for stage in ("teacher", "analyzer"):
        (tmp_path / stage / "checkpoints").mkdir(parents=True)
    refuse = {"teacher": "CKA compares a student with the teacher"}
    with pytest.raises(AnalysisError) as e:
        check_stage(str(tmp_path), "teachr", refuse=refuse)
    assert "did you mean" not in str(e.value) and "(its stages: analyzer)" in str(e.value), str(e.value)
    with pytest.raises(AnalysisError, match="^--stage=teacher/: CKA compares"):
        check_stage(str(tmp_path), "teacher/", refuse=refuse)
    with pytest.raises(AnalysisError, match="did you mean --stage=teacher"):  # a tool that takes it suggests it
        check_stage(str(tmp_path), "teachr")
