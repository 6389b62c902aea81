"""Kafka adapters (kafka-python): a consumer-group source, an acknowledged sink, topic creation.

Connections retry through `common.connections` (one policy for Kafka and Redis).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.streams import Headers, Message, SinkError

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import KafkaSettings

log = logging.getLogger(__name__)
#: Largest network frame a consumer accepts: above fetch_max_bytes and the largest message value allowed.
FRAME_MAX_BYTES = 64 * 1024 * 1024


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
    """Consumer-group source: manual commits only, bounded prefetch, rebalances handled as routine.

    A commit refused because the group is rebalancing is not an error: its offsets stay pending and are
    committed on the next `commit` for the partitions still owned; on revocation the pending offsets of the
    revoked partitions are committed one last time (they are replayed by the new owner when that fails too: same
    ids, Redis effects skipped by the watermark). `assigned()` tells the loop which partitions it still owns, so
    work polled before a rebalance is dropped for the partitions that moved. No call here blocks without a
    timeout.

    Args:
        kafka: KafkaSettings (bootstrap, security).
        topic: input topic.
        group_id: consumer group shared by replicas.
        max_poll_records: most records one poll returns (bounds memory).
        commit_timeout_s: longest a commit may block the loop (then it stays pending).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        group_id: str,
        *,
        max_poll_records: int = 256,
        commit_timeout_s: float = 10.0,
    ) -> None:
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import ConsumerRebalanceListener

        self.topic = topic
        self.commit_timeout_s = commit_timeout_s
        self._pending: dict[tuple[str, int], int] = {}  # offsets produced-and-applied, not yet committed
        self._owned: set[tuple[str, int]] = set()
        self.rebalances = 0
        self._consumer = KafkaConsumer(
            **_kwargs(kafka),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max_poll_records,
            fetch_max_bytes=16 * 1024 * 1024,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # kafka-python refuses network frames over 1 MB by default and only gets the record after a
            # reconnect: a fetch must fit one frame (found by the fault suite with 1.5 MB images).
            receive_message_max_bytes=FRAME_MAX_BYTES,
            max_poll_interval_ms=300_000,
        )
        source = self

        class _Listener(ConsumerRebalanceListener):
            # Runs on the loop's thread inside poll(), before the group re-forms: the generation is still valid.
            def on_partitions_revoked(self, revoked):  # noqa: ANN001 - kafka-python's signature
                gone = {(tp.topic, tp.partition) for tp in revoked}
                source._commit_now({tp: o for tp, o in source._pending.items() if tp in gone}, final=True)
                source._owned -= gone
                for tp in gone:
                    source._pending.pop(tp, None)
                if gone:
                    log.info("partitions revoked: %s", sorted(gone))

            def on_partitions_assigned(self, assigned):  # noqa: ANN001
                source._owned = {(tp.topic, tp.partition) for tp in assigned}
                source.rebalances += 1
                log.info("partitions assigned: %s", sorted(source._owned))

        self._consumer.subscribe([topic], listener=_Listener())

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

    def assigned(self) -> set[tuple[str, int]]:
        """(topic, partition) pairs this consumer owns now."""
        return set(self._owned)

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Commit `offsets` (merged with earlier pending ones) for the partitions still owned."""
        for tp, off in offsets.items():
            if tp in self._owned or not self._owned:
                self._pending[tp] = max(self._pending.get(tp, 0), int(off))
        pending = {tp: o for tp, o in self._pending.items() if tp in self._owned or not self._owned}
        if self._commit_now(pending, final=False):
            for tp, off in pending.items():
                if self._pending.get(tp) == off:
                    del self._pending[tp]

    def _commit_now(self, offsets: Mapping[tuple[str, int], int], *, final: bool) -> bool:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata, TopicPartition

        if not offsets:
            return True
        payload = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            self._consumer.commit(payload, timeout_ms=int(self.commit_timeout_s * 1000))
            return True
        except (KafkaError, AssertionError) as exc:
            # RebalanceInProgress / CommitFailed / IllegalGeneration / a timeout: routine in a group. The offsets
            # stay pending (retried after the next poll); revoked ones are replayed by their new owner, whose
            # Redis effects are no-ops (the watermark) and whose outputs repeat the same ids.
            what = "revoked partitions (the new owner replays them)" if final else "pending; retried after poll"
            log.warning("commit of %d partition(s) not done (%s: %s): %s", len(offsets), type(exc).__name__,
                        exc, what)
            return False

    def lag(self) -> int | None:
        """Messages behind the end of the owned partitions from what the consumer already knows (no network
        call); None when unknown, including when nothing is assigned."""
        try:
            parts = list(self._consumer.assignment())
            if not parts:
                return None
            total = 0
            for tp in parts:
                high = self._consumer.highwater(tp)
                pos = self._consumer.position(tp, timeout_ms=0)
                if high is None or pos is None:
                    return None
                total += max(0, int(high) - int(pos))
            return total
        except Exception:  # lag is informational; never let it stop the loop
            return None

    def broker_seen_s(self) -> float | None:
        """Seconds since the group coordinator last answered this consumer (None when unknown).

        An empty poll means "nothing to consume" only while the broker answers; this tells the two apart. It
        reads kafka-python's heartbeat record (no public accessor exists in 2.3); None if that ever moves.
        """
        try:
            beat = self._consumer._coordinator.heartbeat
            last = max(float(beat.last_receive), float(beat.last_reset))  # a (re)join counts as an answer
        except Exception:
            return None
        return time.time() - last if last > 0 else None

    def lag_by_partition(self) -> dict[int, int]:
        """Lag of each owned partition whose end and position are already known (no network call)."""
        out: dict[int, int] = {}
        try:
            for tp in self._consumer.assignment():
                high, pos = self._consumer.highwater(tp), self._consumer.position(tp, timeout_ms=0)
                if high is not None and pos is not None:
                    out[tp.partition] = max(0, int(high) - int(pos))
        except Exception:  # informational only
            return {}
        return out

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
