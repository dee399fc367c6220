"""SPEC §9: PyTorch SGD (momentum 0.9, coupled weight decay on every trained parameter) + per-epoch MultiStepLR."""
from __future__ import annotations

from typing import Sequence

import optax


def multistep_schedule(lr: float, milestones: Sequence[int], gamma: float, steps_per_epoch: int) -> optax.Schedule:
    """lr_e = lr * gamma^{#milestones <= e} for 0-based epoch e, as a function of the optimizer step."""
    boundaries = {int(m) * int(steps_per_epoch): float(gamma) for m in milestones}
    return optax.piecewise_constant_schedule(float(lr), boundaries)


def sgd(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """``cfg``: lr, momentum, weight_decay, milestones, gamma.

    g <- grad + wd * p ; buf <- momentum * buf + g (buf_0 = g) ; p <- p - lr * buf   (torch.optim.SGD).
    """
    schedule = multistep_schedule(cfg.lr, cfg.milestones, cfg.gamma, steps_per_epoch)
    return optax.chain(
        optax.add_decayed_weights(float(cfg.weight_decay)),
        optax.sgd(schedule, momentum=float(cfg.momentum) or None),
    )
