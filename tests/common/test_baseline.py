"""BaselineReservoir against the real local Redis (per-test prefix, cleaned up by the `keys` fixture)."""

import numpy as np
import pytest

from dlsr_monitor.common.baseline import BaselineReservoir


@pytest.fixture
def res(redis_client, keys):
    return BaselineReservoir(redis_client, keys, min_size=50)


def test_threshold_moves_only_with_vetted_scores(res, redis_client, keys):
    redis_client.hset(keys.model_entry("1"), mapping={"threshold": "0.9", "alpha": "0.1"})
    assert res.threshold("1", 0.1) == pytest.approx(0.9)  # reservoir too small: registry's
    assert res.add("1", np.linspace(0, 1, 20)) is None
    t = res.add("1", np.linspace(0, 1, 80))  # 100 scores, alpha from the registry entry
    from dlsr.calibration import conformal_threshold

    expected = conformal_threshold(np.concatenate([np.linspace(0, 1, 20), np.linspace(0, 1, 80)]), 0.1)
    assert t == pytest.approx(expected)
    assert res.threshold("1", 0.1) == pytest.approx(expected)
    assert res.read("1")["size"] == 100


def test_reservoir_is_capped(redis_client, keys):
    st = BaselineReservoir(redis_client, keys, max_size=30, min_size=10)
    st.add("2", range(100), alpha=0.1)
    assert st.read("2")["size"] == 30
    assert sorted(st.scores("2")) == list(range(70, 100))  # the most recent are kept


def test_a_pac_version_keeps_its_guarantee_when_the_reservoir_takes_over(res, redis_client, keys):
    from dlsr.calibration import conformal_threshold, min_calibration_size

    redis_client.hset(keys.model_entry("4"), mapping={"threshold": "0.9", "alpha": "0.05", "calibration": "pac",
                                                      "delta": "0.1"})
    assert res.calibration("4") == ("pac", 0.1)
    assert res.min_for(0.05, "pac", 0.1) == max(50, min_calibration_size(0.05, method="pac", delta=0.1))
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    t = res.add("4", scores)
    assert t == pytest.approx(conformal_threshold(scores, 0.05, method="pac", delta=0.1))
    assert t > conformal_threshold(scores, 0.05)  # stricter than the marginal threshold of the same scores
    assert res.threshold("4", 0.05) == pytest.approx(t)
    redis_client.hset(keys.model_entry("5"), mapping={"threshold": "0.9", "alpha": "0.05"})
    assert res.calibration("5") == ("marginal", 0.1)  # an entry older than the field
