#!/usr/bin/env bash
# The GPU check: one unattended run of at most 8 minutes on one GPU (an H100 or H200; less memory works, the
# largest fused group may then fail alone) that writes benchmarks/results/<card>.txt, and copies it to $OUT when
# $OUT is set.  It uses the JAX and PyTorch installed where it runs and installs nothing large.  Parts:
#   a. the MAS+KD resnet56 -> resnet20 step, batch 64 and 256, float32 and bfloat16 (AMP for PyTorch): the
#      authors' step in eager PyTorch, the same under torch.compile, and ours, alternating rounds in one process
#      (benchmarks/vs_pytorch.py); ms/step, images/s, our speed-ups (goals at batch 64: >= 2x eager, >= 1.2x
#      torch.compile).  Without PyTorch only our rows, with a line that says so.
#   b. fused groups of 1, 3, 8 and 24 KD students, unrolled vs vmapped: per-student images/s
#      (benchmarks/step_speed.py --fused --vmap=on,off).
#   c. the teacher (CE) step of resnet20/32/56/110 per layer in alternating rounds, with the optimized HLO's
#      instruction counts (benchmarks/teacher_depth.py), and the resnet56 and resnet110 teacher steps' top
#      kernels from a profiler trace (benchmarks/profile_step.py): why resnet110 once took 7x resnet56's time.
#   d. train.py end to end on 50,000 random 32x32x3 images made in memory (data.name=synthetic_cifar, 100
#      classes): teacher and analyzer 1 epoch each, the MAS+KD student 2 epochs; every epoch's seconds
#      (evaluation and checkpoints included) and the 240-epoch student stage projected from them.
# Each part runs in its own process under its own time limit; a part that fails or runs out of time leaves a line
# saying so and the rest still run.  Its limit is its share (below) plus whatever earlier parts left unused, so the
# whole run ends within GPU_CHECK_BUDGET seconds (470).
#
#     bash benchmarks/gpu_check.sh                       # on the GPU machine, from anywhere in the repository
#     GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh       # a dry run on CPU: tiny models and sizes, every part
#                                                        # (benchmarks/results/cpu_dry.txt, a few minutes)
#     python benchmarks/gpu_report.py readme benchmarks/results/h200.txt    # the README table from the results
#
# Python packages it needs beside JAX (and PyTorch for part a): flax, optax, orbax-checkpoint, chex, absl-py,
# scikit-learn, ml_collections, tensorboardX (pyproject.toml).  A machine without network access that lacks the
# two small pure-Python ones gets them as wheels: on a machine with pip access, in the repository,
#     pip download --no-deps -d .whl ml_collections==1.1.0 tensorboardX==2.6.5
# and copy .whl along; the script installs .whl/*.whl into a temporary folder (nothing else) when it finds them.
#
# Environment: GPU_CHECK_DRY=1 (dry run), GPU_CHECK_RESULTS=FILE (instead of benchmarks/results/<card>.txt),
# GPU_CHECK_CARD=NAME, GPU_CHECK_BUDGET=SECONDS, GPU_CHECK_COMMIT=the commit to name (a copy without .git),
# PYTHON=interpreter (default python3), OUT=folder for a copy of the results.
set -uo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
dry=${GPU_CHECK_DRY:-}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "$dry" ]; then
  # one XLA CPU device (fewer collectives to compile), compiled steps cached between dry runs
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=1"
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/mgd_gpu_check_dry_cache}
  budget=${GPU_CHECK_BUDGET:-1500}
else
  budget=${GPU_CHECK_BUDGET:-470}
fi
deadline=$((t_start + budget))
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT

# small pure-Python dependencies carried as wheels (see above): into a temporary folder, nothing else touched
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && \
   ! "$py" -c "import ml_collections, tensorboardX" >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl \
    && export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# the card: nvidia-smi's name (NVIDIA H200 -> h200), else JAX's device kind; cpu_dry for a dry run
gpu_name=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_name=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
fi
if [ -n "${GPU_CHECK_CARD:-}" ]; then
  card=$GPU_CHECK_CARD
elif [ -n "$dry" ]; then
  card=cpu_dry
elif [ -n "$gpu_name" ]; then
  card=$(echo "${gpu_name%%,*}" | sed -E 's/^NVIDIA //; s/ .*//' | tr 'A-Z' 'a-z' | tr -c 'a-z0-9_\n-' '_')
else
  card=$(timeout 60 "$py" -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null | tail -1 \
         | tr 'A-Z' 'a-z' | tr -c 'a-z0-9_\n-' '_')
  card=${card:-unknown}
fi
results=${GPU_CHECK_RESULTS:-benchmarks/results/$card.txt}
mkdir -p "$(dirname "$results")"
: > "$results"

say() { echo "$@" | tee -a "$results"; }
copy_out() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$results" "$OUT/" 2>/dev/null; fi; return 0; }

# part NAME SHARE LATER CMD...: run CMD under a time limit of (time left) - LATER (the shares of the parts after
# it) - 5 s, at most SHARE plus what earlier parts left unused; its output goes to the results file as it comes.
part() {
  local name=$1 share=$2 later=$3
  shift 3
  local now left status
  now=$(date +%s)
  left=$((deadline - now - later - 5))
  if [ "$left" -lt 10 ]; then
    say "[$name] skipped: ${left} s left of the time budget"
    return 0
  fi
  say "[$name] time limit ${left} s (share ${share} s); \$ $*"
  timeout -k 10 "$left" "$@" 2>&1 | grep --line-buffered -v -E '^(W|I)[0-9]{4} |^WARNING: All log messages' \
    | tee -a "$results"
  status=${PIPESTATUS[0]}
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    say "[$name] stopped by its time limit (${left} s): the rows above are what it measured"
  elif [ "$status" -ne 0 ]; then
    say "[$name] failed (exit status $status): the rows above are what it measured"
  fi
  say "[$name] took $(($(date +%s) - now)) s"
  copy_out
}

# sizes: the GPU run, or tiny ones for the dry run (the same code paths, each precision once)
if [ -n "$dry" ]; then
  T=resnet8; S=resnet8; B64=8; B256=16; STEPS=1; ROUNDS=2; CBACKEND=aot_eager; P64=bfloat16; P256=float32
  A_EXTRA=(--threads=1 --ceiling_size=512); C_EXTRA=(--ceiling_size=512)
  FUSED=1,2; F_STEPS=1; F_ROUNDS=2; DEPTHS=resnet8,resnet14; D_PREC=bfloat16; D_STEPS=1; D_ROUNDS=2; P_STEPS=1
  PROF_SMALL=resnet8; PROF_BIG=resnet14
  E2E=(--config=configs/cifar100.py:resnet8,resnet8,kd,mas --config.data.train_limit=256
       --config.data.test_limit=128 --config.eval_batch_size=128)
  # shares (seconds) of a64 a256 b c-depth c-prof c-prof d
  SH=(300 200 200 150 100 100 300)
else
  T=resnet56; S=resnet20; B64=64; B256=256; STEPS=20; ROUNDS=5; CBACKEND=inductor
  P64=float32,bfloat16; P256=float32,bfloat16; A_EXTRA=(); C_EXTRA=(); D_PREC=bfloat16,float32
  FUSED=1,3,8,24; F_STEPS=10; F_ROUNDS=3; DEPTHS=resnet20,resnet32,resnet56,resnet110; D_STEPS=20; D_ROUNDS=5
  P_STEPS=10; PROF_SMALL=resnet56; PROF_BIG=resnet110
  E2E=(--config=configs/cifar100.py:resnet56,resnet20,kd,mas)
  SH=(130 55 65 70 20 25 80)
fi
later() {  # the sum of the shares after part index $1
  local s=0 i
  for ((i = $1 + 1; i < ${#SH[@]}; i++)); do s=$((s + SH[i])); done
  echo $s
}

say "# GPU check ($([ -n "$dry" ] && echo 'DRY RUN on CPU, tiny sizes: not a measurement' || echo "$card"))"
say ""
say "card: ${gpu_name:-none (nvidia-smi not found)}"
versions=$(timeout 120 "$py" - <<'PY' 2>/dev/null
import platform
out = [f"python {platform.python_version()}"]
try:
    import jax, jaxlib
    out.append(f"jax {jax.__version__} (jaxlib {jaxlib.__version__}, {jax.devices()[0].device_kind}, "
               f"{jax.default_backend()})")
except Exception as e:
    out.append(f"jax: {type(e).__name__}")
for name in ("flax", "optax", "orbax.checkpoint", "ml_collections", "tensorboardX"):
    try:
        m = __import__(name, fromlist=["_"])
        out.append(f"{name} {getattr(m, '__version__', '?')}")
    except Exception:
        out.append(f"{name} MISSING")
try:
    import torch
    cuda = torch.version.cuda if torch.cuda.is_available() else "no CUDA device"
    out.append(f"torch {torch.__version__} (CUDA {cuda}, cuDNN {torch.backends.cudnn.version()})")
except ImportError:
    out.append("torch not installed")
print("; ".join(out))
PY
)
say "versions: ${versions:-(python could not report versions)}"
say "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
if [ -n "${GPU_CHECK_COMMIT:-}" ]; then  # a copy of the tree without .git: the caller names the commit
  commit=$GPU_CHECK_COMMIT
else
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD -- mgd_jax benchmarks configs train.py 2>/dev/null || commit="$commit with uncommitted changes"
  else
    commit="unknown (no .git here: set GPU_CHECK_COMMIT)"
  fi
fi
say "commit: $commit"
if [ -z "$dry" ]; then  # without the CUDA plugin jax runs on the CPU: its rows would not be GPU numbers
  backend=$(timeout 120 "$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)
  if [ "$backend" != gpu ]; then
    say "stopped: jax runs on '$backend', not on a GPU (jax[cuda] is needed where this runs): no GPU numbers"
    copy_out
    exit 1
  fi
fi
say "time budget: ${budget} s; part limits: their share plus what earlier parts left"
copy_out

say ""
say "## a. MAS+KD step $T -> $S: the authors' PyTorch step (eager, torch.compile) against ours"
say ""
part a64 "${SH[0]}" "$(later 0)" "$py" benchmarks/vs_pytorch.py --teacher=$T --student=$S --batch=$B64 \
  --precision=$P64 --compile --compile_backend=$CBACKEND --steps=$STEPS --rounds=$ROUNDS ${A_EXTRA[@]+"${A_EXTRA[@]}"}
part a256 "${SH[1]}" "$(later 1)" "$py" benchmarks/vs_pytorch.py --teacher=$T --student=$S --batch=$B256 \
  --precision=$P256 --compile --compile_backend=$CBACKEND --steps=$STEPS --rounds=$ROUNDS ${A_EXTRA[@]+"${A_EXTRA[@]}"}
# one summary table of both runs (batch 64 and 256), for the README table
$py - "$results" <<'PY' | tee -a "$results"
import re, sys
text = open(sys.argv[1]).read()
rows = [m.group(1) for m in re.finditer(r"^row: (\| \d+ \| (?:float32|bfloat16) \|.*)$", text, re.M)]
cols = ("PyTorch eager", "torch.compile", "ours")
print("\n### a. summary (medians of both runs)\n")
print("| batch | precision | " + " | ".join(f"{c} ms/step | {c} images/s" for c in cols) +
      " | ours vs eager | ours vs torch.compile |\n|---|---|" + "---|---|" * len(cols) + "---|---|")
print("\n".join(rows) if rows else "(no rows were measured)")
PY

say ""
say "## b. fused students ($T -> $S, KD in modes none / mag / mas in turn): unrolled vs vmapped"
say ""
if grep -q -- '--vmap' benchmarks/step_speed.py; then
  vm=(--vmap=on,off --rounds=$F_ROUNDS)
else
  vm=()
  say "(this checkout's step_speed.py has no --vmap: unrolled groups only)"
fi
part b "${SH[2]}" "$(later 2)" "$py" benchmarks/step_speed.py --teacher=$T --student=$S --fused=$FUSED \
  --steps=$F_STEPS --precision=bfloat16 ${vm[@]+"${vm[@]}"}
say ""
say "### b. summary (bfloat16, batch 64)"
say ""
$py benchmarks/gpu_report.py fused "$results" | tee -a "$results"

say ""
say "## c. the teacher step per depth, and where the time of the resnet56 and resnet110 steps goes"
say ""
part c-depth "${SH[3]}" "$(later 3)" "$py" benchmarks/teacher_depth.py --archs=$DEPTHS --batch=$B64 \
  --steps=$D_STEPS --rounds=$D_ROUNDS --precision=$D_PREC
part c-profile-small "${SH[4]}" "$(later 4)" "$py" benchmarks/profile_step.py --stage=teacher --teacher=$PROF_SMALL \
  --batch=$B64 --steps=$P_STEPS --precision=bfloat16 --top=12 ${C_EXTRA[@]+"${C_EXTRA[@]}"}
part c-profile-big "${SH[5]}" "$(later 5)" "$py" benchmarks/profile_step.py --stage=teacher --teacher=$PROF_BIG \
  --batch=$B64 --steps=$P_STEPS --precision=bfloat16 --top=12 ${C_EXTRA[@]+"${C_EXTRA[@]}"}

say ""
say "## d. train.py end to end: 50,000 in-memory images (synthetic_cifar), teacher and analyzer 1 epoch, student 2"
say ""
part d "${SH[6]}" 0 "$py" benchmarks/gpu_report.py e2e "$work/e2e" -- "${E2E[@]}" \
  --config.data.name=synthetic_cifar --config.teacher.epochs=1 --config.analyzer.epochs=1 \
  --config.student.epochs=2 --config.progress=False --config.precision=bfloat16

say ""
say "## end: $(($(date +%s) - t_start)) s in all"
copy_out
echo "results: $results"
