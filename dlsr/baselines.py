"""Baselines on the same frozen features, behind the same Detector interface (docs/METHOD.md section 6).

- `KNNDetector`: unsupervised kNN (Sun et al. 2022): cosine distance to the k-th nearest training feature,
  all features L2-normalised. Per stage: the same within each stage's dims (each slice L2-normalised).
- `MahalanobisDetector`: one Gaussian over all ID features (no labels), covariance shrunk towards a scaled
  identity (Ledoit-Wolf or a fixed amount), score = squared Mahalanobis distance. Per stage: one more such
  Gaussian per stage, fitted at the same time on that stage's dims.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Unpack

import torch
import torch.nn.functional as F
from torch import Tensor

from dlsr.base import BaseDetector, BaseOptions, pad_rows, register_detector, segments

if TYPE_CHECKING:
    from dlsr.encoder import Encoder


@register_detector
class KNNDetector(BaseDetector):
    """Score = 1 - cosine similarity to the k-th nearest training feature (higher = more OOD).

    Args:
        k: which neighbour (Sun et al. use k = 50 for CIFAR-10 with the full training set).
        chunk_size: rows per block of the similarity matmul, so e.g. 10k queries x 50k bank never materialise
            a full similarity matrix (memory ~ chunk_size x bank_chunk x 4 bytes).
        min_batch: tiny query batches are zero-padded to this many rows (batch-size-independent scores).
        base: device, boundaries, batch sizes, progress (`BaseOptions`, see `BaseDetector`).
    """

    kind: ClassVar[str] = "knn"
    default_score_batch_size: ClassVar[int] = 4096

    def __init__(
        self,
        encoder: Encoder | None = None,
        *,
        k: int = 50,
        chunk_size: int = 4096,
        min_batch: int = 16,
        **base: Unpack[BaseOptions],
    ) -> None:
        super().__init__(encoder, **base)
        if k < 1 or chunk_size < 1:
            raise ValueError(f"k and chunk_size must be >= 1; got k={k}, chunk_size={chunk_size}")
        self.k, self.chunk_size, self.min_batch = int(k), int(chunk_size), max(1, int(min_batch))
        self.bank: Tensor | None = None  # (N, D) L2-normalised training features
        self._stage_scale: Tensor | None = None  # (N, S): 1 / norm of each stage's slice of each bank row

    @property
    def is_fitted(self) -> bool:
        return self.bank is not None

    @property
    def has_stage_scores(self) -> bool:
        return self.is_fitted  # derived from the bank: older artifacts have them too

    def _fit_tensor(self, x: Tensor, *, progress: bool, warm_start: bool = False) -> None:
        if self.k > x.shape[0] + (self.bank.shape[0] if warm_start and self.bank is not None else 0):
            raise ValueError(f"k={self.k} needs at least {self.k} training samples; got {x.shape[0]}")
        bank = F.normalize(x.float(), dim=1)
        if warm_start and self.bank is not None:
            bank = torch.cat([self.bank, bank], dim=0)
        self.bank = bank.contiguous()
        self._stage_scale = None

    def _kth_distance(self, q: Tensor, lo: int, hi: int, scale: Tensor | None) -> Tensor:
        """1 - the k-th largest cosine similarity of unit rows q (N, hi - lo) to bank columns lo:hi.

        `scale` (N_bank,) rescales those bank slices to unit length (per-stage scores); None = the whole row.
        """
        assert self.bank is not None
        full = lo == 0 and hi == self.bank.shape[1]
        out = torch.empty(q.shape[0], dtype=torch.float64, device=q.device)
        for i in range(0, q.shape[0], self.chunk_size):
            n = min(self.chunk_size, q.shape[0] - i)
            qi = pad_rows(q[i : i + n], self.min_batch)  # same BLAS kernel whatever the batch size
            best: Tensor | None = None  # running top-k similarities (largest), (n, k)
            for j in range(0, self.bank.shape[0], self.chunk_size):
                part = self.bank[j : j + self.chunk_size]
                sims = qi @ (part if full else part[:, lo:hi]).T
                if scale is not None:
                    sims = sims * scale[j : j + self.chunk_size]
                cand = sims if best is None else torch.cat([best, sims], dim=1)
                best = torch.topk(cand, min(self.k, cand.shape[1]), dim=1).values
            assert best is not None
            out[i : i + n] = 1.0 - best[:n, self.k - 1].double()
        return out

    @torch.no_grad()
    def _score_tensor(self, x: Tensor) -> Tensor:
        assert self.bank is not None
        return self._kth_distance(F.normalize(x.float(), dim=1), 0, int(self.bank.shape[1]), None)

    def _stage_scales(self) -> Tensor:
        assert self.bank is not None
        if self._stage_scale is None:
            segs = segments(self.boundaries or (0, int(self.bank.shape[1])))
            norms = torch.stack([self.bank[:, lo:hi].norm(dim=1) for lo, hi in segs], dim=1)
            self._stage_scale = (1.0 / norms.clamp_min(1e-12)).contiguous()
        return self._stage_scale

    @torch.no_grad()
    def _score_tensor_stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.bank is not None
        scale = self._stage_scales()
        segs = segments(self.boundaries or (0, int(self.bank.shape[1])))
        per_stage = [
            self._kth_distance(F.normalize(x[:, lo:hi].float(), dim=1), lo, hi, scale[:, s])
            for s, (lo, hi) in enumerate(segs)
        ]
        return self._score_tensor(x), torch.stack(per_stage, dim=1)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "chunk_size": self.chunk_size,
            "min_batch": self.min_batch,
            **super().hyperparameters(),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        self._require_fitted()
        assert self.bank is not None
        return {"bank": self.bank.detach().cpu().contiguous()}

    def _load_state(self, tensors: dict[str, Tensor]) -> None:
        self.bank = tensors["bank"].to(self.device, torch.float32).clone().contiguous()
        self._stage_scale = None


def ledoit_wolf_shrinkage(xc: Tensor) -> float:
    """Ledoit-Wolf (2004) optimal shrinkage of the sample covariance towards mu I, for centred data (n, p).

    Same estimator as scikit-learn's `ledoit_wolf_shrinkage` (float64).
    """
    n, p = xc.shape
    x = xc.double()
    x2 = x * x
    emp_cov_trace = x2.sum(dim=0) / n
    mu = float(emp_cov_trace.sum()) / p
    beta_ = float((x2.T @ x2).sum())
    delta_ = float(((x.T @ x) ** 2).sum()) / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(emp_cov_trace.sum()) + p * mu**2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


@register_detector
class MahalanobisDetector(BaseDetector):
    """Squared Mahalanobis distance to one Gaussian fitted on all ID features (higher = more OOD).

    Args:
        shrinkage: "ledoit_wolf" (data-driven) or a fixed amount in [0, 1]:
            cov = (1 - s) S + s (tr(S) / p) I, which keeps the inverse stable when D is large for n.
        base: device, boundaries, batch sizes, progress (`BaseOptions`, see `BaseDetector`).
    """

    kind: ClassVar[str] = "mahalanobis"
    default_score_batch_size: ClassVar[int] = 4096

    def __init__(
        self,
        encoder: Encoder | None = None,
        *,
        shrinkage: str | float = "ledoit_wolf",
        **base: Unpack[BaseOptions],
    ) -> None:
        super().__init__(encoder, **base)
        if isinstance(shrinkage, str):
            if shrinkage != "ledoit_wolf":
                raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1]; got {shrinkage!r}")
        elif not 0.0 <= float(shrinkage) <= 1.0:
            raise ValueError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1]; got {shrinkage!r}")
        self.shrinkage: str | float = shrinkage if isinstance(shrinkage, str) else float(shrinkage)
        self.shrinkage_used: float | None = None
        self.mean: Tensor | None = None  # (D,) float64
        self.precision: Tensor | None = None  # (D, D) float64
        # One Gaussian per stage (per-stage scores): (C_l,) means and (C_l, C_l) precisions, float64.
        self.stage_means: list[Tensor] | None = None
        self.stage_precisions: list[Tensor] | None = None
        self.stage_shrinkage_used: list[float] | None = None

    @property
    def is_fitted(self) -> bool:
        return self.precision is not None

    @property
    def has_stage_scores(self) -> bool:
        return self.stage_precisions is not None  # None for an artifact saved before they existed

    def _gaussian(self, xd: Tensor, what: str) -> tuple[Tensor, Tensor, float]:
        """(mean, precision, shrinkage) of float64 rows, the covariance shrunk towards a scaled identity."""
        mean = xd.mean(dim=0)
        xc = xd - mean
        n, p = xc.shape
        cov = (xc.T @ xc) / n
        s = ledoit_wolf_shrinkage(xc) if self.shrinkage == "ledoit_wolf" else float(self.shrinkage)
        mu = float(torch.trace(cov)) / p
        shrunk = (1.0 - s) * cov + s * mu * torch.eye(p, dtype=torch.float64, device=xd.device)
        try:
            chol = torch.linalg.cholesky(shrunk)
        except RuntimeError as exc:
            raise ValueError(
                f"the {what} covariance is singular (shrinkage {s:g}); use a larger fixed shrinkage, e.g. 0.1"
            ) from exc
        # contiguous: the saved copy is row-major, and BLAS rounds differently for a transposed operand.
        return mean.contiguous(), torch.cholesky_inverse(chol).contiguous(), s

    def _fit_tensor(self, x: Tensor, *, progress: bool, warm_start: bool = False) -> None:
        # Float64 throughout: the covariance of z-scored features can be ill-conditioned.
        xd = x.double()
        mean, precision, s = self._gaussian(xd, "feature")
        stages = [
            self._gaussian(xd[:, lo:hi].contiguous(), f"stage {i + 1}")
            for i, (lo, hi) in enumerate(segments(self.boundaries or (0, int(x.shape[1]))))
        ]
        self.mean, self.precision, self.shrinkage_used = mean, precision, s
        self.stage_means = [m for m, _, _ in stages]
        self.stage_precisions = [p for _, p, _ in stages]
        self.stage_shrinkage_used = [s for _, _, s in stages]

    @torch.no_grad()
    def _score_tensor(self, x: Tensor) -> Tensor:
        assert self.mean is not None and self.precision is not None
        d = x.double() - self.mean
        return ((d @ self.precision) * d).sum(dim=1)

    @torch.no_grad()
    def _score_tensor_stages(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.stage_means is not None and self.stage_precisions is not None and self.boundaries is not None
        xd = x.double()
        per_stage = []
        for (lo, hi), mean, precision in zip(
            segments(self.boundaries), self.stage_means, self.stage_precisions, strict=True
        ):
            d = xd[:, lo:hi] - mean
            per_stage.append(((d @ precision) * d).sum(dim=1))
        return self._score_tensor(x), torch.stack(per_stage, dim=1)

    def hyperparameters(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage, **super().hyperparameters()}

    def state_tensors(self) -> dict[str, Tensor]:
        self._require_fitted()
        assert self.mean is not None and self.precision is not None
        out = {"mean": self.mean.cpu().contiguous(), "precision": self.precision.cpu().contiguous()}
        for i, (m, p) in enumerate(zip(self.stage_means or (), self.stage_precisions or (), strict=True)):
            out[f"stage.{i}.mean"], out[f"stage.{i}.precision"] = m.cpu().contiguous(), p.cpu().contiguous()
        return out

    def _load_state(self, tensors: dict[str, Tensor]) -> None:
        self.mean = tensors["mean"].to(self.device, torch.float64).clone()
        self.precision = tensors["precision"].to(self.device, torch.float64).clone().contiguous()
        self.stage_means = self.stage_precisions = None  # an artifact saved before per-stage Gaussians
        n = len(self.boundaries) - 1 if self.boundaries is not None else 0
        if n and all(f"stage.{i}.precision" in tensors for i in range(n)):
            self.stage_means = [tensors[f"stage.{i}.mean"].to(self.device, torch.float64).clone() for i in range(n)]
            self.stage_precisions = [
                tensors[f"stage.{i}.precision"].to(self.device, torch.float64).clone().contiguous() for i in range(n)
            ]
