"""Synthetic features for the dlsr model tests: low-rank ID cluster vs a different low-rank OOD cluster."""

from __future__ import annotations

import numpy as np

D = 64
BOUNDARIES = (0, 8, 16, 24, 40, 64)


def clusters(n_id: int = 1200, n_ood: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ID: points near an 8-dim subspace; OOD: points near another one. Each layer z-scored like the encoder."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(8, D))
    b = rng.normal(size=(8, D))
    x_id = rng.normal(size=(n_id, 8)) @ a + 0.3 * rng.normal(size=(n_id, D))
    x_ood = rng.normal(size=(n_ood, 8)) @ b + 0.3 * rng.normal(size=(n_ood, D))
    return zscore(x_id).astype(np.float32), zscore(x_ood).astype(np.float32)


def zscore(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for lo, hi in zip(BOUNDARIES[:-1], BOUNDARIES[1:], strict=True):
        seg = x[:, lo:hi]
        out[:, lo:hi] = (seg - seg.mean(1, keepdims=True)) / (seg.std(1, keepdims=True) + 1e-5)
    return out
