"""Fuzzing `common.contract.parse_input_meta` (hypothesis): whatever the headers, key and Kafka timestamp, it
never raises, `ts` is finite and within [2000-01-01, now + 1 day], `image_id` has at most 256 characters and
`source` is printable, non-empty, at most 128 characters.

Inputs: Kafka-legal topic names (up to 249 characters), any partition / offset, keys of any bytes, headers with
the names the monitor reads (and others, repeated, unicode) and values of any bytes, UTF-8 text, numbers in every
notation, ISO-8601 strings; Kafka timestamps over the whole int64 range or missing.

Size: DLSR_FUZZ_EXAMPLES examples per test (default small); executions per second are printed at the end of the
session.
"""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, example, given, settings, target
from hypothesis import strategies as st

from dlsr_monitor.common.contract import IMAGE_ID_MAX, TS_MAX_AHEAD_S, TS_MIN, parse_input_meta
from tests.faults.fuzzstats import counter, examples, install

INT64 = st.integers(-(2**63), 2**63 - 1)


# Seconds per test: out of `make test-fast`, in `make test`; a long DLSR_FUZZ_EXAMPLES run gets a longer timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 + examples(0) // 10)]

@pytest.fixture(scope="module", autouse=True)
def _fuzz_summary(request):
    install(request.config)


def fuzz(default_examples: int) -> settings:
    return settings(deadline=None, database=None, max_examples=examples(default_examples),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


KAFKA_TOPIC_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
topics = st.text(alphabet=KAFKA_TOPIC_CHARS, min_size=1, max_size=249)  # Kafka's legal names
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["nan", "NaN", "-nan", "inf", "+inf", "-inf", "Infinity", "1e300", "-1e300", "1e309", "1e-320",
                     "1_700_000_000", "0x10", " 1700000000 ", "1700000000000", "99999999999999", "-1", "0", "1e11",
                     "100000000001"]),
)
iso = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.datetimes().map(lambda d: d.isoformat() + "+14:00"),
    st.datetimes().map(lambda d: d.isoformat() + "-23:59"),
    st.sampled_from(["0001-01-01", "9999-12-31T23:59:59.999999+14:00", "2024-02-30", "2024-13-01", "T", "Z"]),
)
text_values = st.one_of(numbers, iso, st.text(max_size=300), st.text(max_size=5000, alphabet=st.characters()))
values = st.one_of(
    st.none(),
    st.binary(max_size=600),
    text_values.map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(min_size=1, max_size=4).map(lambda b: b"\xff" + b),  # never valid UTF-8
    st.integers(250, 2000).map(lambda n: b"x" * n),
)
names = st.one_of(st.sampled_from(["ts", "source", "image_id"]), st.text(max_size=20))
headers = st.one_of(st.none(), st.lists(st.tuples(names, values), max_size=8))
keys = st.one_of(st.none(), st.binary(max_size=2000), st.text(max_size=1500).map(str.encode))
timestamps = st.one_of(st.none(), INT64, st.integers(0, 4_102_444_800_000), st.just(-1))


def _check(meta, now_hi: float) -> None:
    assert math.isfinite(meta.ts), meta
    assert TS_MIN <= meta.ts <= now_hi + TS_MAX_AHEAD_S, meta.ts
    assert isinstance(meta.image_id, str) and 0 < len(meta.image_id) <= IMAGE_ID_MAX, len(meta.image_id)
    assert isinstance(meta.source, str) and 0 < len(meta.source) <= 128, meta.source
    assert meta.source.isprintable(), repr(meta.source)
    assert all(isinstance(n, str) for n in meta.notes)


@fuzz(2000)
@given(topic=topics, partition=st.integers(0, 2**31 - 1), offset=st.integers(0, 2**63 - 1), key=keys,
       headers=headers, timestamp_ms=timestamps)
@example(topic="t", partition=0, offset=0, key=None, headers=[("ts", b"nan")], timestamp_ms=None)
@example(topic="t", partition=0, offset=0, key=b"\xff" * 2000, headers=[("ts", b"\xff\xfe")], timestamp_ms=-1)
@example(topic="t", partition=0, offset=0, key=None, headers=[("ts", b"1e300"), ("image_id", b"i" * 100_000)],
         timestamp_ms=2**63 - 1)
@example(topic="t", partition=0, offset=0, key=b"k" * 100_000, headers=[("source", b"s" * 100_000)],
         timestamp_ms=0)
# Found (hypothesis, guided by target(image_id length); shrunk): with no usable image_id header the default id
# `topic:partition:offset` is not bounded: a Kafka-legal 239-character topic at partition / offset 10,000,000
# gives a 257-character image_id (> IMAGE_ID_MAX = 256); a 249-character topic at offset 12,345,678,901: 264.
@example(topic="0" * 239, partition=10_000_000, offset=10_000_000, key=None, headers=None, timestamp_ms=None)
@example(topic="t" * 249, partition=11, offset=12_345_678_901, key=None, headers=None, timestamp_ms=None)
def test_parse_input_meta_never_raises(topic, partition, offset, key, headers, timestamp_ms):
    with counter("parse_input_meta"):
        meta = parse_input_meta(topic=topic, partition=partition, offset=offset, key=key, headers=headers,
                                timestamp_ms=timestamp_ms)
    target(float(len(meta.image_id)), label="image_id length")
    _check(meta, time.time())


@fuzz(1000)
@given(topic=topics, key=keys, headers=headers, timestamp_ms=timestamps,
       now=st.floats(TS_MIN, 4_102_444_800.0))
def test_parse_input_meta_with_any_clock(topic, key, headers, timestamp_ms, now):
    """`now` (the arrival time) anywhere from 2000 to 2100: the fallback of the fallback is still in range."""
    with counter("parse_input_meta (any clock)"):
        meta = parse_input_meta(topic=topic, partition=1, offset=2, key=key, headers=headers,
                                timestamp_ms=timestamp_ms, now=now)
    _check(meta, now)


@fuzz(500)
@given(raw=st.binary(min_size=1, max_size=64).filter(lambda b: _not_utf8(b)), key=keys,
       timestamp_ms=st.integers(1_600_000_000_000, 1_900_000_000_000))
# Found: a `ts` header that is not UTF-8 falls back to the Kafka timestamp silently (no note), unlike every other
# unusable `ts` (nan, inf, 1e300, far future / past, 100 KB), whose score record says so in `input_notes`.
@example(raw=b"\xff\xfe\x80\x81", key=None, timestamp_ms=1_700_000_000_000)
def test_unusable_ts_header_is_noted(raw, key, timestamp_ms):
    """A `ts` header that cannot be read (not UTF-8) is replaced by the Kafka timestamp, and a note says so."""
    with counter("parse_input_meta (non-UTF-8 ts)"):
        meta = parse_input_meta(topic="t", partition=0, offset=0, key=key, headers=[("ts", raw)],
                                timestamp_ms=timestamp_ms, now=2_000_000_000.0)
    assert meta.ts == timestamp_ms / 1000.0
    assert any("ts" in note for note in meta.notes), meta.notes


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
