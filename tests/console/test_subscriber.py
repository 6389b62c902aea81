"""`dlsr alerts`: filters, output formats, and every subscriber seeing every alert on a real broker."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from dlsr_monitor.common.contract import SCHEMA_VERSION, DriftAlert, ModelAlert, OodAlert, WindowStats
from dlsr_monitor.console.subscriber import (
    AlertFilter,
    decode_alert,
    filter_alerts,
    follow_alerts,
    format_alert,
)


def _ood(source: str, n: int) -> OodAlert:
    return OodAlert(
        alert_id=f"ood:{source}:{n}", source=source, image_id=f"{source}-{n}", topic="images", partition=0,
        offset=n, ts=1_700_000_000.0 + n, score=1.5, threshold=1.0, p_value=0.004, model_version="v1",
    )


def _drift(source: str, state: str, seq: int) -> DriftAlert:
    window = WindowStats(
        images=200, ood=60, rate=0.3, null_rate=0.02, p_value=1e-20, window_s=600, since=0.0, until=600.0
    )
    return DriftAlert(
        alert_id=f"drift:{source}:{seq}", source=source, state=state, seq=seq, ts=1_700_000_100.0, window=window
    )


MODEL = ModelAlert(alert_id="model:v2", event="live", version="v2", previous_version="v1", ts=1_700_000_200.0)
FAILED = ModelAlert(alert_id="model:v3:failed", event="load_failed", version="v3", reason="sha256 mismatch", ts=0.0)
ALERTS = [_ood("cam-1", 1), _drift("cam-1", "raised", 1), _ood("cam-2", 2), MODEL, _drift("cam-1", "cleared", 2), FAILED]
VALUES = [a.to_bytes() for a in ALERTS]


def _ids(flt: AlertFilter) -> list[str]:
    return [a["alert_id"] for a in filter_alerts(VALUES, flt)]


def test_no_filter_passes_everything_in_order():
    assert _ids(AlertFilter()) == [a.alert_id for a in ALERTS]


def test_source_filter_keeps_model_alerts_which_concern_every_source():
    assert _ids(AlertFilter(sources=frozenset({"cam-2"}))) == ["ood:cam-2:2", "model:v2", "model:v3:failed"]


def test_kind_and_severity_filters():
    assert _ids(AlertFilter(kinds=frozenset({"drift"}))) == ["drift:cam-1:1", "drift:cam-1:2"]
    assert _ids(AlertFilter(min_severity="critical")) == ["drift:cam-1:1", "model:v3:failed"]
    assert _ids(AlertFilter(min_severity="warning", kinds=frozenset({"ood"}))) == ["ood:cam-1:1", "ood:cam-2:2"]
    with pytest.raises(ValueError, match="min_severity must be one of"):
        AlertFilter(min_severity="loud")


def test_json_lines_carry_severity_and_human_lines_are_single():
    alert = decode_alert(VALUES[1])
    data = json.loads(format_alert(alert, as_json=True))
    assert data["severity"] == "critical" and data["state"] == "raised" and data["schema_version"] == SCHEMA_VERSION
    line = format_alert(alert, as_json=False)
    assert "\n" not in line and "critical" in line and "cam-1" in line and "drift raised" in line


def test_records_that_are_not_alerts_are_skipped():
    assert decode_alert(b"not json") is None
    assert decode_alert(b"[1, 2]") is None
    assert decode_alert(b'{"kind": "future", "source": "x"}') == {"kind": "future", "source": "x"}


@pytest.mark.integration
def test_two_subscribers_each_see_every_alert(tansu, test_settings):
    from kafka import KafkaProducer

    from dlsr_monitor.common.kafka_io import ensure_topics

    kafka = test_settings.kafka
    ensure_topics(kafka, [kafka.alerts_topic], partitions=3)
    producer = KafkaProducer(**kafka.client_kwargs())
    for alert in ALERTS:
        producer.send(kafka.alerts_topic, key=alert.source.encode(), value=alert.to_bytes())
    producer.flush()
    producer.close()

    outs = {"all": io.StringIO(), "critical": io.StringIO()}
    filters = {"all": AlertFilter(), "critical": AlertFilter(min_severity="critical")}
    expected = {"all": len(ALERTS), "critical": 2}

    def follow(name: str) -> None:
        follow_alerts(
            kafka, filters[name], as_json=True, from_beginning=True, max_alerts=expected[name],
            idle_timeout_s=20, out=outs[name],
        )

    threads = [threading.Thread(target=follow, args=(n,)) for n in outs]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - t0 < 60
    seen = {n: [json.loads(line)["alert_id"] for line in out.getvalue().splitlines()] for n, out in outs.items()}
    # Each subscriber has its own consumer group: both see the alerts (per-key order within a partition).
    assert sorted(seen["all"]) == sorted(a.alert_id for a in ALERTS)
    assert sorted(seen["critical"]) == ["drift:cam-1:1", "model:v3:failed"]


@pytest.mark.integration
def test_cli_follows_with_filters(tansu, test_settings, monkeypatch, capsys):
    from kafka import KafkaProducer

    from dlsr_monitor.cli.main import main
    from dlsr_monitor.common.kafka_io import ensure_topics

    kafka = test_settings.kafka
    ensure_topics(kafka, [kafka.alerts_topic], partitions=1)
    producer = KafkaProducer(**kafka.client_kwargs())
    for alert in ALERTS:
        producer.send(kafka.alerts_topic, key=alert.source.encode(), value=alert.to_bytes())
    producer.flush()
    producer.close()
    monkeypatch.setenv("DLSR_KAFKA__BOOTSTRAP_SERVERS", tansu)
    monkeypatch.setenv("DLSR_KAFKA__ALERTS_TOPIC", kafka.alerts_topic)
    rc = main(["alerts", "--from-beginning", "--kind", "drift", "--source", "cam-1", "--max", "2", "--timeout", "20"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "drift raised" in lines[0] and "drift cleared" in lines[1]
