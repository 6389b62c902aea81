"""Kafka adapters against the session's Tansu broker."""

import time

import pytest

from dlsr_monitor.common.connections import with_retries
from dlsr_monitor.common.kafka_io import KafkaSink, KafkaSource, ensure_topics
from dlsr_monitor.config.errors import StartupError

pytestmark = pytest.mark.integration


def test_with_retries_ends_in_one_startup_error_line():
    calls = []

    def connect():
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(StartupError, match=r"Kafka at h:1 unreachable after 3 tries: ConnectionError: refused"):
        with_retries(connect, what="Kafka", where="h:1", retries=3, backoff_s=0.01)
    assert len(calls) == 3


def test_source_sink_round_trip_commit_and_resume(tansu, topics):
    assert ensure_topics(tansu, [topics.input], partitions=2) == [topics.input]
    assert ensure_topics(tansu, [topics.input], partitions=2) == []
    sink = KafkaSink(tansu)
    for i in range(6):
        sink.send(topics.input, b"cam", b"v%d" % i, [("image_id", b"id%d" % i)])
    sink.flush(10)
    sink.close()

    def drain(src, n):
        got, t0 = [], time.monotonic()
        while len(got) < n and time.monotonic() - t0 < 30:
            got += src.poll(100, 0.5)
        return got

    src = KafkaSource(tansu, topics.input, "g-" + topics.input)
    got = drain(src, 6)
    assert sorted(m.value for m in got) == [b"v%d" % i for i in range(6)]
    assert dict(got[0].headers)["image_id"].startswith(b"id") and got[0].timestamp_ms > 0
    assert src.lag() == 0
    first = got[:3]
    src.commit({(m.topic, m.partition): m.offset + 1 for m in first})
    src.close()
    src = KafkaSource(tansu, topics.input, "g-" + topics.input)
    rest = drain(src, 3)
    src.close()
    assert {m.value for m in rest} == {m.value for m in got[3:]}
