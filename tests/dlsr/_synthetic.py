"""Synthetic features for the dlsr model tests (low-rank ID cluster vs a different low-rank OOD cluster), and a toy
detector for the registry tests."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from dlsr.base import BaseDetector

D = 64
BOUNDARIES = (0, 8, 16, 24, 40, 64)
# A tiny, quick DLSR detector on these features.
TINY = {
    "n_blocks": 2,
    "width": 64,
    "epochs": 12,
    "batch_size": 128,
    "progress": False,
    "boundaries": BOUNDARIES,
}


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


class ToyDetector(BaseDetector):
    """Score = squared distance to the training mean, times `scale`: the smallest complete detector (registry tests).

    Not registered: tests file it with the `registered_toy` fixture (tests/dlsr/conftest.py).
    """

    kind: ClassVar[str] = "toy"

    def __init__(self, encoder: Any = None, *, scale: float = 1.0, **options: Any) -> None:
        super().__init__(encoder, **options)
        self.scale = float(scale)
        self.mean: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def _fit_tensor(self, x: torch.Tensor, *, progress: bool) -> None:
        self.mean = x.double().mean(dim=0)

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mean is not None
        return self.scale * ((x.double() - self.mean) ** 2).sum(dim=1)

    def hyperparameters(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._require_fitted()
        assert self.mean is not None
        return {"mean": self.mean.cpu().contiguous()}

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].to(self.device, torch.float64)
