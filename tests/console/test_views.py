"""StateView against the real local Redis: what the console reads of the services' writes."""

import numpy as np
import pytest

from dlsr_monitor.common.baseline import BaselineReservoir
from dlsr_monitor.console.views import StateView


def test_read_model_joins_the_entry_and_its_baseline(redis_client, keys):
    view = StateView(redis_client, keys)
    assert view.read_model() == {"version": None}
    redis_client.set(keys.model_current(), "3")
    redis_client.hset(keys.model_entry("3"), mapping={"threshold": "0.7", "alpha": "0.1"})
    BaselineReservoir(redis_client, keys, min_size=10).add("3", np.linspace(0, 1, 40))
    model = view.read_model()
    assert model["version"] == "3" and model["alpha"] == pytest.approx(0.1)
    assert model["registry_threshold"] == pytest.approx(0.7)
    assert model["baseline"]["size"] == 40 and model["baseline"]["threshold"] is not None


def test_missing_source_reads_as_empty(redis_client, keys):
    view = StateView(redis_client, keys, bucket_s=60)
    assert view.read_sources() == []
    assert view.read_drift("nowhere") == {"state": "ok", "images": 0, "ood": 0, "seq": 0, "ver": 0}
    assert view.window_totals("nowhere", since=0.0, until=120.0)["images"] == 0
    assert view.read_watermark("g", "in", 0) == -1
