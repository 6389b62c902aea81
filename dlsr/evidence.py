"""Per-stage evidence: which encoder stages make an image unusual, and what kind of shift that suggests.

A detector's per-stage scores (`BaseDetector.score_stages`: DLSR's reconstruction error per layer, the
baselines' distance within each stage's dims) are turned into conformal p-values, one column per stage, against
the per-stage scores of the same calibration split as the main score (`stage_p_values`). Stage 1 is the
encoder's earliest, highest-resolution map (texture, colour, noise), stage S its last (object semantics).

The shift rule (`shift_of`), documented in docs/METHOD.md section 4 and common/contract.py:

    early = stages 1 .. floor(S/2)          late = stages floor(S/2) + 1 .. S   (the middle stage of an odd S
                                                                                 counts as late)
    a half is significant when its strongest evidence, the smallest p-value in it, is <= alpha
    "low_level" when early is significant and late is not    (e.g. noise, blur, a colour cast)
    "semantic"  when late is significant and early is not    (new content with familiar image statistics)
    "mixed"     otherwise: both halves or neither (and always when S < 2: there is nothing to split)

With Lite0's 5 stages (strides 2, 4, 8, 16, 32): early = stages 1-2, late = stages 3-5. The p-values within a
half are not corrected for multiplicity: the rule describes an image already flagged by the main score, it is
not a test of its own. A NaN p-value counts as significant (maximally unusual, like `p_values` treats a NaN
score).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dlsr.calibration import check_alpha, p_values

Shift = Literal["low_level", "semantic", "mixed"]
SHIFTS: tuple[Shift, ...] = ("low_level", "semantic", "mixed")


def stage_p_values(cal_stage_scores: np.ndarray, stage_scores: np.ndarray) -> np.ndarray:
    """Conformal p-values per stage: column l of `stage_scores` against column l of the calibration scores.

    Args:
        cal_stage_scores: (n, S) per-stage scores of the held-out ID calibration split.
        stage_scores: (N, S) per-stage scores to test (or one (S,) row).

    Returns:
        (N, S) float64 p-values in (0, 1] (`dlsr.calibration.p_values` per column).
    """
    cal = np.asarray(cal_stage_scores, dtype=np.float64)
    s = np.asarray(stage_scores, dtype=np.float64)
    if s.ndim == 1:
        s = s.reshape(1, -1)
    if cal.ndim != 2 or s.ndim != 2 or cal.shape[1] != s.shape[1]:
        raise ValueError(
            f"stage scores must be (N, S) against (n, S) calibration scores; got {s.shape} and {cal.shape}"
        )
    out = np.empty(s.shape, dtype=np.float64)
    for col in range(s.shape[1]):
        out[:, col] = p_values(cal[:, col], s[:, col])
    return out


def early_stages(n_stages: int) -> int:
    """How many of the first stages count as early (low-level): floor(S / 2)."""
    return int(n_stages) // 2


def shift_of(p_stages: np.ndarray, alpha: float) -> Shift:
    """The kind of shift one image's per-stage p-values point to: "low_level", "semantic" or "mixed".

    Args:
        p_stages: (S,) per-stage p-values, stage 1 (low-level) first.
        alpha: significance level (the model's target false-alarm rate).
    """
    alpha = check_alpha(alpha)
    p = np.asarray(p_stages, dtype=np.float64).reshape(-1)
    k = early_stages(p.size)
    if k == 0:
        return "mixed"
    sig = np.isnan(p) | (p <= alpha)
    early, late = bool(sig[:k].any()), bool(sig[k:].any())
    if early and not late:
        return "low_level"
    if late and not early:
        return "semantic"
    return "mixed"


def shifts(p_stages: np.ndarray, alpha: float) -> list[Shift]:
    """`shift_of` for every row of an (N, S) array of per-stage p-values."""
    p = np.asarray(p_stages, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"p_stages must be (N, S); got shape {p.shape}")
    return [shift_of(row, alpha) for row in p]


def shift_fractions(labels: list[str] | np.ndarray) -> dict[str, float]:
    """Fraction of each shift kind among `labels` (every kind present, 0.0 for none; all 0.0 when empty)."""
    labels = list(labels)
    n = len(labels)
    return {kind: (sum(lab == kind for lab in labels) / n if n else 0.0) for kind in SHIFTS}
