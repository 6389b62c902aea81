"""The monitor as a real process on Tansu + Redis with a real (small) DLSR model: 300 messages in -> exactly
270 score records and 30 dead letters, OOD alerts for the flagged images, a drift alert for the source that
turned OOD, windows in Redis, graceful SIGTERM (exit 0)."""

from __future__ import annotations

from collections import Counter

import pytest

from dlsr_monitor.common.contract import DLQ_ERROR, DLQ_ORIGIN, DriftAlert, OodAlert, parse_alert, parse_score
from dlsr_monitor.console.views import StateView
from tests.integration.conftest import Item, corrupt_payloads, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_300_messages_scores_dead_letters_alerts_drift(
    test_settings, published_model, data_dir, tansu, topics, monitors, readers, redis_client, keys
):
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(tansu, [topics.input, topics.scores, topics.alerts, topics.dlq], partitions=3)
    cifar = load_images(data_dir, "cifar10", "test", 210, seed=3)
    mnist = load_images(data_dir, "mnist", "test", 60, seed=3)
    # camA: 150 ID. camB: 60 ID, then it turns OOD (60 MNIST). camC: 30 corrupt payloads of five kinds.
    cam_a = [Item(v, "camA", "id", f"a-{i}") for i, v in enumerate(cifar[:150])]
    cam_b = [Item(v, "camB", "id", f"b-{i}") for i, v in enumerate(cifar[150:])]
    cam_b += [Item(v, "camB", "ood", f"b-ood-{i}") for i, v in enumerate(mnist)]
    bad = [Item(v, "camC", "corrupt", None) for v in corrupt_payloads(30, cifar[0])]  # default ids
    assert len(cam_a) + len(cam_b) + len(bad) == 300

    scores, alerts, dlq = readers(topics.scores), readers(topics.alerts), readers(topics.dlq)
    mon = monitors("solo")
    # One producer is librdkafka (confluent-kafka), the other kafka-python; headers and keys from both.
    produce(tansu, topics.input, cam_a + bad, client="confluent")
    produce(tansu, topics.input, cam_b, client="kafka-python")

    wait_until(lambda: len(scores.poll()) >= 270 and len(dlq.poll()) >= 30, 300, "270 scores + 30 DLQ", (mon,))
    alerts.wait_for(1, 10)
    assert mon.terminate() == 0, mon.log()[-2000:]  # SIGTERM: finish, commit, exit 0
    scores.poll(2.0)
    dlq.poll(2.0)
    alerts.poll(2.0)

    recs = [parse_score(r.value) for r in scores.records]
    assert len(recs) == 270, "exactly one score record per decodable image"
    assert len({(r.partition, r.offset) for r in recs}) == 270
    assert len(dlq.records) == 30
    reasons = Counter(dict(r.headers)[DLQ_ERROR].decode() for r in dlq.records)
    assert sum(reasons.values()) == 30 and len(reasons) >= 3, reasons  # named reasons, several kinds
    origins = {dict(r.headers)[DLQ_ORIGIN].decode() for r in dlq.records}
    assert origins.isdisjoint({f"{r.topic}:{r.partition}:{r.offset}" for r in recs})
    assert {r.value for r in dlq.records} <= {it.value for it in bad}  # original bytes kept

    by_id = {r.image_id: r for r in recs}
    assert set(by_id) == {it.image_id for it in cam_a + cam_b}
    assert all(r.model_version == published_model.version for r in recs)
    id_fpr = sum(by_id[it.image_id].is_ood for it in cam_a) / len(cam_a)
    ood_tpr = sum(by_id[it.image_id].is_ood for it in cam_b if it.kind == "ood") / 60
    print(f"\nID false-alarm rate {id_fpr:.3f} (alpha 0.01), MNIST flagged {ood_tpr:.3f}, DLQ reasons {dict(reasons)}")
    assert ood_tpr >= 0.8 and id_fpr <= 0.05

    parsed = [parse_alert(r.value) for r in alerts.records]
    ood_alerts = {a.image_id for a in parsed if isinstance(a, OodAlert)}
    assert ood_alerts == {r.image_id for r in recs if r.is_ood}, "one OOD alert per flagged image"
    drift = [a for a in parsed if isinstance(a, DriftAlert)]
    assert [(a.source, a.state) for a in drift] == [("camB", "raised")], drift
    assert drift[0].window.ood >= 5 and drift[0].window.p_value < 1e-6  # raised early: detection is fast

    state = StateView.from_settings(redis_client, keys, test_settings.monitor)
    totals = {s: state.window_totals(s) for s in ("camA", "camB", "camC")}
    assert totals["camA"]["images"] == 150 and totals["camB"]["images"] == 120
    assert totals["camC"]["dead"] == 30 and totals["camC"]["images"] == 0
    assert totals["camB"]["ood"] == sum(r.is_ood for r in recs if r.source == "camB")
    assert state.read_drift("camB")["state"] == "raised" and state.read_drift("camA")["state"] == "ok"
    assert state.read_heartbeats() == []  # a clean stop removes the instance's heartbeat
