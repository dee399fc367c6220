"""Our MAS+KD student step against the same step in eager PyTorch, alternating rounds in one process.  Not a test.

    pip install torch==2.13.0                      # the CPU build
    python benchmarks/vs_pytorch.py                # resnet56 -> resnet20, batch 64, 5 rounds of 10 steps each
    python benchmarks/vs_pytorch.py --teacher=resnet110 --student=resnet32 --rounds=3 --json=out.json

The PyTorch side is the authors' training step as their code runs it (NCHW, eager, ``torch.set_num_threads`` =
the cores): the frozen teacher (CIFAR ResNet, eval mode) and its two tubes (encoder Linear-ReLU-Linear, decoder
likewise) under ``no_grad``, then the student (train-mode BatchNorm) and its two encoders: loss = 0.2 CE + 0.8
T^2 KL at T = 4 towards the stable-excitation target (the mean of the teacher's and its decoders' logits) + one
KL per granularity between the encodings (64-d at T = 2, 256-d at T = 8); backward; SGD with momentum 0.9 and
weight decay 5e-4.  It is written here from the paper's description (the models follow RepDistiller's CIFAR
ResNet), so that the comparison needs no checkout of the authors' repository.  It is given its inputs already
augmented and normalised (the authors' data loader does that in worker processes); ours augments inside the
step, so the comparison is, if anything, tilted towards PyTorch.

Each round times ``--steps`` steps of each framework back to back (PyTorch first, then JAX), after a warm-up; the
table shows every round and the medians.  "% ceiling" = the step's FLOPs (XLA's cost analysis of our step; the
same work for both) / step time / the float32 4096^2 matmul FLOP/s measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_speed  # noqa: E402  (configures the CPU devices before jax starts)

import jax  # noqa: E402
import numpy as np  # noqa: E402

try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    sys.exit("this benchmark needs PyTorch: pip install torch==2.13.0 (the CPU build)")

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


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


def torch_step_fn(t_arch, s_arch, batch, grans=((64, 2.0), (256, 8.0)), num_classes=100):
    torch.manual_seed(0)
    teacher, student = CifarResNet(DEPTHS[t_arch], num_classes).eval(), CifarResNet(DEPTHS[s_arch], num_classes)
    t_enc = [mlp(64, 64, d) for d, _ in grans]
    t_dec = [mlp(d, 64, num_classes) for d, _ in grans]
    s_enc = tnn.ModuleList([mlp(64, 64, d) for d, _ in grans])
    for p in [*teacher.parameters(), *(q for m in t_enc + t_dec for q in m.parameters())]:
        p.requires_grad_(False)
    params = [*student.parameters(), *s_enc.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.standard_normal((batch, 3, 32, 32), np.float32)),
                torch.from_numpy(rng.integers(0, num_classes, batch))) for _ in range(4)]

    def step(i):
        x, y = batches[i % len(batches)]
        with torch.no_grad():
            t_logits, t_h = teacher(x)
            t_e = [e(t_h) for e in t_enc]
            target = (t_logits + sum(d(e) for d, e in zip(t_dec, t_e))) / (1 + len(grans))
        s_logits, s_h = student(x)
        loss = 0.2 * F.cross_entropy(s_logits, y) + 0.8 * kl(s_logits, target, 4.0)
        for (_, temp), enc, te in zip(grans, s_enc, t_e):
            loss = loss + kl(enc(s_h), te, temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet56", choices=sorted(DEPTHS))
    p.add_argument("--student", default="resnet20", choices=sorted(DEPTHS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps per round and framework")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: one per core)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    torch.set_num_threads(a.threads or step_speed.cpu.num_cores())
    mesh = step_speed.mesh_lib.make_mesh(jax.devices())
    ceiling = step_speed.matmul_ceiling()

    bench = step_speed.Bench(a.teacher, mesh, a.batch, a.steps)
    captured = {}

    def keep(step, state, args, batches, steps):  # compile once; the rounds below call it
        lowered = step.lower(state, *args(batches[0]))
        captured.update(flops=lowered.cost_analysis()["flops"], step=lowered.compile(), state=state, args=args)
        return {}

    step_speed.time_step = keep
    bench.student(a.student)
    jstep, state, args, batches = captured["step"], captured["state"], captured["args"], bench.batches

    def jax_round(state):
        t0 = time.perf_counter()
        for i in range(a.steps):
            state, m = jstep(state, *args(batches[i % len(batches)]))
        jax.block_until_ready((state, m))
        return state, 1000 * (time.perf_counter() - t0) / a.steps

    tstep = torch_step_fn(a.teacher, a.student, a.batch)

    def torch_round():
        t0 = time.perf_counter()
        for i in range(a.steps):
            tstep(i)
        return 1000 * (time.perf_counter() - t0) / a.steps

    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} before the rounds: other processes compete for the cores, and "
              f"PyTorch's threads suffer far more from it than XLA's; the comparison needs a quiet machine")
    for i in range(2):  # warm-up
        tstep(i)
    state, _ = jax_round(state)
    print(f"{a.teacher} -> {a.student} MAS+KD, batch {a.batch}; {len(jax.devices())} x {jax.devices()[0].device_kind} "
          f"(JAX), {torch.get_num_threads()} threads (PyTorch {torch.__version__}); matmul ceiling "
          f"{ceiling / 1e9:.0f} GFLOP/s; {captured['flops'] / a.batch / 1e6:.0f} MFLOP/image\n")
    print("| round | PyTorch ms/step | JAX ms/step | JAX speed-up |\n|---|---|---|---|")
    rows = []
    for r in range(a.rounds):
        t_ms = torch_round()
        state, j_ms = jax_round(state)
        rows.append({"torch_ms": t_ms, "jax_ms": j_ms})
        print(f"| {r + 1} | {t_ms:.1f} | {j_ms:.1f} | {t_ms / j_ms:.2f}x |", flush=True)
    t_med = float(np.median([r["torch_ms"] for r in rows]))
    j_med = float(np.median([r["jax_ms"] for r in rows]))
    pct = lambda ms: 100 * captured["flops"] / (ms / 1000) / ceiling  # noqa: E731
    print(f"| median | {t_med:.1f} ({pct(t_med):.0f}% ceiling) | {j_med:.1f} ({pct(j_med):.0f}% ceiling) | "
          f"{t_med / j_med:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"teacher": a.teacher, "student": a.student, "batch": a.batch, "ceiling_flops": ceiling,
                       "flops": captured["flops"], "torch": torch.__version__, "jax": jax.__version__,
                       "torch_threads": torch.get_num_threads(), "jax_devices": len(jax.devices()), "rounds": rows,
                       "torch_median_ms": t_med, "jax_median_ms": j_med, "load_average_before": load}, f, indent=1)


if __name__ == "__main__":
    main()
