"""Conformal calibration: a threshold with a finite-sample false-alarm guarantee, and p-values.

With n held-out in-distribution scores s_1..s_n and a new exchangeable ID score s, flagging s when it is above
the k-th smallest calibration score q_k flags it with probability 1 - k / (n + 1), on average over calibration
draws (docs/METHOD.md section 4). Two ways to choose k:

- "marginal": k = ceil((n + 1)(1 - alpha)), so P(s > q_k) <= alpha on average over calibration draws.
- "pac" (training-conditional, Vovk 2012): the false-alarm rate this one calibration set realises,
  FA = 1 - F(q_k), is distributed Beta(n - k + 1, k) (F(q_k) is the k-th uniform order statistic), so the
  smallest k with P(FA > alpha) <= delta makes FA <= alpha hold for this calibration set with probability at
  least 1 - delta. P(Beta(n - k + 1, k) > alpha) = P(Binomial(n, alpha) <= n - k).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
from scipy.special import bdtr, betaincinv

from dlsr.exceptions import CalibrationWarning

CalibrationMethod = Literal["marginal", "pac"]
CALIBRATION_METHODS: tuple[str, ...] = ("marginal", "pac")
DEFAULT_DELTA = 0.1


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


def check_delta(delta: float) -> float:
    """Return delta as a float, or raise ValueError when it is not in (0, 1)."""
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be a number in (0, 1); got {delta!r}") from None
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ValueError(
            f"delta must be in (0, 1), the chance that a calibration set misses alpha (e.g. 0.1); got {delta!r}"
        )
    return value


def check_method(method: str) -> str:
    """Return the calibration method, or raise ValueError naming the known ones."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {list(CALIBRATION_METHODS)}")
    return str(method)


def _as_scores(scores: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty: pass at least one held-out in-distribution score")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values; check the model and the inputs")
    return arr


def conformal_rank(n: int, alpha: float) -> int:
    """The 1-based rank k = ceil((n + 1)(1 - alpha)) of the marginal threshold among n calibration scores."""
    alpha = check_alpha(alpha)
    # The small epsilon keeps e.g. (99 + 1) * (1 - 0.01) = 99.00000000000001 from rounding up to 100.
    return int(math.ceil((n + 1) * (1.0 - alpha) - 1e-9))


def pac_rank(n: int, alpha: float, delta: float = DEFAULT_DELTA) -> int:
    """The smallest 1-based rank k with P(Binomial(n, alpha) <= n - k) <= delta, i.e. P(FA > alpha) <= delta.

    Returns n + 1 when no k <= n qualifies ((1 - alpha)^n > delta: too few scores; see `min_calibration_size`).
    """
    alpha, delta = check_alpha(alpha), check_delta(delta)
    if n < 1:
        return n + 1
    # cdf[j] = P(Binom(n, alpha) <= j) rises with j; k = n - j for the largest j with cdf[j] <= delta.
    cdf = bdtr(np.arange(n + 1), n, alpha)
    j = int(np.searchsorted(cdf, delta, side="right")) - 1  # -1 when even cdf[0] = (1 - alpha)^n > delta
    return n - j if j >= 0 else n + 1


def calibration_rank(n: int, alpha: float, *, method: str = "marginal", delta: float = DEFAULT_DELTA) -> int:
    """The rank of the threshold among n calibration scores for `method` (n + 1 or more: no finite threshold)."""
    return pac_rank(n, alpha, delta) if check_method(method) == "pac" else conformal_rank(n, alpha)


def min_calibration_size(alpha: float, *, method: str = "marginal", delta: float = DEFAULT_DELTA) -> int:
    """Fewest calibration scores that give a finite threshold: marginal ceil((1 - alpha) / alpha), pac
    ceil(log(delta) / log(1 - alpha)) (the largest score as threshold misses alpha with chance (1 - alpha)^n)."""
    alpha = check_alpha(alpha)
    if check_method(method) == "pac":
        delta = check_delta(delta)
        n = max(1, int(math.ceil(math.log(delta) / math.log1p(-alpha) - 1e-9)))
        while pac_rank(n, alpha, delta) > n:  # guards the rounding of the closed form
            n += 1
        return n
    return max(1, int(math.ceil((1.0 - alpha) / alpha - 1e-9)))


def conformal_threshold(
    cal_scores: np.ndarray, alpha: float, *, method: str = "marginal", delta: float = DEFAULT_DELTA
) -> float:
    """Threshold = the k-th smallest calibration score; flag a score when it is above it.

    Args:
        cal_scores: (n,) held-out in-distribution scores (higher = more OOD).
        alpha: target false-alarm rate in (0, 1).
        method: "marginal" (k = ceil((n+1)(1-alpha)): FA <= alpha on average over calibration sets) or "pac"
            (FA <= alpha for this calibration set with probability >= 1 - delta).
        delta: the pac method's allowed chance of a calibration set whose false-alarm rate exceeds alpha.

    Returns:
        The threshold. When the rank exceeds n the calibration set is too small for alpha (and delta); the
        threshold is then +inf (nothing is flagged) and a CalibrationWarning says how many scores are needed.
    """
    alpha, method = check_alpha(alpha), check_method(method)
    delta = check_delta(delta)
    cal = _as_scores(cal_scores, "cal_scores")
    n = cal.size
    k = calibration_rank(n, alpha, method=method, delta=delta)
    if k > n:
        needed = min_calibration_size(alpha, method=method, delta=delta)
        asked = f"alpha={alpha}" + (f" with delta={delta} (pac)" if method == "pac" else "")
        warnings.warn(
            f"{n} calibration scores cannot guarantee {asked}: need at least {needed}; "
            "the threshold is +inf, so nothing will be flagged",
            CalibrationWarning,
            stacklevel=2,
        )
        return math.inf
    return float(np.partition(cal, k - 1)[k - 1])


def false_alarm_bound(n: int, k: int, delta: float = DEFAULT_DELTA) -> float:
    """Upper 1 - delta bound of the false-alarm rate of the k-th smallest of n calibration scores.

    The realised rate is Beta(n - k + 1, k); this is its 1 - delta quantile. It is also the Clopper-Pearson
    upper bound for n - k flags among n, so for any threshold pass k = #{scores <= threshold}. k > n (a +inf
    threshold) gives 0.
    """
    delta = check_delta(delta)
    n, k = int(n), int(k)
    if n < 1 or k < 0:
        raise ValueError(f"need n >= 1 and k >= 0 calibration scores; got n={n}, k={k}")
    if k > n:
        return 0.0
    if k == 0:
        return 1.0  # every calibration score is over the threshold: nothing bounds the rate below 1
    return float(betaincinv(n - k + 1, k, 1.0 - delta))


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
