"""Trainer test fixtures: real Redis with a per-test prefix, a temp store, and a fast fake method (ModelOps).

The fake "images" are float32 vectors serialised to bytes, and the fake detector is a z-score distance, so a job
runs in milliseconds; tests/integration/test_trainer_*.py use the real dlsr method.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dlsr.calibration import calibration_rank
from dlsr_monitor.common.registry import Registry
from dlsr_monitor.trainer.intake import VettedStore
from dlsr_monitor.trainer.job import JobConfig, JobContext

DIM = 8


def conformal(cal: np.ndarray, alpha: float, method: str = "marginal", delta: float = 0.1) -> float:
    s = np.sort(cal)
    k = calibration_rank(s.size, alpha, method=method, delta=delta)
    return float(s[k - 1]) if k <= s.size else float("inf")


class FakeDetector:
    def __init__(self, mean: np.ndarray, std: np.ndarray, nan: bool = False) -> None:
        self.mean, self.std, self.nan = mean, std, nan
        self.threshold = float("nan")
        self.alpha = float("nan")
        self.calibration_method, self.delta = "marginal", None
        self.calibration_scores = np.zeros(0)

    def score(self, x: np.ndarray) -> np.ndarray:
        s = (((x - self.mean) / self.std) ** 2).mean(axis=1)
        return np.full_like(s, np.nan) if self.nan else s

    def calibrate(self, features: np.ndarray | None = None, *, scores: np.ndarray | None = None,
                  alpha: float, method: str = "marginal", delta: float = 0.1) -> FakeDetector:
        scores = self.score(features) if scores is None else scores
        self.calibration_scores = np.asarray(scores, dtype=np.float64)
        self.alpha, self.calibration_method, self.delta = alpha, method, delta
        self.threshold = conformal(self.calibration_scores, alpha, method, delta)
        return self

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True)
        np.save(path / "mean.npy", self.mean)
        np.save(path / "std.npy", self.std)
        np.save(path / "cal.npy", self.calibration_scores)
        (path / "meta.json").write_text(json.dumps({"threshold": self.threshold, "alpha": self.alpha}))
        # dlsr's artifact layout: a manifest pinning every file by sha256 (what the registry digests/verifies)
        (path / "weights.safetensors").write_bytes(b"fake")  # the file name dlsr manifests must list
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}
        (path / "manifest.json").write_text(json.dumps({"format_version": 1, "files": files}, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path) -> FakeDetector:
        d = cls(np.load(path / "mean.npy"), np.load(path / "std.npy"))
        d.calibration_scores = np.load(path / "cal.npy")
        meta = json.loads((path / "meta.json").read_text())
        d.threshold, d.alpha = meta["threshold"], meta["alpha"]
        return d


class FakeOps:
    """ModelOps over float32-vector 'images'."""

    def __init__(self) -> None:
        self.nan = False
        self.fits: list[bool] = []  # warm-started or not, per fit
        self.encoded = 0

    def features(self, images, *, progress: bool = True) -> np.ndarray:
        rows = [np.frombuffer(item.data[: DIM * 4], dtype=np.float32) for item in images]
        self.encoded += len(rows)
        return np.stack(rows).astype(np.float32)

    def fit(self, features: np.ndarray, *, warm_from=None, progress: bool = True) -> FakeDetector:
        self.fits.append(warm_from is not None)
        return FakeDetector(features.mean(0), features.std(0) + 1e-6, nan=self.nan)

    def load(self, path: Path) -> FakeDetector:
        return FakeDetector.load(path)

    def can_warm_start(self, old) -> bool:
        return True

    def identity(self) -> dict:
        return {"name": "fake", "dim": DIM}


def vectors(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> list[tuple[bytes, str]]:
    """n distinct fake images (the trailing tag keeps equal vectors distinct)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = (rng.standard_normal(DIM) * scale + shift).astype(np.float32)
        out.append((v.tobytes() + f"|{seed}:{i}".encode(), "test"))
    return out


@pytest.fixture
def ctx(rkeys, tmp_path) -> JobContext:
    client, keys = rkeys
    alerts: list = []
    baseline: list = []
    c = JobContext(
        redis=client,
        keys=keys,
        registry=Registry(client, keys, tmp_path / "store"),
        store=VettedStore(tmp_path / "vetted"),
        ops=FakeOps(),
        config=JobConfig(alpha=0.05, reference_size=100),
        on_alert=alerts.append,
        add_baseline=lambda v, s: baseline.append((v, s)),
    )
    c.alerts = alerts  # type: ignore[attr-defined]
    c.baseline = baseline  # type: ignore[attr-defined]
    return c
