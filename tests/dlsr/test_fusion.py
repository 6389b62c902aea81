"""Layer-wise fusion (dlsr.fusion): the rules, their ordering, and calibration of the fused score under H0."""

from __future__ import annotations

import numpy as np
import pytest

from dlsr.fusion import RULES, StageFusion, check_rule, combine


def correlated_stages(rng: np.random.Generator, n: int, s: int = 5, rho: float = 0.6) -> np.ndarray:
    """(n, s) ID stage scores with a shared factor: stages of one image move together, as real ones do."""
    common = rng.normal(size=(n, 1))
    return np.sqrt(rho) * common + np.sqrt(1 - rho) * rng.normal(size=(n, s))


def test_rules_by_hand() -> None:
    p = np.array([[0.5, 0.01, 0.2]])
    assert combine(p, "fisher")[0] == pytest.approx(-2 * np.log(0.5 * 0.01 * 0.2))
    assert combine(p, "bonferroni")[0] == pytest.approx(-np.log(3 * 0.01))
    # Simes: min(3 * 0.01 / 1, 3 * 0.2 / 2, 3 * 0.5 / 3) = 0.03
    assert combine(p, "simes")[0] == pytest.approx(-np.log(0.03))
    assert combine(np.array([0.2, 0.2]), "simes")[0] == pytest.approx(-np.log(0.2))


def test_unknown_rule_and_bad_p_values() -> None:
    with pytest.raises(ValueError, match="choose one of fisher, simes, bonferroni"):
        check_rule("stouffer")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        combine(np.array([[0.0, 0.5]]), "fisher")
    with pytest.raises(ValueError, match="n >= 2"):
        StageFusion.fit(np.zeros((1, 3)))


@pytest.mark.parametrize("rule", RULES)
def test_ordering(rule: str) -> None:
    """Smaller p-values in any stage never lower the statistic; one strong stage beats uniform ones."""
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 1.0, size=(200, 4))
    smaller = p.copy()
    smaller[:, 2] *= 0.5
    assert np.all(combine(smaller, rule) >= combine(p, rule) - 1e-12)
    assert combine(np.array([[0.001, 0.9, 0.9, 0.9]]), rule)[0] > combine(np.full((1, 4), 0.9), rule)[0]


@pytest.mark.parametrize("rule", RULES)
def test_fused_p_values_uniform_under_h0(rule: str) -> None:
    """Fresh ID images: fused p-values are uniform-ish and the false-alarm rate at alpha is about alpha,
    on average over calibration draws, though the stages are strongly correlated."""
    rng = np.random.default_rng(7)
    rates, all_p = [], []
    for _ in range(40):
        fusion = StageFusion.fit(correlated_stages(rng, 400), rule, seed=int(rng.integers(1 << 30)))
        p = fusion.p_values(correlated_stages(rng, 500))
        all_p.append(p)
        rates.append(np.mean(p <= 0.1))
    assert np.mean(rates) == pytest.approx(0.1, abs=0.015)
    deciles = np.quantile(np.concatenate(all_p), [0.1, 0.25, 0.5, 0.75, 0.9])
    assert np.allclose(deciles, [0.1, 0.25, 0.5, 0.75, 0.9], atol=0.03)
    # The threshold and the p-values agree: flagged by the threshold <=> p <= alpha (up to ties).
    s = fusion.statistic(correlated_stages(rng, 500))
    assert np.array_equal(s > fusion.threshold(0.1), fusion.p_values_of(s) <= 0.1)


def test_uncalibrated_fisher_would_be_wrong() -> None:
    """Why re-calibrate: Fisher's chi-square null (independent stages) flags far more than alpha on correlated
    stages; the re-calibrated threshold does not."""
    from math import exp, factorial

    rng = np.random.default_rng(3)
    fusion = StageFusion.fit(correlated_stages(rng, 2000), "fisher")
    t = fusion.statistic(correlated_stages(rng, 4000))
    # chi-square with 2S = 10 degrees of freedom: survival function exp(-x/2) sum_{k<5} (x/2)^k / k!
    sf = np.array([exp(-x / 2) * sum((x / 2) ** k / factorial(k) for k in range(5)) for x in t])
    assert np.mean(sf <= 0.05) > 0.09
    assert np.mean(t > fusion.threshold(0.05)) == pytest.approx(0.05, abs=0.015)


def _auroc(rule: str, rho: float, shift: np.ndarray) -> float:
    from dlsr.metrics import auroc

    rng = np.random.default_rng(5)
    fusion = StageFusion.fit(correlated_stages(rng, 1000, rho=rho), rule)
    id_test, ood = correlated_stages(rng, 500, rho=rho), correlated_stages(rng, 500, rho=rho) + shift
    return auroc(fusion.statistic(id_test), fusion.statistic(ood))


def test_which_rule_wins_where() -> None:
    """Textbook ordering: min-p rules win when the evidence sits in one stage (a shift of stage 2 alone),
    Fisher when it is spread thinly over all stages (independent stages, a small shift in each)."""
    one = np.array([0.0, 2.5, 0.0, 0.0, 0.0])
    auc_one = {rule: _auroc(rule, 0.6, one) for rule in RULES}
    assert auc_one["bonferroni"] > 0.85 and auc_one["simes"] > 0.85 and auc_one["fisher"] > 0.7
    assert auc_one["bonferroni"] > auc_one["fisher"] + 0.05
    spread = {rule: _auroc(rule, 0.0, np.full(5, 0.5)) for rule in RULES}
    assert spread["fisher"] > spread["simes"] > spread["bonferroni"] > 0.65


def test_split_is_seeded_and_disjoint() -> None:
    cal = np.arange(20, dtype=float).reshape(10, 2)
    a, b = StageFusion.fit(cal, seed=4), StageFusion.fit(cal, seed=4)
    assert np.array_equal(a.reference, b.reference) and np.array_equal(a.calibration, b.calibration)
    assert a.reference.shape == (5, 2) and a.calibration.shape == (5,) and a.n_stages == 2
    assert not np.array_equal(a.reference, StageFusion.fit(cal, seed=5).reference)
