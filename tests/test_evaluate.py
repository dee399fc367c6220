"""Evaluation of stage checkpoints: accuracy / NLL / ECE against numpy, on a real smoke workdir."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from mgd_jax import pipeline
from mgd_jax.evaluate import EvaluationError, calibration_sums, evaluate_stage, main, summarize


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


def test_evaluate_every_stage_of_a_workdir(tmp_path):
    work = str(tmp_path / "w")
    summary = pipeline.train_and_evaluate(smoke.get_config(), work, devices=jax.devices()[:1])
    student = evaluate_stage(work, "students/mas_kd")
    row = summary["rows"][-1]
    assert student["model"]["top1"] == pytest.approx(row["best_acc1"])  # the best checkpoint's test top-1
    assert 0 <= student["model"]["ece"] <= 1
    an = evaluate_stage(work, "analyzer")
    assert set(an) >= {"teacher", "decoder/16d_T2", "decoder/32d_T8"}
    assert an["decoder/16d_T2"]["top1"] == pytest.approx(summary["rows"][1]["best_acc1"])
    assert json.load(open(os.path.join(work, "analyzer", "eval_test.json")))["examples"] == 100
    assert main([f"--workdir={work}", "--stage=teacher", "--split=train"]) == 0
    with pytest.raises(EvaluationError, match="students/nope/checkpoints/best does not exist"):
        evaluate_stage(work, "students/nope")
