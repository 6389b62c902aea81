"""Two monitor processes in one consumer group share the partitions and the Redis state: together they score
every message once, and the windows and drift states they produce are those one process produces."""

from __future__ import annotations

from collections import Counter

import pytest

from dlsr_monitor.common.contract import DriftAlert, parse_alert, parse_score
from dlsr_monitor.console.views import StateView
from tests.integration.conftest import Item, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_two_replicas_in_one_group_give_one_process_totals(
    test_settings, published_model, data_dir, tansu, topics, monitors, readers, redis_client, keys
):
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(tansu, [topics.input, topics.scores, topics.alerts, topics.dlq], partitions=4)
    cifar = load_images(data_dir, "cifar10", "test", 240, seed=11)
    mnist = load_images(data_dir, "mnist", "test", 60, seed=11)
    # Four sources over four partitions; camD turns OOD half-way.
    items = [Item(v, f"cam{'ABC'[i % 3]}", "id", f"r-{i}") for i, v in enumerate(cifar[:200])]
    items += [Item(v, "camD", "id", f"d-{i}") for i, v in enumerate(cifar[200:])]
    items += [Item(v, "camD", "ood", f"d-ood-{i}") for i, v in enumerate(mnist)]
    state = StateView.from_settings(redis_client, keys, test_settings.monitor)
    scores, alerts = readers(topics.scores), readers(topics.alerts)

    a, b = monitors("replica-a"), monitors("replica-b")
    # Both must be in the group before the stream starts, so the partitions are shared.
    wait_until(lambda: len(state.read_heartbeats()) == 2, 180, "two monitor heartbeats", (a, b))
    produce(tansu, topics.input, items[:150], client="kafka-python")
    produce(tansu, topics.input, items[150:], client="confluent")
    wait_until(lambda: len({r.value for r in scores.poll()}) >= len(items), 300, "all score records", (a, b))
    assert a.terminate() == 0 and b.terminate() == 0
    scores.poll(2.0)
    alerts.poll(2.0)

    recs = [parse_score(r.value) for r in scores.records]
    by_id = {r.image_id: r for r in recs}
    assert set(by_id) == {it.image_id for it in items}, "every message scored"
    instances = Counter(r.instance for r in by_id.values())
    print(f"\nrecords per replica: {dict(instances)}; duplicates after rebalances: {len(recs) - len(by_id)}")
    assert set(instances) == {"replica-a", "replica-b"}, "both replicas took partitions"

    # One process would count every distinct message once, per source, and flag the same images.
    for source in ("camA", "camB", "camC", "camD"):
        expected = [it for it in items if it.source == source]
        t = state.window_totals(source)
        assert t["images"] == len(expected), source
        assert t["ood"] == sum(by_id[it.image_id].is_ood for it in expected), source
    drift = [x for x in map(parse_alert, (r.value for r in alerts.records)) if isinstance(x, DriftAlert)]
    assert {(d.source, d.state) for d in drift} == {("camD", "raised")}
    assert len({d.alert_id for d in drift}) == 1, "one transition, whichever replica decided it"
    assert [state.read_drift(s)["state"] for s in ("camA", "camB", "camC", "camD")] == ["ok", "ok", "ok", "raised"]
