"""Stream interfaces without I/O: the message type and the source / sink the loops talk to.

The Kafka adapters are in `common.kafka_io`; in-memory ones for tests are in `common.testing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Message:
    """One input record as every source hands it over."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    timestamp_ms: int | None = None


class Source(Protocol):
    """Where messages come from (a Kafka consumer in production)."""

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        """Up to `max_records` messages, waiting at most `timeout_s` for the first one."""

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Mark everything below `offsets[(topic, partition)]` as done."""

    def lag(self) -> int | None:
        """Messages behind the end of the assigned partitions (None when unknown)."""

    def assigned(self) -> set[tuple[str, int]] | None:
        """The (topic, partition) pairs owned now; None when the source has no group (owns everything)."""

    def close(self) -> None: ...


class Sink(Protocol):
    """Where records go (a Kafka producer in production). `flush` raises when any send since the last flush
    failed, so the caller never commits input whose output was lost."""

    def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None: ...

    def flush(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


class SinkError(RuntimeError):
    """The broker did not acknowledge a record; the batch is not committed and will be replayed."""
