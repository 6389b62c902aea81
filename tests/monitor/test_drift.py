import math
import random

import pytest

from dlsr_monitor.monitor.drift import DriftTest, SlidingDrift, binom_sf


def _brute_sf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 10, 0.1), (10, 10, 0.3), (7, 200, 0.02), (40, 200, 0.02)])
def test_binom_sf_matches_exact_sum(k, n, p):
    assert binom_sf(k, n, p) == pytest.approx(_brute_sf(k, n, p), rel=1e-9, abs=1e-300)


def test_no_alarm_on_100k_clean_flags_at_budget():
    # Flags at exactly alpha: the configured budget (raise_p = 1e-6 per evaluation) must hold with room.
    for seed in (0, 1, 2):
        rng = random.Random(seed)
        drift = SlidingDrift(DriftTest(alpha=0.01, null_factor=2.0, raise_p=1e-6), window=500)
        raised = sum(drift.update(rng.random() < 0.01).changed for _ in range(100_000))
        assert raised == 0, f"seed {seed}: {raised} false alarms"


def test_no_alarm_when_null_factor_is_one():
    # Even without the margin (H0 rate = alpha), a clean stream stays quiet at raise_p = 1e-6.
    rng = random.Random(7)
    drift = SlidingDrift(DriftTest(alpha=0.01, null_factor=1.0, raise_p=1e-6), window=500)
    assert not any(drift.update(rng.random() < 0.01).changed for _ in range(100_000))


def test_detects_jump_within_stated_delay_and_clears_after_recovery():
    # Stated delay: alpha 0.01 -> 0.2 is raised within 200 images with a 500-image window (mean ~120).
    delays = []
    for seed in range(5):
        rng = random.Random(seed)
        drift = SlidingDrift(DriftTest(alpha=0.01), window=500)
        for _ in range(2000):
            assert not drift.update(rng.random() < 0.01).changed
        delay = next(i for i in range(1, 2000) if drift.update(rng.random() < 0.2).changed)
        delays.append(delay)
        assert drift.state == "raised"
        # Back to ID: cleared once the window has mostly refilled with clean flags (hysteresis, no flapping).
        changes = [drift.update(rng.random() < 0.01) for _ in range(2000)]
        transitions = [d for d in changes if d.changed]
        assert len(transitions) == 1 and transitions[0].state == "ok"
    assert max(delays) <= 200, delays


def test_min_images_and_hysteresis():
    test = DriftTest(alpha=0.01, min_images=50)
    assert test.evaluate("ok", 10, 10).state == "ok"  # too few images to decide
    up = test.evaluate("ok", 100, 30)
    assert up.changed and up.state == "raised" and up.p_value < 1e-6
    # Between raise_p and clear_p: stays raised.
    mid = test.evaluate("raised", 500, 19)
    assert 1e-6 < mid.p_value < 0.05 and mid.state == "raised" and not mid.changed
    assert test.evaluate("raised", 500, 8).state == "ok"


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="alpha"):
        DriftTest(alpha=0)
    with pytest.raises(ValueError, match="raise_p"):
        DriftTest(raise_p=0.1, clear_p=0.01)


def test_the_null_rate_comes_from_the_calibration_unless_a_factor_overrides_it():
    assert DriftTest(alpha=0.01).null_rate == pytest.approx(0.02)  # neither: the former fixed factor
    assert DriftTest(alpha=0.01, calibration_null=0.0123).null_rate == pytest.approx(0.0123)
    assert DriftTest(alpha=0.01, null_factor=3.0, calibration_null=0.0123).null_rate == pytest.approx(0.03)
    d = DriftTest(alpha=0.01, calibration_null=0.0123).evaluate("ok", 500, 10)
    assert d.null_rate == pytest.approx(0.0123) and d.p_value == pytest.approx(binom_sf(10, 500, 0.0123))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="calibration_null"):
            DriftTest(alpha=0.01, calibration_null=bad)


def test_a_pac_calibration_null_keeps_a_clean_stream_quiet():
    # The worst clean stream the bound covers (flagged at exactly the 1 - delta bound of a pac threshold's
    # realised rate, n = 500, alpha 0.01, delta 0.1) tested against that bound: no raise in 100k images.
    from dlsr.calibration import false_alarm_bound, pac_rank

    n, alpha, delta = 500, 0.01, 0.1
    null = false_alarm_bound(n, pac_rank(n, alpha, delta), delta)
    assert null <= alpha  # pac: the bound is within alpha by construction
    for seed in range(3):
        rng = random.Random(seed)
        drift = SlidingDrift(DriftTest(alpha=alpha, calibration_null=null, raise_p=1e-6), window=500)
        assert not any(drift.update(rng.random() < null).changed for _ in range(100_000)), f"seed {seed}"
