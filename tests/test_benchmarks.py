"""The GPU check's pieces (benchmarks/gpu_check.sh), cheaply on CPU: the synthetic in-memory dataset that its
end-to-end part trains on, the device-plane summary of the profiler, the HLO counts of the per-depth teacher
table, the results file -> README table script; and (slow) the whole script's dry run, each part's rows."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from _requires import need
from ml_collections import ConfigDict

from mgd_jax.config_validation import validate_config
from mgd_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_cifar_has_cifar100_shapes_is_deterministic_and_limits_are_prefixes():
    ds = sources.load_dataset(ConfigDict(dict(name="synthetic_cifar", train_limit=64, test_limit=16)))
    assert ds.train_images.shape == (64, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (16, 32, 32, 3) and ds.test_labels.shape == (16,)
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == 100
    assert 0 <= ds.train_labels.min() and ds.train_labels.max() < 100
    assert len(np.unique(ds.train_images)) > 200  # random pixels, not a constant image
    again = sources.load_synthetic("synthetic_cifar", 64, 16)
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)
    small = sources.load_synthetic("synthetic_cifar", 8, 4)  # a limit: the first images of the larger set
    np.testing.assert_array_equal(small.train_images, ds.train_images[:8])
    np.testing.assert_array_equal(small.train_labels, ds.train_labels[:8])
    np.testing.assert_array_equal(small.test_images, ds.test_images[:4])
    assert not np.array_equal(ds.train_images[:16], ds.test_images)  # the splits differ


def test_synthetic_cifar_full_size_and_config_name():
    full = sources.load_synthetic("synthetic_cifar")
    assert full.train_images.shape == (50_000, 32, 32, 3) and full.test_images.shape == (10_000, 32, 32, 3)
    from configs import cifar100
    c = cifar100.get_config()
    c.data.name = "synthetic_cifar"
    validate_config(c)  # a known dataset name


def _bench(name):
    """A benchmarks/ module by name (they are scripts, not a package)."""
    import importlib
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def _ev(name, start_us, dur_us, **stats):
    return types.SimpleNamespace(name=name, start_ns=start_us * 1000.0, duration_ns=dur_us * 1000.0,
                                 stats=list(stats.items()))


def test_profile_device_kernels_ranks_kernels_and_measures_the_busy_share():
    prof = _bench("profile_step")
    hlo = ('ENTRY %main (p: f32[2]) -> f32[2] {\n'
           '  %cudnn-conv.1 = (f32[8,16,16,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), '
           'custom_call_target="__cudnn$convForward"\n'
           '  %cudnn-conv.2 = (f32[16,3,3,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), '
           'custom_call_target="__cudnn$convBackwardFilter"\n'
           '  %loop_add_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_add\n}\n')
    kind = prof.classify(hlo)
    assert kind("cudnn-conv.1")[0] == "conv forward" and kind("cudnn-conv.2")[0] == "conv wgrad"
    # two steps: per step a 30 us convolution, a 10 us weight gradient and two 6 us fusions; gaps between them
    evs = []
    for s in (0, 1000):
        evs += [_ev("sm90_xmma_fprop", s, 30, hlo_op="cudnn-conv.1"), _ev("wgrad_kernel", s + 40, 10,
                                                                         hlo_op="cudnn-conv.2"),
                _ev("loop_add_fusion", s + 60, 6, hlo_op="loop_add_fusion"),
                _ev("loop_add_fusion", s + 70, 6, hlo_op="loop_add_fusion")]
    stream = types.SimpleNamespace(name="Stream #13(Compute)", events=evs)
    derived = types.SimpleNamespace(name="XLA Ops", events=[_ev("ignored", 0, 999)])
    planes = [types.SimpleNamespace(name="/host:CPU", lines=[types.SimpleNamespace(name="python",
                                                                                   events=[_ev("x", 0, 5000)])]),
              types.SimpleNamespace(name="/device:GPU:0", lines=[stream, derived])]
    out = prof.device_kernels(planes, runs=2, wall_ms=0.5, kind=kind, top=2)
    text = "\n".join(out)
    assert "4 kernels per step" in out[0] and "0.05 ms of kernel time per step" in out[0]
    assert "0.05 ms of the step's 0.50 ms wall time (10%" in out[0]  # union of spans, not the host plane
    top = [line for line in out if line.startswith("| sm90") or line.startswith("| loop") or
           line.startswith("| wgrad")]
    assert top[0].startswith("| sm90_xmma_fprop | cudnn-conv.1 | 0.030 | 1 | 57.7% |")
    assert top[1].startswith("| loop_add_fusion | loop_add_fusion | 0.012 | 2 | 23.1% |")
    assert len(top) == 2  # --top
    assert "| conv forward | 0.030 | 57.7% |" in text and "| conv wgrad | 0.010 | 19.2% |" in text
    assert "| elementwise | 0.012 | 23.1% |" in text
    assert "ignored" not in text
    assert prof.device_kernels(planes[:1], 2, 0.5, kind) == []  # a CPU trace: no device table


def test_teacher_depth_hlo_counts_top_level_instructions():
    td = _bench("teacher_depth")
    hlo = ("HloModule m\n\n%cond_body (x: f32[2]) -> f32[2] {\n  %c = f32[2]{0} conditional(%p, %x, %x), "
           "branch_computations={%a, %b}\n}\n\nENTRY %main (p0: f32[2]) -> f32[2] {\n"
           "  %p0 = f32[2]{0} parameter(0)\n  %fusion.1 = f32[2]{0} fusion(%p0), kind=kLoop, calls=%f\n"
           "  %fusion.2 = f32[2]{0} fusion(%fusion.1), kind=kLoop, calls=%f\n"
           "  %cc = (f32[2]{0}, u8[0]{0}) custom-call(%fusion.2), custom_call_target=\"__cudnn$convForward\"\n"
           "  %gte = f32[2]{0} get-tuple-element(%cc), index=0\n  %copy.3 = f32[2]{0} copy(%gte)\n"
           "  ROOT %t = (f32[2]{0}) tuple(%copy.3)\n}\n")
    assert td.hlo_counts(hlo) == {"fusion": 2, "custom-call": 1, "copy": 1, "conditional": 1}
    # XLA:GPU's command buffers: the kernels sit in a called computation; fusion bodies and reducers do not count
    hlo = ("HloModule m\n\n%fused_add (a: f32[2]) -> f32[2] {\n  %a = f32[2]{0} parameter(0)\n"
           "  %add = f32[2]{0} add(%a, %a)\n  ROOT %neg = f32[2]{0} negate(%add)\n}\n\n"
           "%sum (x: f32[], y: f32[]) -> f32[] {\n  ROOT %s = f32[] add(%x, %y)\n}\n\n"
           "%command_buffer (p: f32[2]) -> f32[2] {\n  %p = f32[2]{0} parameter(0)\n"
           "  %loop_fusion = f32[2]{0} fusion(%p), kind=kLoop, calls=%fused_add\n"
           "  ROOT %r = f32[] reduce(%loop_fusion, %c), dimensions={0}, to_apply=%sum\n}\n\n"
           "ENTRY %main (p0: f32[2]) -> f32[] {\n  %p0 = f32[2]{0} parameter(0)\n"
           "  ROOT %call = f32[] call(%p0), to_apply=%command_buffer\n}\n")
    assert td.hlo_counts(hlo) == {"fusion": 1, "reduce": 1}
    assert td.layers("resnet110") == 110


def test_e2e_epoch_intervals_and_projection():
    rep = _bench("gpu_report")
    lines = [(0.0, "data: synthetic_cifar ..."), (1.0, "compiling the teacher step..."),
             (11.0, "[teacher] epoch 1/1  loss 4.6  12.0 s"), (12.0, "compiling the analyzer step (64d_T2)..."),
             (20.0, "[analyzer 256d_T8] epoch 1/1 ..."), (20.0, "[analyzer 64d_T2] epoch 1/1 ..."),
             (21.0, "compiling the student/kd_mas step..."), (41.0, "[student/kd_mas] epoch 1/2 ..."),
             (46.0, "[student/kd_mas] epoch 2/2 ...")]
    rows = rep.epoch_intervals(lines)
    got = {(r["stage"], r["epoch"]): r["seconds"] for r in rows}
    assert got == {("teacher", 1): 10.0, ("analyzer 256d_T8", 1): 8.0, ("analyzer 64d_T2", 1): 8.0,
                   ("student/kd_mas", 1): 20.0, ("student/kd_mas", 2): 5.0}
    out = "\n".join(rep.e2e_report(rows, {"students/kd_mas": [18.0, 4.5], "teacher": [9.0]}, 46.0, 0))
    assert "| student/kd_mas | 2/2 | 5.0 | 4.5 |" in out and "| teacher | 1/1 | 10.0 | 9.0 |" in out
    # 20 s + 239 x 5 s = 1215 s
    assert "projected 240-epoch student stage: 20.2 min (first epoch 20.0 s with compilation, then 5.00 s" in out


def test_fused_summary_and_readme_table_from_a_results_file():
    rep = _bench("gpu_report")
    text = """card: NVIDIA H200, 143771 MiB, 580.1
versions: python 3.12.3; jax 0.11.2
date: 2027-01-01 00:00 UTC

## a. MAS+KD step resnet56 -> resnet20: the authors' PyTorch step (eager, torch.compile) against ours

### summary (medians)

| batch | precision | PyTorch eager ms/step | PyTorch eager images/s | torch.compile ms/step | \
torch.compile images/s | ours ms/step | ours images/s | ours vs eager | ours vs torch.compile |
|---|---|---|---|---|---|---|---|---|---|
| 64 | float32 | 99.00 | 646 | 99.00 | 646 | 99.00 | 646 | 1.00x | 1.00x |

### a. summary (medians of both runs)

| batch | precision | PyTorch eager ms/step | PyTorch eager images/s | torch.compile ms/step | \
torch.compile images/s | ours ms/step | ours images/s | ours vs eager | ours vs torch.compile |
|---|---|---|---|---|---|---|---|---|---|
| 64 | float32 | 20.00 | 3200 | 8.00 | 8000 | 4.00 | 16000 | 5.00x | 2.00x |
| 256 | bfloat16 | 30.00 | 8533 | - | - | 10.00 | 25600 | 3.00x | - |

## b. fused students

| students | vmap | ms/step | images/s per student | compile s | XLA memory MiB | convolutions |
|---|---|---|---|---|---|---|
| 1 | on | 4.0 | 16000 | 3.0 | 60 | 100 |
| 1 | off | 4.0 | 16000 | 3.0 | 60 | 100 |
| 8 | on | 8.0 | 64000 | 9.0 | 300 | 100 |
| 8 | off | 16.0 | 32000 | 20.0 | 300 | 800 |

## c. teacher

bfloat16:

| teacher | layers | ms/step (median) | min - max of rounds | ms per layer | per layer vs resnet20 |
|---|---|---|---|---|---|
| resnet56 | 56 | 6.72 | 6.5 - 7.0 | 0.120 | 1.00x |
| resnet110 | 110 | 26.40 | 23.0 - 46.0 | 0.240 | 2.00x |

## d. train.py

student/kd_mas: projected 240-epoch student stage: 9.5 min (first epoch ...)
"""
    fused = rep.fused_summary(text)
    assert "| 8 | 16.00 | 32000 | 8.00 | 64000 | 2.00x | 4.00x |" in fused
    assert any("vmapped group of 8 >= 4x one student: met (4.00x)" in line for line in fused)
    text = text.replace("## c.", "### b. summary\n\n" + "\n".join(fused) + "\n\n## c.")
    table = "\n".join(rep.readme_table(text, "benchmarks/results/h200.txt"))
    assert table.startswith("NVIDIA H200, 143771 MiB, 580.1; python 3.12.3; jax 0.11.2 "
                            "(`benchmarks/results/h200.txt`")
    assert ("| MAS+KD step resnet56 -> resnet20, batch 64, float32 | 4.00 ms (16000 img/s) | 20.00 ms (3200 img/s) | "
            "8.00 ms (8000 img/s) | 5.00x / 2.00x | >= 2x / >= 1.2x |") in table
    assert "batch 256, bfloat16 | 10.00 ms (25600 img/s) | 30.00 ms (8533 img/s) | - | 3.00x / - |" in table
    assert "(vmapped; unrolled 32000) | 64000 | | | 4.00x of one student | >= 4x one student |" in table
    assert "| 0.240 vs 0.120 ms (2.00x) |" in table
    assert "| 9.5 min | | | | <= 10 min |" in table


def test_torch_reference_step_runs_in_float32_and_autocast():
    torch = need("torch")
    vs = _bench("vs_pytorch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for prec in ("float32", "bfloat16"):
            step = vs.torch_step_fn("resnet8", "resnet8", 2, device="cpu", precision=prec)
            loss = float(step(0).detach())
            assert np.isfinite(loss) and loss > 0
    finally:
        torch.set_num_threads(threads)
    assert vs.torch_device("cpu", "gpu") == (None, f"PyTorch {torch.__version__} sees no CUDA device while JAX "
                                                   f"runs on gpu: the PyTorch rows are skipped")


def check_dry_run_results(text: str, results_path: str) -> None:
    """What the dry run's results file must hold: each part's rows, no failure or time-limit line."""
    import re
    assert "failed (exit status" not in text and "stopped by its time limit" not in text and "skipped:" not in text
    for head in ("card: ", "versions: python ", "date: ", "commit: ", "## end: "):
        assert head in text, head
    sections = {k: re.search(rf"^## {k}\..*?(?=^## |\Z)", text, re.S | re.M).group(0) for k in "abcd"}
    # a: one row per batch size and precision; PyTorch's cells filled where torch is installed
    rows = [line for line in sections["a"].splitlines() if line.startswith("row: ")]
    assert [r.split("|")[1:3] for r in rows] == [[" 8 ", " bfloat16 "], [" 16 ", " float32 "]]
    try:
        import torch  # noqa: F401
        for r in rows:
            cells = [c.strip() for c in r.split("|")[3:-1]]
            assert "-" not in cells and all(c.rstrip("x").replace(".", "").isdigit() for c in cells), r
    except ImportError:
        assert sections["a"].count("PyTorch is not installed here") == 2
    combined = sections["a"].split("### a. summary")[1]
    assert [line.split("|")[1:3] for line in combined.splitlines() if line.startswith("| ")][1:] == \
        [[" 8 ", " bfloat16 "], [" 16 ", " float32 "]]  # after the header
    # b: the summary of groups of 1 and 2, unrolled and vmapped
    summary = sections["b"].split("### b. summary")[1]
    for n in (1, 2):
        row = [line for line in summary.splitlines() if line.startswith(f"| {n} |")]
        assert len(row) == 1 and "-" not in [c.strip() for c in row[0].split("|")[2:6]], summary
    # c: the per-depth table and the two profiles
    assert "| resnet8 | 8 |" in sections["c"] and "| resnet14 | 14 |" in sections["c"]
    assert sections["c"].count("| category |") == 2
    # d: every epoch's seconds and the projection
    for row in ("| teacher | 1/1 |", "| student/kd_mas | 1/2 |", "| student/kd_mas | 2/2 |"):
        assert row in sections["d"], row
    assert "projected 240-epoch student stage: " in sections["d"]
    table = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_report.py"), "readme",
                            results_path], capture_output=True, text=True, check=True).stdout
    assert "| MAS+KD step resnet8 -> resnet8, batch 8, bfloat16 |" in table
    assert "| MAS+KD step resnet8 -> resnet8, batch 16, float32 |" in table
    assert "| resnet8 -> resnet8 student stage, 240 epochs" in table
    assert "| fused group of 8" not in table  # the dry run's groups: 1 and 2
    assert "min | | | | <= 10 min |" in table


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gpu_check_dry_run_writes_every_parts_rows(tmp_path):
    """The whole script on CPU with tiny sizes: every part runs through and leaves its rows in the results file
    (and its copy in $OUT).  Several minutes of compiling and PyTorch on a CPU: run before lending the script a GPU
    (MGD_JAX_GPU_CHECK_DRY_RUN=1), not in every suite run; the fast tests above check each part's pieces."""
    if not os.environ.get("MGD_JAX_GPU_CHECK_DRY_RUN"):
        pytest.skip("the GPU script's whole dry run: set MGD_JAX_GPU_CHECK_DRY_RUN=1 (docs/testing.md)")
    results, out = tmp_path / "cpu_dry.txt", tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_RESULTS=str(results), OUT=str(out), PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1450)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert (out / "cpu_dry.txt").read_text() == text
    check_dry_run_results(text, str(results))


def test_gpu_check_stops_in_one_line_where_jax_has_no_gpu(tmp_path):
    """Not a dry run, on a machine whose jax runs on the CPU: the script stops before any part, saying why, rather
    than writing CPU timings under a GPU's name (and it is valid bash throughout: `bash -n`)."""
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True, text=True).returncode == 0
    results = tmp_path / "card.txt"
    env = dict(os.environ, GPU_CHECK_RESULTS=str(results), OUT=str(tmp_path / "out"), PYTHON=sys.executable,
               JAX_PLATFORMS="cpu")
    env.pop("GPU_CHECK_DRY", None)
    proc = subprocess.run(["bash", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert "stopped: jax runs on 'cpu', not on a GPU" in text, text
    assert "[a64]" not in text and "row:" not in text, text
