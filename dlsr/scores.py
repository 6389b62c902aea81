"""Reconstruction scores of DLSR (docs/METHOD.md section 3): features vs reconstruction, higher = more OOD.

Each score takes (z0, rec, boundaries): (N, D) features, their (N, D) reconstruction and the cumulative layer
offsets (0, b1, ..., D), and returns (N,) float64 scores. `STAGE_SCORES` give the same errors per layer,
(N, S) float64, from the same reconstruction (`STAGE_KIND` names the one behind each score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Score = Callable[[Tensor, Tensor, Sequence[int]], Tensor]


def _segments(boundaries: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]


def mse_score(z0: Tensor, rec: Tensor, boundaries: Sequence[int]) -> Tensor:
    """Mean squared reconstruction error over all dims (the official code sums; a mean ranks the same)."""
    return torch.mean((z0.double() - rec.double()) ** 2, dim=1)


def _mfsim(z0: Tensor, rec: Tensor, boundaries: Sequence[int], skip_first: bool) -> Tensor:
    segs = _segments(boundaries)[1 if skip_first else 0 :]
    a, b = z0.double(), rec.double()
    sims = [F.cosine_similarity(a[:, lo:hi], b[:, lo:hi], dim=1, eps=1e-12) for lo, hi in segs]
    return -torch.stack(sims, dim=0).mean(dim=0)


def mfsim5_score(z0: Tensor, rec: Tensor, boundaries: Sequence[int]) -> Tensor:
    """Minus the mean per-layer cosine similarity over all layers (the paper's MFsim)."""
    return _mfsim(z0, rec, boundaries, skip_first=False)


def mfsim4_score(z0: Tensor, rec: Tensor, boundaries: Sequence[int]) -> Tensor:
    """Minus the mean per-layer cosine similarity over layers 2..L, skipping the first (the official code)."""
    return _mfsim(z0, rec, boundaries, skip_first=True)


SCORES: dict[str, Score] = {
    "mse": mse_score,
    "mfsim5": mfsim5_score,
    "mfsim4": mfsim4_score,
}


# -- per-stage errors (the evidence behind a score: which stage reconstructs badly) ---------------------------


def mse_stages(z0: Tensor, rec: Tensor, boundaries: Sequence[int]) -> Tensor:
    """Mean squared reconstruction error within each layer: (N, S) float64 (their C_l-weighted mean is MSE)."""
    err = (z0.double() - rec.double()) ** 2
    return torch.stack([err[:, lo:hi].mean(dim=1) for lo, hi in _segments(boundaries)], dim=1)


def cosine_stages(z0: Tensor, rec: Tensor, boundaries: Sequence[int]) -> Tensor:
    """1 - cos(z0^(l), r^(l)) per layer: (N, S) float64 (MFsim5 = mean over layers - 1, MFsim4 skips layer 1)."""
    a, b = z0.double(), rec.double()
    sims = [F.cosine_similarity(a[:, lo:hi], b[:, lo:hi], dim=1, eps=1e-12) for lo, hi in _segments(boundaries)]
    return 1.0 - torch.stack(sims, dim=1)


#: The per-stage error behind each score: MSE -> squared error per layer, MFsim -> 1 - cosine per layer (every
#: layer, also for MFsim4, which leaves layer 1 out of its mean only).
STAGE_SCORES: dict[str, Score] = {"mse": mse_stages, "cosine": cosine_stages}
STAGE_KIND: dict[str, str] = {"mse": "mse", "mfsim5": "cosine", "mfsim4": "cosine"}


def check_score_name(name: str, boundaries: Sequence[int] | None = None) -> str:
    """Validate a score name (and that the layer layout supports it); returns the name."""
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose one of {sorted(SCORES)}")
    if name == "mfsim4" and boundaries is not None and len(boundaries) < 3:
        raise ValueError("score 'mfsim4' skips the first layer and needs at least 2 layers; pass boundaries")
    return name
