"""Kafka adapters (kafka-python): a consumer-group source, an acknowledged sink, topic creation.

Connections retry through `common.connections` (one policy for Kafka and Redis).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.streams import Headers, Message, SinkError

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import KafkaSettings

log = logging.getLogger(__name__)


def _kwargs(kafka: KafkaSettings | str) -> dict:
    if isinstance(kafka, str):
        return {"bootstrap_servers": [s.strip() for s in kafka.split(",") if s.strip()]}
    return kafka.client_kwargs()


def ensure_topics(kafka: KafkaSettings | str, names: list[str], *, partitions: int = 3) -> list[str]:
    """Create the topics that do not exist yet (`kafka`: KafkaSettings or a bootstrap string); returns those
    created. Existing topics are left as they are."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    # KafkaAdminClient.list_topics fails to decode Tansu's metadata (ACL fields); a consumer's view works.
    probe = KafkaConsumer(**_kwargs(kafka), request_timeout_ms=10000)
    try:
        existing = set(probe.topics())
    finally:
        probe.close()
    missing = [n for n in dict.fromkeys(names) if n not in existing]
    if not missing:
        return []
    admin = KafkaAdminClient(**_kwargs(kafka), request_timeout_ms=10000)
    try:
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing],
                    validate_only=False,
                )
        return missing
    finally:
        admin.close()


class KafkaSource:
    """Consumer-group source: manual commits only, bounded prefetch.

    Args:
        kafka: KafkaSettings (bootstrap, security).
        topic: input topic.
        group_id: consumer group shared by replicas.
        max_poll_records: most records one poll returns (bounds memory).
    """

    def __init__(self, kafka: KafkaSettings, topic: str, group_id: str, *, max_poll_records: int = 256) -> None:
        from kafka import KafkaConsumer

        self.topic = topic
        self._consumer = KafkaConsumer(
            **_kwargs(kafka),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max_poll_records,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            max_poll_interval_ms=300_000,
        )
        self._consumer.subscribe([topic])

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        got = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[Message] = []
        for records in got.values():
            for r in records:
                out.append(
                    Message(
                        topic=r.topic,
                        partition=r.partition,
                        offset=r.offset,
                        value=r.value,
                        key=r.key,
                        headers=[(k, v if v is not None else b"") for k, v in (r.headers or [])],
                        timestamp_ms=r.timestamp,
                    )
                )
        return out

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        from kafka.errors import CommitFailedError
        from kafka.structs import OffsetAndMetadata, TopicPartition

        if not offsets:
            return
        payload = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            self._consumer.commit(payload)
        except CommitFailedError as exc:
            # A rebalance moved these partitions away; the new owner replays them and the Redis watermark
            # makes the replay's effects no-ops (at-least-once output, exactly-once state).
            log.warning("commit refused after a rebalance (%s); the new owner will replay", exc)

    def lag(self) -> int | None:
        try:
            parts = list(self._consumer.assignment())
            if not parts:
                return 0
            ends = self._consumer.end_offsets(parts)
            return int(sum(max(0, ends[tp] - self._consumer.position(tp)) for tp in parts))
        except Exception:  # lag is informational; never let it stop the loop
            return None

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class KafkaSink:
    """Producer whose `flush` raises `SinkError` unless every record since the last flush was acknowledged."""

    def __init__(self, kafka: KafkaSettings) -> None:
        from kafka import KafkaProducer

        self._producer = KafkaProducer(
            **_kwargs(kafka),
            acks="all",
            linger_ms=5,
            retries=5,
            max_in_flight_requests_per_connection=1,  # keep per-partition order through retries
            max_request_size=32 * 1024 * 1024,  # dead letters carry the original (possibly large) value
        )
        self._futures: list[Any] = []

    def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None:
        self._futures.append(self._producer.send(topic, key=key, value=value, headers=list(headers or [])))

    def flush(self, timeout_s: float) -> None:
        futures, self._futures = self._futures, []
        try:
            self._producer.flush(timeout=timeout_s)
        except Exception as exc:
            raise SinkError(f"produce not acknowledged within {timeout_s:.0f} s: {exc}") from exc
        for f in futures:
            if not f.is_done:
                raise SinkError(f"produce not acknowledged within {timeout_s:.0f} s")
            if f.failed():
                raise SinkError(f"produce failed: {f.exception}")

    def close(self) -> None:
        self._producer.close(timeout=10)
