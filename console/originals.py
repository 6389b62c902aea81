"""Bounded topic reads and fetches of original input messages by offset (`dlsr triage`, `dlsr vet`).

No consumer group, nothing committed: partitions are assigned by hand. A bounded read takes each partition's end
offset when it starts and stops there, so it ends even while a monitor keeps writing. An original is fetched by
`topic / partition / offset` (seek, then one fetch; offsets are grouped by partition and visited in order, and
a wanted offset that arrives in the same fetch as another is not fetched again), and proved by the sha256 its
score record carries. What cannot be fetched is a `Missing` with a reason, never an exception.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import KafkaSettings

Origin = tuple[str, int, int]  # (topic, partition, offset)

#: Why an original is missing: slug -> what it means.
MISSING_REASONS = {
    "expired": "offset below the partition's beginning offset: removed by retention",
    "beyond_end": "offset at or past the partition's end offset: the topic was recreated or truncated",
    "no_partition": "the topic or partition does not exist (any more)",
    "not_found": "no message at that offset (compacted away, or a transaction marker)",
    "sha256_mismatch": "the message at that offset is not the image that was scored (sha256 differs)",
    "fetch_timeout": "the broker returned nothing for that offset in time",
}


def origin_text(origin: Origin) -> str:
    """`topic:partition:offset`, as in dead-letter and vetted headers."""
    return f"{origin[0]}:{origin[1]}:{origin[2]}"


@dataclass(frozen=True)
class Original:
    """One input message as fetched: its value (the image bytes), key, headers and Kafka timestamp."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None

    @property
    def origin(self) -> Origin:
        return (self.topic, self.partition, self.offset)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.value).hexdigest()

    def header(self, name: str) -> bytes | None:
        """The first header called `name`, or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class Missing:
    """An original that could not be fetched (or was not the scored image), and why."""

    topic: str
    partition: int
    offset: int
    reason: str  # a key of MISSING_REASONS
    detail: str

    @property
    def origin(self) -> Origin:
        return (self.topic, self.partition, self.offset)


def open_consumer(kafka: KafkaSettings) -> Any:
    """A group-less kafka-python consumer (bounded start-up retries: a one-line StartupError when the broker
    does not answer)."""
    from kafka import KafkaConsumer

    from dlsr_monitor.common.connections import kafka_retry
    from dlsr_monitor.common.kafka_io import FRAME_MAX_BYTES

    return kafka_retry(
        kafka,
        lambda: KafkaConsumer(
            **kafka.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=30_000,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            receive_message_max_bytes=FRAME_MAX_BYTES,  # originals are images: frames over 1 MB are normal
        ),
    )


def _tp(topic: str, partition: int) -> Any:
    from kafka.structs import TopicPartition

    return TopicPartition(topic, partition)


def read_topic(consumer: Any, topic: str, *, idle_timeout_s: float = 15.0) -> Iterator[Any]:
    """Every record of `topic` from each partition's beginning up to its end offset as of the call, in fetch
    order; an absent topic reads as empty.

    The end is the larger of the listed end offset and the high watermark of the first fetch: some brokers
    (Tansu) list the base offset of the last record batch + 1 as the end, short of the batch's other records.

    Raises:
        StartupError: the broker stopped returning records for `idle_timeout_s` before the end was reached.
    """
    from dlsr_monitor.config.errors import StartupError

    parts = sorted(consumer.partitions_for_topic(topic) or ())
    if not parts:
        return
    tps = [_tp(topic, p) for p in parts]
    begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
    todo = {tp for tp in tps if end[tp] > begin[tp]}
    if not todo:
        return
    consumer.assign(sorted(todo, key=lambda tp: tp.partition))
    for tp in todo:
        consumer.seek(tp, begin[tp])
    last = time.monotonic()
    settled: set = set()  # partitions whose end was checked against a fetch's high watermark
    while todo:
        got = consumer.poll(timeout_ms=500, max_records=2000)
        for tp in todo - settled:
            hw = consumer.highwater(tp)
            if hw is not None:
                end[tp] = max(end[tp], int(hw))
                settled.add(tp)
        for tp, recs in got.items():
            for r in recs:
                if r.offset < end[tp]:
                    yield r
        for tp in list(todo):
            if consumer.position(tp) >= end[tp]:
                todo.discard(tp)
                consumer.pause(tp)
        now = time.monotonic()
        if got:
            last = now
        elif todo and now - last > idle_timeout_s:
            where = ", ".join(f"{tp.partition}@{consumer.position(tp)}/{end[tp]}" for tp in sorted(todo))
            raise StartupError(
                f"reading {topic} stalled: no records for {idle_timeout_s:.0f} s before the end (partition@"
                f"position/end: {where}); check the broker"
            )


def fetch_originals(
    consumer: Any,
    wanted: Iterable[tuple[Origin, str | None]],
    *,
    timeout_s: float = 15.0,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[dict[Origin, Original], dict[Origin, Missing]]:
    """Fetch the messages at the given origins and prove each by its expected sha256 (None: not checked).

    An offset is past the end when a fetch's high watermark says so (not the listed end offset, which some
    brokers report short; see `read_topic`).

    Args:
        consumer: a group-less consumer (`open_consumer`); its assignment is replaced.
        wanted: (origin, expected sha256) pairs; a repeated origin is fetched once.
        timeout_s: longest wait for one offset.
        on_progress: called with the number of origins settled (fetched or missing) after each one.

    Returns:
        (found, missing), both keyed by origin; every wanted origin is in exactly one of them.
    """
    expected: dict[Origin, str | None] = {}
    for origin, sha in wanted:
        if expected.get(origin) is None:
            expected[origin] = sha
    by_tp: dict[tuple[str, int], set[int]] = defaultdict(set)
    for t, p, o in expected:
        by_tp[(t, p)].add(o)
    found: dict[Origin, Original] = {}
    missing: dict[Origin, Missing] = {}

    def settle() -> None:
        if on_progress is not None:
            on_progress(len(found) + len(missing))

    def lose(origin: Origin, reason: str, detail: str) -> None:
        missing[origin] = Missing(*origin, reason=reason, detail=detail)
        settle()

    partitions_of: dict[str, set[int]] = {}
    for (topic, partition), offsets in sorted(by_tp.items()):
        if topic not in partitions_of:
            partitions_of[topic] = set(consumer.partitions_for_topic(topic) or ())
        if partition not in partitions_of[topic]:
            for off in sorted(offsets):
                lose((topic, partition, off), "no_partition", f"{topic} has no partition {partition}")
            continue
        tp = _tp(topic, partition)
        begin = consumer.beginning_offsets([tp])[tp]
        consumer.assign([tp])
        got: dict[int, Any] = {}
        for off in sorted(offsets):
            origin = (topic, partition, off)
            if off < begin:
                lose(origin, "expired", f"offset {off} < beginning offset {begin}: removed by retention")
                continue
            arrived = "found" if off in got else _fetch_at(consumer, tp, off, offsets, got, timeout_s)
            rec = got.pop(off, None)
            if rec is None:
                now_begin = consumer.beginning_offsets([tp])[tp]
                if off < now_begin:
                    lose(origin, "expired", f"offset {off} < beginning offset {now_begin}: removed by retention")
                elif arrived == "beyond_end":
                    lose(origin, "beyond_end", f"offset {off} >= end offset {consumer.highwater(tp)}")
                elif arrived == "timeout":
                    lose(origin, "fetch_timeout", f"nothing returned for offset {off} within {timeout_s:g} s")
                else:
                    lose(origin, "not_found", f"no message at offset {off} (the next one is later)")
                continue
            original = Original(
                topic=topic,
                partition=partition,
                offset=off,
                value=bytes(rec.value or b""),
                key=rec.key,
                headers=tuple((k, bytes(v or b"")) for k, v in (rec.headers or ())),
                timestamp_ms=rec.timestamp,
            )
            want = expected[origin]
            if want is not None and original.sha256 != want:
                lose(
                    origin,
                    "sha256_mismatch",
                    f"recorded sha256 {want[:12]}..., the message at that offset has {original.sha256[:12]}...",
                )
                continue
            found[origin] = original
            settle()
    return found, missing


def _fetch_at(consumer: Any, tp: Any, off: int, wanted: set[int], got: dict[int, Any], timeout_s: float) -> str:
    """Seek to `off` and fetch until a record at or after it arrives; keep every wanted offset that comes with
    it in `got`. Returns "found" (a record at or after `off` came), "beyond_end" (the high watermark is at or
    below `off`) or "timeout"."""
    consumer.seek(tp, off)
    deadline = time.monotonic() + timeout_s
    while True:
        recs = consumer.poll(timeout_ms=500, max_records=500).get(tp, [])
        for r in recs:
            if r.offset in wanted and r.offset >= off:
                got.setdefault(r.offset, r)
        if any(r.offset >= off for r in recs):
            return "found"
        hw = consumer.highwater(tp)
        if hw is not None and off >= int(hw):
            # an offset past the end: an empty fetch (or, on Kafka, a reset to the beginning) says where the end is
            return "beyond_end"
        if time.monotonic() > deadline:
            return "timeout"
