"""configs/imagenet.py from an image folder on 2 processes x 1 CPU device (127.0.0.1) == 1 process x 2 devices, bitwise:
every stage, each process decoding only its own rows of every training and evaluation batch.  The data path is the
ImageNet config's (streamed folder, RandomResizedCrop, resize + centre crop); the models are CIFAR resnet8s at
16 x 16 to keep the test short (the steps are the same code for every model; the ImageNet models' steps are traced
in every mode, and run once, in tests/test_imagenet_methods.py)."""
import re
import subprocess
import sys

import chex
import numpy as np
import pytest

from conftest import ROOT
from tests.test_imagenet_data import _write_folder
from tests.test_multihost import _env, _final, _free_port

STAGES = ["teacher", "analyzer", "students/kd_mas"]
READS = re.compile(r"data: process (\d)/(\d) read (\d+) training and (\d+) evaluation images")


def _cmd(folder, workdir):
    tiny = [f"--config.{s}.{k}={v}" for s in ("teacher", "analyzer", "student")
            for k, v in (("epochs", 1), ("batch_size", 8), ("optimizer.lr", 0.01), ("optimizer.milestones", "()"))]
    return [sys.executable, "train.py", "--config=configs/imagenet.py:resnet18,resnet18,kd,mas", f"--workdir={workdir}",
            f"--config.data.dir={folder}", "--config.data.image_size=16", "--config.data.workers=2",
            "--config.precision=float32", "--config.progress=False", "--config.eval_batch_size=12",
            "--config.checkpoint.every_steps=2", "--config.teacher.arch=resnet8", "--config.student.arch=resnet8",
            "--config.granularities=((16, 2.0), (32, 8.0))", *tiny]


@pytest.mark.timeout(600)  # three child runs of up to 180 s each: they fail on their own deadlines first
def test_imagenet_folder_on_two_processes_equals_one_process_with_two_devices(tmp_path):
    folder = _write_folder(str(tmp_path / "images"), np.random.default_rng(0), per_class=8, val_per_class=4)
    one = str(tmp_path / "one")
    done = subprocess.run(_cmd(folder, one), cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mesh: 2 x cpu" in done.stdout
    two = str(tmp_path / "two")
    port = _free_port()
    procs = [subprocess.Popen(_cmd(folder, two) + ["--config.distributed.timeout_seconds=120"], cwd=ROOT,
                              env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert "mesh: 2 x cpu" in outs[0]

    ref = _final(one, like=None, stages=STAGES)
    chex.assert_trees_all_equal(ref, _final(two, like=ref, stages=STAGES))

    (single,) = [m.groups() for m in READS.finditer(done.stdout)]
    per_process = sorted(m.groups() for o in outs for m in READS.finditer(o))
    assert [p[:2] for p in per_process] == [("0", "2"), ("1", "2")], outs
    # training: 28 images, 3 batches of 8 per pass (the rest dropped), 4 passes (teacher, the analyzer's two
    # granularities, the student); each process decodes its half of every batch, plus the images every process
    # reads to initialise the models (2 teacher, 1 analyzer, 2 student).  Evaluation: the 12 test images after each
    # of the 3 stages, half of each batch per process.
    rows, init, evals = 4 * 3 * 8, 2 + 1 + 2, 3 * 12
    assert (int(single[2]), int(single[3])) == (rows + init, evals), done.stdout
    assert [(int(p[2]), int(p[3])) for p in per_process] == [(rows // 2 + init, evals // 2)] * 2, outs
