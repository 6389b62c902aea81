"""Checks a model must pass wherever it can go live: the monitor's watcher, `dlsr model promote` / `rollback`.

The trainer's gates judge a candidate's quality; these checks only refuse what cannot serve: a registry entry
with an impossible alpha or threshold, weights or calibration scores that are not finite, a model that scores
its probe batch as NaN, or one that no longer scores its stored reference sample as it did when it was
calibrated (the weights were swapped after calibration).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dlsr_monitor.common.registry import ModelEntry

if TYPE_CHECKING:
    from dlsr.base import BaseDetector

_VERSION = re.compile(r"^v[0-9]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PROBE_ROWS = 16
REFERENCE_RTOL = 1e-3


class ModelRefusedError(ValueError):
    """A model that must not go live; `problems` lists why (one short phrase each)."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{what} refused: {'; '.join(problems)}")


def entry_problems(entry: ModelEntry) -> list[str]:
    """What makes a registry entry unusable (empty when it is fine)."""
    out = []
    if not _VERSION.match(entry.version or ""):
        out.append(f"version {entry.version!r} is not v<number>")
    if not _SHA256.match(entry.sha256 or ""):
        out.append("sha256 is not 64 hex digits")
    if not (math.isfinite(entry.alpha) and 0.0 < entry.alpha < 1.0):
        out.append(f"alpha {entry.alpha!r} is not in (0, 1)")
    if not math.isfinite(entry.threshold):
        out.append(f"threshold {entry.threshold!r} is not finite")
    return out


def detector_problems(detector: BaseDetector) -> list[str]:
    """What makes a loaded detector unusable: non-finite weights, calibration or scores on its probe batch and
    on its stored reference sample (when the artifact has one)."""
    out = []
    state = getattr(detector, "state_tensors", None)
    if callable(state):
        for name, tensor in state().items():
            values = tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
            if values.size and not np.isfinite(values).all():
                out.append(f"weights {name!r} are not finite")
    cal = getattr(detector, "calibration_scores", None)
    if cal is not None and len(cal) and not np.isfinite(np.asarray(cal, dtype=np.float64)).all():
        out.append("calibration scores are not finite")
    threshold = getattr(detector, "threshold", None)
    if threshold is not None and getattr(detector, "is_calibrated", True) and not math.isfinite(float(threshold)):
        out.append(f"threshold {threshold!r} is not finite")
    dim = getattr(detector, "dim", None)
    if out or not dim or not getattr(detector, "is_fitted", False):
        return out
    probe = np.random.default_rng(0).standard_normal((PROBE_ROWS, int(dim))).astype(np.float32)
    try:
        scores = np.asarray(detector.score(probe), dtype=np.float64)
    except Exception as exc:  # a model that cannot score is as unusable as one that scores NaN
        return [*out, f"cannot score a probe batch ({type(exc).__name__}: {exc})"]
    if not np.isfinite(scores).all():
        out.append(f"scores {int((~np.isfinite(scores)).sum())}/{len(scores)} probe rows as non-finite")
    ref_x = getattr(detector, "reference_features", None)
    ref_s = getattr(detector, "reference_scores", None)
    if ref_x is not None and ref_s is not None and len(ref_x):
        again = np.asarray(detector.score(np.asarray(ref_x, dtype=np.float32)), dtype=np.float64)
        want = np.asarray(ref_s, dtype=np.float64)
        if not np.allclose(again, want, rtol=REFERENCE_RTOL, atol=1e-6):
            worst = float(np.max(np.abs(again - want)))
            out.append(f"no longer scores its reference sample as calibrated (max difference {worst:.3g})")
    return out


def load_checked(
    path: str | Path, *, device: str = "cpu", runtime: str | None = None, runtime_options: dict | None = None
) -> BaseDetector:
    """`dlsr.artifacts.load_detector`, then `detector_problems`: ModelRefusedError when it cannot serve.

    `runtime` (the settings' model.runtime): a model calibrated in another runtime is refused (ArtifactError
    naming both), never served with features it was not calibrated on.
    """
    from dlsr.artifacts import load_detector  # torch: only where a model is really loaded

    detector = load_detector(path, device=device, runtime=runtime, runtime_options=runtime_options)
    problems = detector_problems(detector)
    if problems:
        raise ModelRefusedError(f"artifact {Path(path).name}", problems)
    return detector
