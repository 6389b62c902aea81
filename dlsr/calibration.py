"""Conformal calibration: a threshold with a finite-sample false-alarm guarantee, and p-values.

With n held-out in-distribution scores s_1..s_n and a new exchangeable ID score s, the rank of s among the
n + 1 scores is uniform, so for k = ceil((n + 1)(1 - alpha)) the k-th smallest calibration score q_k gives
P(s > q_k) <= 1 - k / (n + 1) <= alpha (docs/METHOD.md section 4; Vovk et al., conformal prediction).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from dlsr.exceptions import CalibrationWarning


def check_alpha(alpha: float) -> float:
    """Return alpha as a float, or raise ValueError when it is not in the open interval (0, 1)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(
            f"alpha must be a number in (0, 1), the target false-alarm rate; got {alpha!r}"
        ) from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ValueError(f"alpha must be in (0, 1), the target false-alarm rate (e.g. 0.01); got {alpha!r}")
    return value


def _as_scores(scores: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty: pass at least one held-out in-distribution score")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values; check the model and the inputs")
    return arr


def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank k = ceil((n + 1)(1 - alpha)) of the threshold among n calibration scores."""
    alpha = check_alpha(alpha)
    # The small epsilon keeps e.g. (99 + 1) * (1 - 0.01) = 99.00000000000001 from rounding up to 100.
    return int(math.ceil((n + 1) * (1.0 - alpha) - 1e-9))


def conformal_threshold(cal_scores: np.ndarray, alpha: float) -> float:
    """Threshold = the ceil((n+1)(1-alpha))-th smallest calibration score; flag a score when it is above it.

    Args:
        cal_scores: (n,) held-out in-distribution scores (higher = more OOD).
        alpha: target false-alarm rate in (0, 1).

    Returns:
        The threshold. When ceil((n+1)(1-alpha)) > n the calibration set is too small to guarantee alpha;
        the threshold is then +inf (nothing is flagged) and a CalibrationWarning says how many scores are needed.
    """
    alpha = check_alpha(alpha)
    cal = _as_scores(cal_scores, "cal_scores")
    n = cal.size
    k = conformal_rank(n, alpha)
    if k > n:
        needed = int(math.ceil(1.0 / alpha - 1.0 - 1e-9))
        warnings.warn(
            f"{n} calibration scores cannot guarantee alpha={alpha}: need at least {needed}; "
            "the threshold is +inf, so nothing will be flagged",
            CalibrationWarning,
            stacklevel=2,
        )
        return math.inf
    return float(np.partition(cal, k - 1)[k - 1])


def p_values(cal_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values (1 + #{cal >= s}) / (n + 1): small means unusual for in-distribution data.

    Args:
        cal_scores: (n,) calibration scores.
        scores: (m,) scores to test.

    Returns:
        (m,) float64 p-values in (0, 1].
    """
    cal = np.sort(_as_scores(cal_scores, "cal_scores"))
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = cal.size
    # #{cal >= s} = n - #{cal < s}; searchsorted 'left' counts the values strictly below s.
    at_least = n - np.searchsorted(cal, s, side="left")
    p = (1.0 + at_least) / (n + 1.0)
    # A NaN score is treated as maximally unusual for ID, never as normal.
    return np.where(np.isnan(s), 1.0 / (n + 1.0), p)
