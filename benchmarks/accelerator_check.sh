#!/usr/bin/env bash
# On a machine with a GPU or TPU: the tests that exercise the accelerator defaults (bfloat16 compute, training data
# resident on the device, donated state, fused students, every stage through the pipeline) on the accelerator, then
# images/s of each README pair's stages and one CIFAR-100-shaped epoch's time (782 steps of 64), and the fused
# students' per-student images/s.  About 10 minutes on one GPU.  Not part of CI (which has no accelerator).
#
#     bash benchmarks/accelerator_check.sh            # results in benchmarks/results/accelerator_<backend>_*.json
#     QUICK=1 bash benchmarks/accelerator_check.sh    # one pair only (a dry run of the script, e.g. on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
backend=$(JAX_PLATFORMS= python -c "import jax; print(jax.default_backend())")
device=$(JAX_PLATFORMS= python -c "import jax; print(jax.devices()[0].device_kind)")
echo "== backend: $backend ($device)"
export JAX_PLATFORMS="$backend"  # the tests' conftest defaults to cpu; this wins
out="benchmarks/results/accelerator_${backend}"
mkdir -p benchmarks/results

echo "== tests on $backend"
python -m pytest -q -x \
  "tests/test_performance_options.py::test_bfloat16_step_keeps_float32_state_and_matches_float32_loss" \
  "tests/test_performance_options.py::test_device_resident_data_trains_like_the_host_path" \
  "tests/test_pipeline.py" \
  "tests/test_fused_students.py::test_fused_students_equal_their_separate_runs" \
  "tests/test_layout.py"

echo "== step speed per README pair (bfloat16, the accelerator default) and one CIFAR-100 epoch"
if [ -n "${QUICK:-}" ]; then pairs=(--teacher=resnet8 --student=resnet8 --steps=3); else pairs=(--pairs=readme --steps=20); fi
python benchmarks/step_speed.py "${pairs[@]}" --precision=bfloat16 --json="${out}_stages.json"
python - "${out}_stages.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("\n| teacher -> student | stage | images/s | one CIFAR-100 epoch (782 steps) |\n|---|---|---|---|")
for r in rows:
    passes = 2 if "one granularity" in r["stage"] else 1  # the reference's analyzer: one pass per granularity
    print(f"| {r['pair']} | {r['stage']} | {r['images_per_s']:.0f} | {r['ms'] * 782 * passes / 1000:.1f} s |")
PY

echo "== fused students"
if [ -n "${QUICK:-}" ]; then fused=(--teacher=resnet8 --student=resnet8 --fused=1,3 --steps=3); else fused=(--fused=1,3,8 --steps=20); fi
python benchmarks/step_speed.py "${fused[@]}" --precision=bfloat16 --json="${out}_fused.json"
