"""Conformal threshold and p-values: the rank formulas (marginal and pac), their guarantees (empirically and
against scipy.stats), the false-alarm bound, bad alpha / delta / method."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dlsr.calibration import (
    calibration_rank,
    conformal_rank,
    conformal_threshold,
    false_alarm_bound,
    min_calibration_size,
    p_values,
    pac_rank,
)
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


@pytest.mark.parametrize("n", [45, 100, 200, 230, 500, 2000])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("delta", [0.01, 0.1, 0.3])
def test_pac_rank_is_the_smallest_rank_whose_beta_tail_is_within_delta(n: int, alpha: float, delta: float) -> None:
    k = pac_rank(n, alpha, delta)
    # The realised false-alarm rate of the k-th order statistic is Beta(n - k + 1, k) (scipy, not our binomial).
    def tail(rank: int) -> float:
        return float(stats.beta.sf(alpha, n - rank + 1, rank))

    if k <= n:
        assert tail(k) <= delta + 1e-12
        assert calibration_rank(n, alpha, method="pac", delta=delta) == k
    else:
        assert k == n + 1 and tail(n) > delta  # even the largest score misses alpha too often
    if 1 < k <= n + 1:
        assert tail(k - 1) > delta  # smallest: one rank lower breaks the bound
    assert k >= conformal_rank(n, alpha) or k > n  # pac is never looser than the marginal rank


def test_pac_false_alarm_rate_stays_within_alpha_for_all_but_delta_of_calibration_sets() -> None:
    rng = np.random.default_rng(7)
    alpha, delta, n, trials = 0.05, 0.1, 300, 4000
    k = pac_rank(n, alpha, delta)
    # The exact false-alarm rate of a threshold on U(0, 1) scores is 1 - threshold: no test set is needed.
    fa = np.array([1.0 - conformal_threshold(rng.random(n), alpha, method="pac", delta=delta) for _ in range(trials)])
    miss = float(np.mean(fa > alpha))
    exact = float(stats.beta.sf(alpha, n - k + 1, k))
    assert miss <= delta and abs(miss - exact) < 4 * math.sqrt(exact * (1 - exact) / trials)
    # The marginal threshold of the same sets misses alpha far more often (about half of the time).
    fa_m = np.array([1.0 - conformal_threshold(rng.random(n), alpha) for _ in range(trials)])
    assert np.mean(fa_m > alpha) > 0.3 and np.mean(fa_m) <= alpha + 4 * fa_m.std() / math.sqrt(trials)


@pytest.mark.parametrize("alpha, delta", [(0.01, 0.1), (0.05, 0.1), (0.01, 0.01), (0.2, 0.05)])
def test_min_calibration_size_is_the_first_n_with_a_finite_pac_threshold(alpha: float, delta: float) -> None:
    n = min_calibration_size(alpha, method="pac", delta=delta)
    assert n == math.ceil(math.log(delta) / math.log(1 - alpha))
    assert pac_rank(n, alpha, delta) == n and pac_rank(n - 1, alpha, delta) == n
    assert min_calibration_size(alpha) == conformal_rank(min_calibration_size(alpha), alpha)


def test_too_few_scores_for_pac_say_how_many_are_needed() -> None:
    assert min_calibration_size(0.01, method="pac", delta=0.1) == 230
    with pytest.warns(CalibrationWarning, match=r"delta=0.1 \(pac\): need at least 230"):
        assert conformal_threshold(np.arange(200.0), 0.01, method="pac", delta=0.1) == math.inf
    assert conformal_threshold(np.arange(230.0), 0.01, method="pac", delta=0.1) == 229.0  # the largest


@pytest.mark.parametrize("n, k, delta", [(200, 195, 0.1), (500, 482, 0.1), (2000, 1913, 0.05), (10, 1, 0.5)])
def test_false_alarm_bound_is_the_beta_quantile_and_the_clopper_pearson_bound(n: int, k: int, delta: float) -> None:
    bound = false_alarm_bound(n, k, delta)
    assert bound == pytest.approx(stats.beta.ppf(1 - delta, n - k + 1, k), rel=1e-9)
    flags = n - k  # Clopper-Pearson upper bound for `flags` successes in n trials, from the binomial test
    assert stats.binom.cdf(flags, n, bound) == pytest.approx(delta, rel=1e-6)
    # Monte Carlo: the realised rate of the k-th of n uniform scores is below the bound 1 - delta of the time.
    rng = np.random.default_rng(3)
    fa = 1.0 - np.sort(rng.random((20000, n)), axis=1)[:, k - 1] if n <= 500 else None
    if fa is not None:
        assert np.mean(fa <= bound) == pytest.approx(1 - delta, abs=0.015)


def test_false_alarm_bound_edges_and_pac_bound_within_alpha() -> None:
    assert false_alarm_bound(100, 101) == 0.0  # +inf threshold: nothing is flagged
    assert false_alarm_bound(100, 0) == 1.0
    for n, alpha in [(500, 0.01), (2000, 0.05)]:
        k = pac_rank(n, alpha, 0.1)  # by construction its 0.9 quantile is within alpha, one rank lower is not
        assert false_alarm_bound(n, k, 0.1) <= alpha < false_alarm_bound(n, k - 1, 0.1)
    with pytest.raises(ValueError, match="n >= 1"):
        false_alarm_bound(0, 0)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.5, float("nan"), "x"])
def test_bad_delta_and_method_are_refused(delta: object) -> None:
    with pytest.raises(ValueError, match="delta"):
        conformal_threshold(np.arange(10.0), 0.1, method="pac", delta=delta)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="marginal"):
        conformal_threshold(np.arange(10.0), 0.1, method="conditional")
