"""Our MAS+KD student step against the same step in PyTorch, alternating rounds in one process.  Not a test.

    pip install torch==2.13.0                      # the CPU build
    python benchmarks/vs_pytorch.py                # resnet56 -> resnet20, batch 64, 5 rounds of 10 steps each
    python benchmarks/vs_pytorch.py --teacher=resnet110 --student=resnet32 --rounds=3 --json=out.json
    python benchmarks/vs_pytorch.py --device=cuda --compile --batch=64,256 --precision=float32,bfloat16

The PyTorch side is the authors' training step as their code runs it (NCHW, eager, ``torch.set_num_threads`` =
the cores on CPU, ``cudnn.benchmark`` on CUDA): the frozen teacher (CIFAR ResNet, eval mode) and its two tubes
(encoder Linear-ReLU-Linear, decoder likewise) under ``no_grad``, then the student (train-mode BatchNorm) and its
two encoders: loss = 0.2 CE + 0.8 T^2 KL at T = 4 towards the stable-excitation target (the mean of the
teacher's and its decoders' logits) + one KL per granularity between the encodings (64-d at T = 2, 256-d at
T = 8); backward; SGD with momentum 0.9 and weight decay 5e-4.  It is written here from the paper's description
(the models follow RepDistiller's CIFAR ResNet), so that the comparison needs no checkout of the authors'
repository.  It is given its inputs already augmented and normalised (the authors' data loader does that in
worker processes); ours augments inside the step, so the comparison is, if anything, tilted towards PyTorch.

``--compile`` adds the same step with its forward pass and loss under ``torch.compile`` (backward through
AOTAutograd's compiled graph; the optimizer step stays eager, ``--compile_mode`` picks the mode).
``--precision=bfloat16``: PyTorch's forward pass and loss under ``torch.autocast(bfloat16)`` (AMP, float32
parameters), ours with ``config.precision=bfloat16`` (``mgd_jax/precision.py``: bf16 backbones, float32
parameters, BatchNorm statistics, tubes and losses).  float32: each framework's defaults (both may use TF32
convolutions on an NVIDIA GPU; the run prints PyTorch's settings).

Each round times ``--steps`` steps of each contestant back to back (PyTorch eager, then compiled, then ours),
after a warm-up; each batch size and precision gets its own rounds, a table of every round and the medians, and
the summary at the end gives ms/step, images/s and our speed-up over each PyTorch variant.  "% ceiling" = the
step's FLOPs (XLA's cost analysis of our step; the same work for both) / step time / the float32 4096^2 matmul
FLOP/s measured in the same run.  Without PyTorch (or, on a GPU, with a PyTorch that sees no CUDA device) only
our rows are timed, with a line that says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# both frameworks share one GPU: JAX allocates as it goes instead of taking 75% of the memory at its start
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed  # noqa: E402  (configures the CPU devices before jax starts)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the GPU script runs where torch may be missing
    torch = None

DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56,
          "resnet110": 110}
NO_TORCH = "PyTorch is not installed here: the PyTorch rows are skipped (only ours is timed)"

if torch is not None:
    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.down is None else self.down(x)))

    class CifarResNet(tnn.Module):
        def __init__(self, depth, num_classes=100, filters=(16, 16, 32, 64)):
            super().__init__()
            n = (depth - 2) // 6
            self.conv1 = tnn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(filters[0])
            blocks, cin = [], filters[0]
            for planes, stride in zip(filters[1:], (1, 2, 2)):
                for i in range(n):
                    blocks.append(Block(cin, planes, stride if i == 0 else 1))
                    cin = planes
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn1(self.conv1(x))))
            h = F.adaptive_avg_pool2d(x, 1).flatten(1)
            return self.fc(h), h

    def mlp(d_in, hidden, d_out):
        return tnn.Sequential(tnn.Linear(d_in, hidden), tnn.ReLU(), tnn.Linear(hidden, d_out))

    def kl(student, teacher, t):
        return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def torch_step_fn(t_arch, s_arch, batch, grans=((64, 2.0), (256, 8.0)), num_classes=100, device="cpu",
                  precision="float32", compile_mode=None, compile_backend="inductor"):
    """The authors' step on ``device``; ``precision='bfloat16'``: forward and loss under autocast; ``compile_mode``
    (None: eager): forward and loss under ``torch.compile(mode=compile_mode)`` ('default', 'reduce-overhead',
    'max-autotune', ...) with ``compile_backend`` (inductor; 'aot_eager' traces the same graphs without code
    generation: a quick check of the capture, not a speed)."""
    torch.manual_seed(0)
    teacher = CifarResNet(DEPTHS[t_arch], num_classes).eval().to(device)
    student = CifarResNet(DEPTHS[s_arch], num_classes).to(device)
    t_enc = [mlp(64, 64, d).to(device) for d, _ in grans]
    t_dec = [mlp(d, 64, num_classes).to(device) for d, _ in grans]
    s_enc = tnn.ModuleList([mlp(64, 64, d) for d, _ in grans]).to(device)
    for p in [*teacher.parameters(), *(q for m in t_enc + t_dec for q in m.parameters())]:
        p.requires_grad_(False)
    params = [*student.parameters(), *s_enc.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), np.float32)).to(device),
                torch.from_numpy(rng.integers(0, num_classes, batch)).to(device)) for _ in range(4)]
    amp = precision == "bfloat16"

    def forward_loss(x, y):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t_logits, t_h = teacher(x)
                t_e = [e(t_h) for e in t_enc]
                target = (t_logits + sum(d(e) for d, e in zip(t_dec, t_e))) / (1 + len(grans))
            s_logits, s_h = student(x)
            loss = 0.2 * F.cross_entropy(s_logits, y) + 0.8 * kl(s_logits, target, 4.0)
            for (_, temp), enc, te in zip(grans, s_enc, t_e):
                loss = loss + kl(enc(s_h), te, temp)
        return loss

    if compile_mode is None:
        fn = forward_loss
    elif compile_backend == "inductor":
        fn = torch.compile(forward_loss, mode=compile_mode)
    else:
        fn = torch.compile(forward_loss, backend=compile_backend)

    def step(i):
        x, y = batches[i % len(batches)]
        loss = fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _sync(device):
    if torch is not None and device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_device(requested: str, jax_platform: str) -> tuple[str | None, str | None]:
    """-> (the device PyTorch runs on or None, why not).  'auto': CUDA when PyTorch sees it, else the CPU; with
    JAX on a GPU, PyTorch on the CPU would not be a comparison, so it is skipped."""
    if torch is None:
        return None, NO_TORCH
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        return None, f"PyTorch {torch.__version__} sees no CUDA device: the PyTorch rows are skipped"
    device = requested if requested != "auto" else ("cuda" if cuda else "cpu")
    if device == "cpu" and jax_platform != "cpu":
        return None, (f"PyTorch {torch.__version__} sees no CUDA device while JAX runs on {jax_platform}: the "
                      f"PyTorch rows are skipped")
    return device, None


def _median(v):
    return float(np.median(v)) if v else None


def compare(a, t_dev, batch, prec, ceiling) -> dict:
    """Rounds of each contestant for one batch size and precision; prints the table, returns its medians."""
    dtype = None if prec == "float32" else jnp.dtype(prec)
    mesh = step_speed.mesh_lib.make_mesh(jax.devices())
    bench = step_speed.Bench(a.teacher, mesh, batch, a.steps, dtype)
    captured = {}
    timer = step_speed.time_step

    def keep(step, state, args, batches, steps):  # compile once; the rounds below call it
        lowered = step.lower(state, *args(batches[0]))
        t0 = time.perf_counter()
        captured.update(flops=(lowered.cost_analysis() or {}).get("flops"), step=lowered.compile(), state=state,
                        args=args, compile_s=time.perf_counter() - t0)
        return {}

    step_speed.time_step = keep
    try:
        bench.student(a.student)
    finally:
        step_speed.time_step = timer
    jstep, state, args, batches = captured["step"], captured["state"], captured["args"], bench.batches

    def jax_round(state):
        t0 = time.perf_counter()
        for i in range(a.steps):
            state, m = jstep(state, *args(batches[i % len(batches)]))
        jax.block_until_ready((state, m))
        return state, 1000 * (time.perf_counter() - t0) / a.steps

    contestants = {}  # name -> step function
    compile_s = {"ours": captured["compile_s"]}
    if t_dev is not None:
        if a.compile:
            torch._dynamo.reset()  # a fresh cache for each batch size and precision (no fallback to eager)
        contestants["eager"] = torch_step_fn(a.teacher, a.student, batch, device=t_dev, precision=prec)
        if a.compile:
            contestants["compile"] = torch_step_fn(a.teacher, a.student, batch, device=t_dev, precision=prec,
                                                   compile_mode=a.compile_mode, compile_backend=a.compile_backend)
    for name, fn in list(contestants.items()):  # warm-up; the first calls of the compiled step compile it
        t0 = time.perf_counter()
        try:
            for i in range(2):
                fn(i)
            _sync(t_dev)
        except Exception as e:  # e.g. inductor without a working compiler: the other rows are still measured
            print(f"{name}: dropped, its first steps failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            del contestants[name]
            continue
        compile_s[name] = time.perf_counter() - t0

    def torch_round(fn):
        _sync(t_dev)
        t0 = time.perf_counter()
        for i in range(a.steps):
            fn(i)
        _sync(t_dev)
        return 1000 * (time.perf_counter() - t0) / a.steps

    state, _ = jax_round(state)  # warm-up
    names = [*contestants, "ours"]
    label = {"eager": "PyTorch eager", "compile": "torch.compile", "ours": "ours (JAX)"}
    flops = captured["flops"]
    print(f"\n### batch {batch}, {prec}\n\n{a.teacher} -> {a.student} MAS+KD; "
          f"{flops / batch / 1e6 if flops else float('nan'):.0f} MFLOP/image; first calls (compile + 2 steps for "
          f"PyTorch, XLA compile for ours): " + ", ".join(f"{label[n]} {compile_s[n]:.1f} s" for n in names) + "\n")
    ratios = [n for n in contestants]
    print("| round | " + " | ".join(f"{label[n]} ms/step" for n in names) +
          "".join(f" | ours vs {label[n]}" for n in ratios) + " |")
    print("|---" * (1 + len(names) + len(ratios)) + "|")
    rounds = {n: [] for n in names}
    for r in range(a.rounds):
        for n in contestants:
            rounds[n].append(torch_round(contestants[n]))
        state, j_ms = jax_round(state)
        rounds["ours"].append(j_ms)
        print(f"| {r + 1} | " + " | ".join(f"{rounds[n][-1]:.2f}" for n in names) +
              "".join(f" | {rounds[n][-1] / j_ms:.2f}x" for n in ratios) + " |", flush=True)
    med = {n: _median(rounds[n]) for n in names}

    def pct(ms):
        return "" if not flops else f" ({100 * flops / (ms / 1000) / ceiling:.0f}% ceiling)"

    print("| median | " + " | ".join(f"{med[n]:.2f}{pct(med[n])}" for n in names) +
          "".join(f" | **{med[n] / med['ours']:.2f}x**" for n in ratios) + " |", flush=True)
    res = {"batch": batch, "precision": prec, "flops": flops, "compile_s": compile_s, "rounds": rounds,
           "median_ms": med, "images_per_s": {n: batch / (med[n] / 1000) for n in names},
           "speedup": {n: med[n] / med["ours"] for n in ratios}}
    print(f"row: {summary_row(res)}", flush=True)  # at once: a run cut short keeps it (benchmarks/gpu_check.sh)
    return res


SUMMARY_COLS = (("eager", "PyTorch eager"), ("compile", "torch.compile"), ("ours", "ours"))


def summary_row(r: dict) -> str:
    """``| batch | precision | ms/step and images/s of each contestant | ours vs eager | ours vs compile |``."""
    cells = []
    for n, _ in SUMMARY_COLS:
        ms = r["median_ms"].get(n)
        cells.append("-" if ms is None else f"{ms:.2f}")
        cells.append("-" if ms is None else f"{r['images_per_s'][n]:.0f}")
    sp = [f"{r['speedup'][n]:.2f}x" if n in r["speedup"] else "-" for n in ("eager", "compile")]
    return f"| {r['batch']} | {r['precision']} | " + " | ".join(cells + sp) + " |"


def summary(results: list[dict]) -> None:
    """One row per batch size and precision: ms/step and images/s of each contestant, our speed-ups."""
    print("\n### summary (medians)\n\n| batch | precision | " +
          " | ".join(f"{lab} ms/step | {lab} images/s" for _, lab in SUMMARY_COLS) +
          " | ours vs eager | ours vs torch.compile |\n|---|---|" + "---|---|" * len(SUMMARY_COLS) + "---|---|")
    for r in results:
        print(summary_row(r))
    goals = [r for r in results if r["batch"] == 64]
    for r in goals:
        e, c = r["speedup"].get("eager"), r["speedup"].get("compile")
        print(f"goal at batch 64, {r['precision']}: ours >= 2x eager: "
              f"{'-' if e is None else ('met' if e >= 2 else 'not met') + f' ({e:.2f}x)'}; ours >= 1.2x torch.compile: "
              f"{'-' if c is None else ('met' if c >= 1.2 else 'not met') + f' ({c:.2f}x)'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56", choices=sorted(DEPTHS))
    p.add_argument("--student", default="resnet20", choices=sorted(DEPTHS))
    p.add_argument("--batch", default="64", help="batch sizes, comma-separated (e.g. 64,256)")
    p.add_argument("--precision", default="float32", help="float32 and / or bfloat16, comma-separated")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="PyTorch's device (auto: CUDA when PyTorch sees it)")
    p.add_argument("--compile", action="store_true", help="also time the PyTorch step under torch.compile")
    p.add_argument("--compile_mode", default="default", help="torch.compile's mode (default, reduce-overhead, ...)")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile's backend (aot_eager: the capture without code generation, for a dry run)")
    p.add_argument("--steps", type=int, default=10, help="steps per round and contestant")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="PyTorch's CPU threads (0: one per core)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--ceiling_size", type=int, default=4096,
                   help="side of the float32 matmul that measures the ceiling (smaller: quicker, for a dry run)")
    a = p.parse_args()
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        p.exit(2, f"error: --batch={a.batch!r}: give batch sizes as integers, e.g. 64,256\n")
    precs = a.precision.split(",")
    for prec in precs:
        if prec not in ("float32", "bfloat16"):
            p.exit(2, f"error: --precision={prec!r}: known: float32, bfloat16\n")
    platform = jax.devices()[0].platform
    t_dev, why = torch_device(a.device, platform)
    if why:
        print(why)
    if t_dev == "cpu":
        torch.set_num_threads(a.threads or step_speed.cpu.num_cores())
    if t_dev is not None and t_dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as the authors' training scripts set it
    ceiling = step_speed.matmul_ceiling(a.ceiling_size)
    load = os.getloadavg()[0]
    if platform == "cpu" and t_dev == "cpu" and load > 0.5:
        print(f"warning: load average {load:.1f} before the rounds: other processes compete for the cores, and "
              f"PyTorch's threads suffer far more from it than XLA's; the comparison needs a quiet machine")
    tinfo = "no PyTorch" if t_dev is None else (
        f"PyTorch {torch.__version__} on {t_dev}" +
        (f" ({torch.cuda.get_device_name(0)}, cudnn.benchmark, TF32 convolutions "
         f"{torch.backends.cudnn.allow_tf32}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32})"
         if t_dev.startswith("cuda") else f" ({torch.get_num_threads()} threads)"))
    if a.compile and t_dev is not None:
        tinfo += f"; torch.compile mode {a.compile_mode!r}, backend {a.compile_backend!r}"
    print(f"{a.teacher} -> {a.student} MAS+KD; JAX {jax.__version__} on {len(jax.devices())} x "
          f"{jax.devices()[0].device_kind}; {tinfo}; {a.rounds} rounds of {a.steps} steps; matmul ceiling "
          f"{ceiling / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    for batch in batches:
        for prec in precs:
            results.append(compare(a, t_dev, batch, prec, ceiling))
            if a.json:  # after each combination: a run cut short keeps what it measured
                with open(a.json, "w") as f:
                    json.dump({"teacher": a.teacher, "student": a.student, "ceiling_flops": ceiling,
                               "torch": None if torch is None else torch.__version__, "torch_device": t_dev,
                               "jax": jax.__version__, "device": jax.devices()[0].device_kind,
                               "jax_devices": len(jax.devices()), "load_average_before": load,
                               "steps": a.steps, "results": results}, f, indent=1)
    summary(results)


if __name__ == "__main__":
    main()
