"""Conformal threshold and p-values: the rank formula, the guarantee (empirically), bad alpha."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlsr.calibration import conformal_rank, conformal_threshold, p_values
from dlsr.exceptions import CalibrationWarning


def test_threshold_is_the_ceil_rank_order_statistic() -> None:
    cal = np.arange(1.0, 100.0)  # 99 scores 1..99
    assert conformal_rank(99, 0.01) == 99  # ceil(100 * 0.99) = 99
    assert conformal_threshold(cal, 0.01) == 99.0
    assert conformal_threshold(cal, 0.1) == 90.0  # ceil(100 * 0.9) = 90
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(cal)
    assert conformal_threshold(shuffled, 0.05) == 95.0


def test_too_few_calibration_scores_give_infinity_with_a_warning() -> None:
    with pytest.warns(CalibrationWarning, match="need at least 99"):
        assert conformal_threshold(np.arange(50.0), 0.01) == math.inf


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), "abc", None])
def test_bad_alpha_names_the_allowed_range(alpha: object) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        conformal_threshold(np.arange(10.0), alpha)  # type: ignore[arg-type]


def test_bad_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        conformal_threshold(np.array([]), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold(np.array([1.0, np.nan]), 0.1)


def test_p_values_formula_with_ties() -> None:
    cal = np.array([1.0, 2.0, 2.0, 3.0])
    p = p_values(cal, np.array([0.0, 2.0, 2.5, 3.0, 9.0, np.nan]))
    # (1 + #{cal >= s}) / (n + 1)
    assert np.allclose(p, [5 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5])


def test_false_alarm_rate_on_fresh_exchangeable_data_is_at_most_alpha() -> None:
    rng = np.random.default_rng(123)
    alpha, n, m, trials = 0.05, 199, 200, 3000
    rates, p_rates = np.empty(trials), np.empty(trials)
    for i in range(trials):
        data = rng.standard_gamma(2.0, size=n + m)  # any continuous distribution
        cal, test = data[:n], data[n:]
        rates[i] = np.mean(test > conformal_threshold(cal, alpha))
        p_rates[i] = np.mean(p_values(cal, test) <= alpha)
    sigma = rates.std(ddof=1) / math.sqrt(trials)
    assert rates.mean() <= alpha + 3 * sigma
    assert p_rates.mean() <= alpha + 3 * p_rates.std(ddof=1) / math.sqrt(trials)
    # Not vacuous: with n = 199 the exact rate is 1 - 190/200 = alpha.
    assert rates.mean() >= alpha - 3 * sigma
