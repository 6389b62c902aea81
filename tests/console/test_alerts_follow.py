"""`dlsr alerts` follow-ups: `--since`, `--timeout` counting only matching alerts, and a broker that goes away
mid-follow ending the run with one line (exit 1) instead of a silent hang."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dlsr_monitor.common.contract import OodAlert
from dlsr_monitor.console.subscriber import (
    AlertFilter,
    broker_silence_limit_s,
    follow_alerts,
    parse_since,
)

DLSR = Path(sys.executable).with_name("dlsr")


def _ood(source: str, n: int) -> OodAlert:
    return OodAlert(
        alert_id=f"ood:{source}:{n}",
        source=source,
        image_id=f"{source}-{n}",
        topic="images",
        partition=0,
        offset=n,
        ts=1_700_000_000.0 + n,
        score=1.5,
        threshold=1.0,
        p_value=0.004,
        model_version="v1",
    )


def test_since_takes_durations_and_iso_times():
    now = 1_750_000_000.0
    assert parse_since("90s", now) == now - 90
    assert parse_since("15m", now) == now - 900
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("2025-06-01T12:00:00Z", now) == datetime(2025, 6, 1, 12, tzinfo=UTC).timestamp()
    assert parse_since("2025-06-01T12:00", now) == datetime(2025, 6, 1, 12, tzinfo=UTC).timestamp()  # UTC
    assert parse_since("2025-06-01 14:00:00+02:00", now) == datetime(2025, 6, 1, 12, tzinfo=UTC).timestamp()
    for bad in ("yesterday", "15x", "", "2099-01-01T00:00Z"):
        with pytest.raises(ValueError, match="--since"):
            parse_since(bad, now)


def test_silence_limit_is_the_start_up_retry_budget_with_a_floor():
    from dlsr_monitor.config import KafkaSettings

    assert broker_silence_limit_s(KafkaSettings()) == 25.0  # 1 + 2 + 4 + 8 + 10
    assert broker_silence_limit_s(KafkaSettings(connect_retries=2, retry_backoff_s=0.2)) == 15.0
    assert broker_silence_limit_s(KafkaSettings(connect_retries=8, retry_backoff_s=2)) == 2 + 4 + 8 + 10 * 5


class _Record:
    def __init__(self, value: bytes) -> None:
        self.value = value


class _ChattyConsumer:
    """Returns a non-matching alert on every poll, as a busy topic would."""

    def __init__(self) -> None:
        self.polls = 0
        self.closed = False

    def poll(self, timeout_ms: int = 0):
        self.polls += 1
        time.sleep(0.05)
        return {"tp": [_Record(_ood("cam-other", self.polls).to_bytes())]}

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.closed = True


def test_timeout_counts_time_without_a_matching_alert(test_settings):
    consumer = _ChattyConsumer()
    out = io.StringIO()
    t0 = time.monotonic()
    rc = follow_alerts(
        test_settings.kafka,
        AlertFilter(sources=frozenset({"cam-7"})),
        idle_timeout_s=1.0,
        out=out,
        consumer_factory=lambda *a, **k: consumer,
    )
    assert rc == 0 and out.getvalue() == ""
    assert 1.0 <= time.monotonic() - t0 < 5.0  # other sources' alerts kept coming and did not extend it
    assert consumer.polls > 5 and consumer.closed


@pytest.mark.integration
def test_since_replays_from_that_time(tansu, test_settings):
    from kafka import KafkaProducer

    from dlsr_monitor.common.kafka_io import ensure_topics

    kafka = test_settings.kafka
    ensure_topics(kafka, [kafka.alerts_topic], partitions=2)
    producer = KafkaProducer(**kafka.client_kwargs())
    for n in range(3):
        producer.send(kafka.alerts_topic, key=b"cam-7", value=_ood("cam-7", n).to_bytes())
    producer.flush()
    time.sleep(1.5)
    since = time.time()
    time.sleep(0.5)
    for n in range(3, 5):
        producer.send(kafka.alerts_topic, key=b"cam-7", value=_ood("cam-7", n).to_bytes())
    producer.flush()
    producer.close()

    out = io.StringIO()
    follow_alerts(kafka, AlertFilter(), as_json=True, since=since, max_alerts=2, idle_timeout_s=20, out=out)
    assert [json.loads(x)["alert_id"] for x in out.getvalue().splitlines()] == ["ood:cam-7:3", "ood:cam-7:4"]

    out = io.StringIO()
    follow_alerts(
        kafka, AlertFilter(), as_json=True, since=since - 600, max_alerts=5, idle_timeout_s=20, out=out
    )
    assert len(out.getvalue().splitlines()) == 5


@pytest.mark.integration
def test_a_broker_that_goes_away_mid_follow_ends_the_run_with_one_line(tmp_path):
    from kafka import KafkaProducer

    from dlsr_monitor.common.kafka_io import ensure_topics
    from dlsr_monitor.demo.embedded import TansuBroker

    broker = TansuBroker().start()  # a broker of its own: this test stops it
    try:
        ensure_topics(broker.bootstrap, ["alerts-gone"], partitions=1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
        env.update(
            DLSR_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap,
            DLSR_KAFKA__ALERTS_TOPIC="alerts-gone",
            DLSR_KAFKA__CONNECT_RETRIES="2",
            DLSR_KAFKA__RETRY_BACKOFF_S="0.2",  # silence limit: the 15 s floor
        )
        # --timeout longer than the limit: the outage, not the quiet stream, must end the run.
        proc = subprocess.Popen(
            [str(DLSR), "alerts", "--json", "--timeout", "60"], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # Follow for real first: a marker alert must come through.
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        while time.monotonic() < deadline and not lines and proc.poll() is None:
            producer.send("alerts-gone", key=b"cam-1", value=_ood("cam-1", 1).to_bytes())
            producer.flush()
            time.sleep(1.0)
        producer.close()
        assert lines and "ood:cam-1:1" in lines[0], (
            proc.stderr.read() if proc.poll() is not None else "no alert"
        )
    finally:
        broker.stop()
    t0 = time.monotonic()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("dlsr alerts still running 60 s after the broker went away")
    waited = time.monotonic() - t0
    err = proc.stderr.read()
    reader.join(10)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "stopped answering" in err and "--since" in err, err
    assert waited < 15 + 20, waited  # the silence limit plus a heartbeat or two
