"""Stream plumbing without I/O: the message type, the source/sink interfaces the loop talks to, the batching
policy, and in-memory source/sink (unit tests, embedding). The Kafka adapters live in `monitor.kafka_io`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
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

    def close(self) -> None: ...


class Sink(Protocol):
    """Where records go (a Kafka producer in production). `flush` raises when any send since the last flush
    failed, so the caller never commits input whose output was lost."""

    def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None: ...

    def flush(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


class SinkError(RuntimeError):
    """The broker did not acknowledge a record; the batch is not committed and will be replayed."""


def collect_batch(
    poll: Callable[[int, float], list[Message]],
    *,
    batch_max: int,
    wait_s: float,
    idle_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> list[Message]:
    """Fill one batch: up to `batch_max` messages, waiting at most `wait_s` after the first one arrived.

    With nothing to read it returns an empty list after `idle_s`, so the caller can check for shutdown.
    Memory is bounded by `batch_max` (the poll never asks for more than the room left).
    """
    batch: list[Message] = []
    deadline: float | None = None
    while len(batch) < batch_max:
        if deadline is None:
            timeout = idle_s
        else:
            timeout = deadline - clock()
            if timeout <= 0:
                break
        got = poll(batch_max - len(batch), max(0.0, timeout))
        if got:
            batch.extend(got)
            if deadline is None:
                deadline = clock() + wait_s
        elif deadline is None:
            break
    return batch


class MemorySource:
    """An in-memory source: a list of messages, committed offsets recorded per partition."""

    def __init__(self, messages: Sequence[Message] = ()) -> None:
        self._messages = list(messages)
        self._pos = 0
        self._lock = threading.Lock()
        self.committed: dict[tuple[str, int], int] = {}
        self.closed = False

    def add(self, messages: Sequence[Message]) -> None:
        with self._lock:
            self._messages.extend(messages)

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        with self._lock:
            out = self._messages[self._pos : self._pos + max_records]
            self._pos += len(out)
        if not out and timeout_s > 0:
            time.sleep(min(timeout_s, 0.01))
        return out

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        for tp, off in offsets.items():
            self.committed[tp] = max(self.committed.get(tp, 0), off)

    def rewind_to_committed(self) -> None:
        """Simulate a restart: redeliver everything after the committed offsets."""
        with self._lock:
            self._pos = 0
            self._messages = [
                m for m in self._messages if m.offset >= self.committed.get((m.topic, m.partition), 0)
            ]

    def lag(self) -> int | None:
        with self._lock:
            return len(self._messages) - self._pos

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._pos >= len(self._messages)

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class SentRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers


class MemorySink:
    """An in-memory sink: records land in `sent` only when flushed (like an acknowledged produce)."""

    def __init__(self, fail_next_flush: bool = False) -> None:
        self._pending: list[SentRecord] = []
        self.sent: list[SentRecord] = []
        self.fail_next_flush = fail_next_flush
        self.closed = False

    def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> None:
        self._pending.append(SentRecord(topic, key, value, list(headers or [])))

    def flush(self, timeout_s: float) -> None:
        if self.fail_next_flush:
            self.fail_next_flush = False
            self._pending.clear()
            raise SinkError("simulated broker failure")
        self.sent.extend(self._pending)
        self._pending.clear()

    def on(self, topic: str) -> list[SentRecord]:
        return [r for r in self.sent if r.topic == topic]

    def close(self) -> None:
        self.closed = True
