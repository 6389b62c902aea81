"""Public test doubles (bytewax's `testing.py` is the model): an in-memory source and sink for the loops, and a
minimal artifact directory for registry and watcher tests.

The source and sink implement `common.streams.Source` / `Sink`; unit tests and embedding use them instead of Kafka.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dlsr_monitor.common.streams import Headers, Message, SinkError


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

    def assigned(self) -> set[tuple[str, int]] | None:
        return None  # no consumer group: every partition is ours

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


def make_artifact(root: Path, name: str, payload: bytes) -> Path:
    """A minimal saved-detector directory: weights plus a manifest pinning their sha256 (dlsr's layout)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(payload)
    manifest = {
        "format_version": 1,
        "name": name,
        "files": {"weights.safetensors": hashlib.sha256(payload).hexdigest()},
    }
    (d / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    return d
