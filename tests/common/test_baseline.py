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
