"""Drift: is a source's OOD-flag rate above what in-distribution data produces? Pure code, no I/O.

Under ID data each image is flagged OOD with probability at most alpha (the conformal guarantee). Over a sliding
window of n images with k flags we test H0: rate <= p0 with the exact one-sided binomial tail
P(X >= k | n, p0). p0 is the `null_rate` the service derives from the model's calibration (the upper 1 - delta
bound of the false-alarm rate this calibration set realises, `dlsr.calibration.false_alarm_bound`), unless a
`null_factor` overrides it with alpha x null_factor (the former fixed margin). Hysteresis: raise when the p-value falls below `raise_p`, clear only when it climbs back
above `clear_p` (much larger), so a source near the boundary does not flap.

False-alarm budget: one evaluation raises falsely with probability <= raise_p; a clean stream of N images
evaluated after every image raises with probability <= N x raise_p (union bound, very loose because successive
windows overlap): 1e-6 gives <= 0.1 over 100k images, and the unit tests see none.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

DriftState = Literal["ok", "raised"]

#: The null's margin over alpha when neither a factor nor a calibration bound is given (offline use, tests).
DEFAULT_NULL_FACTOR = 2.0


@lru_cache(maxsize=65536)
def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sum of the pmf, stopped when terms vanish)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)

    def log_pmf(i: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq

    def tail(start: int, stop: int, step: int) -> float:
        # Terms fall monotonically away from the mode, so stop once they no longer matter.
        total, i = 0.0, start
        first = log_pmf(start)
        while (step > 0 and i <= stop) or (step < 0 and i >= stop):
            term = math.exp(log_pmf(i) - first)
            total += term
            if term < 1e-17 * total:
                break
            i += step
        return math.exp(first) * total

    mean = n * p
    if k > mean:
        return min(1.0, tail(k, n, 1))
    return max(0.0, 1.0 - tail(k - 1, 0, -1))


@dataclass(frozen=True)
class DriftDecision:
    """Outcome of one evaluation: the new state, whether it changed, and the window's test statistic."""

    state: DriftState
    changed: bool
    p_value: float
    images: int
    ood: int
    rate: float
    null_rate: float


@dataclass(frozen=True)
class DriftTest:
    """One-sided binomial test of a window's OOD-flag rate with hysteresis.

    Args:
        alpha: the detector's target false-alarm rate (per image).
        null_factor: override: H0 rate = alpha x null_factor (>= 1).
        raise_p: raise when the window's p-value < raise_p.
        clear_p: clear when the p-value > clear_p (must be > raise_p: that gap is the hysteresis).
        min_images: windows with fewer images keep the current state.
        calibration_null: H0 rate when no null_factor is given: the upper 1 - delta bound of the false-alarm
            rate the model's calibration realises (in (0, 1)). Without either, alpha x `DEFAULT_NULL_FACTOR`.
    """

    alpha: float = 0.01
    null_factor: float | None = None
    raise_p: float = 1e-6
    clear_p: float = 0.05
    min_images: int = 50
    calibration_null: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.null_factor is not None and self.null_factor < 1.0:
            raise ValueError(f"null_factor must be >= 1, got {self.null_factor}")
        if self.calibration_null is not None and not 0.0 < self.calibration_null < 1.0:
            raise ValueError(f"calibration_null must be in (0, 1), got {self.calibration_null}")
        if not 0.0 < self.raise_p < self.clear_p < 1.0:
            raise ValueError(f"need 0 < raise_p < clear_p < 1, got raise_p={self.raise_p}, clear_p={self.clear_p}")

    @property
    def null_rate(self) -> float:
        """H0's OOD-flag rate: alpha x null_factor when set (the override), else the calibration's bound."""
        if self.null_factor is None and self.calibration_null is not None:
            return min(self.calibration_null, 0.999999)
        factor = DEFAULT_NULL_FACTOR if self.null_factor is None else self.null_factor
        return min(self.alpha * factor, 0.999999)

    def evaluate(self, state: DriftState, images: int, ood: int) -> DriftDecision:
        """Decide the next state of a source whose window holds `images` images, `ood` of them flagged."""
        p0 = self.null_rate
        pv = binom_sf(int(ood), int(images), round(p0, 12)) if images > 0 else 1.0
        new: DriftState = state
        if images >= self.min_images:
            if state == "ok" and pv < self.raise_p:
                new = "raised"
            elif state == "raised" and pv > self.clear_p:
                new = "ok"
        rate = ood / images if images else 0.0
        return DriftDecision(new, new != state, pv, int(images), int(ood), rate, p0)


class SlidingDrift:
    """A count-based sliding window of OOD flags for one source, for offline use and tests.

    The service uses `DriftTest.evaluate` on the shared Redis window counts instead, so replicas agree.
    """

    def __init__(self, test: DriftTest, window: int = 500) -> None:
        if window < test.min_images:
            raise ValueError(f"window ({window}) must hold at least min_images ({test.min_images})")
        self.test = test
        self.window = window
        self._flags: deque[bool] = deque(maxlen=window)
        self._ood = 0
        self.state: DriftState = "ok"

    def update(self, is_ood: bool) -> DriftDecision:
        """Add one flag; return the decision after it (`changed` marks a raise or a clear)."""
        if len(self._flags) == self.window:
            self._ood -= self._flags[0]
        self._flags.append(bool(is_ood))
        self._ood += bool(is_ood)
        decision = self.test.evaluate(self.state, len(self._flags), self._ood)
        self.state = decision.state
        return decision

    def reset_state(self) -> None:
        """Forget the window and return to 'ok'."""
        self._flags.clear()
        self._ood = 0
        self.state = "ok"
