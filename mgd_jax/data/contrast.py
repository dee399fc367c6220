"""CRD's sample indices: for each example its dataset index and [positive, K negatives from other classes]
(SPEC_BASELINES §2.7, ``CIFAR100IdxSample``), a pure function of (seed, epoch, pass, step)."""
from __future__ import annotations

import numpy as np


class ContrastSampler:
    def __init__(self, labels: np.ndarray, k: int, mode: str = "exact", seed: int = 0):
        if mode not in ("exact", "relax"):
            raise ValueError(f"CRD mode must be 'exact' or 'relax', got {mode!r}")
        self.labels = np.asarray(labels)
        self.k, self.mode, self.seed = int(k), mode, int(seed)
        classes = np.unique(self.labels)
        self.positives = {c: np.flatnonzero(self.labels == c) for c in classes}
        self.negatives = {c: np.flatnonzero(self.labels != c) for c in classes}

    def __call__(self, idx: np.ndarray, epoch: int, pass_id: int, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, pass_id, step, 0xC4D])
        out = np.empty((len(idx), self.k + 1), np.int32)
        for b, i in enumerate(idx):
            c = self.labels[i]
            out[b, 0] = i if self.mode == "exact" else rng.choice(self.positives[c])
            neg = self.negatives[c]
            out[b, 1:] = neg[rng.choice(len(neg), self.k, replace=self.k > len(neg))]
        return {"index": np.asarray(idx, np.int32), "contrast_idx": out}
