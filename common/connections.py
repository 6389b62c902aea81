"""One way to connect (arq's `connections.py` is the model): Kafka and Redis clients with the same bounded
start-up retry policy and the same one-line `StartupError`, and the signal handling both services share.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from dlsr_monitor.config.errors import StartupError

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.config.settings import KafkaSettings, RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


def with_retries(
    connect: Callable[[], T], *, what: str, where: str, retries: int, backoff_s: float, fix: str = ""
) -> T:
    """Call `connect` up to `retries` times (backoff doubling, capped at 10 s), else raise StartupError."""
    delay = backoff_s
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            return connect()
        except Exception as exc:  # any connection failure; the last one is reported
            last = exc
            if attempt < retries:
                log.warning("%s at %s not ready (try %d/%d): %s", what, where, attempt, retries, exc)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
    detail = f"{type(last).__name__}: {last}" if last else "unknown error"
    raise StartupError(f"{what} at {where} unreachable after {retries} tries: {detail}{'; ' + fix if fix else ''}")


def _with_policy(section: KafkaSettings | RedisSettings, connect: Callable[[], T], what: str, where: str) -> T:
    """`with_retries` under a settings section's retry policy (`connect_retries`, `retry_backoff_s`)."""
    fix = {"Kafka": "start the broker or set DLSR_KAFKA__BOOTSTRAP_SERVERS", "Redis": "start Redis or set DLSR_REDIS__URL"}
    return with_retries(
        connect, what=what, where=where, retries=section.connect_retries, backoff_s=section.retry_backoff_s,
        fix=fix[what],
    )


def kafka_retry(kafka: KafkaSettings, connect: Callable[[], T]) -> T:
    """Connect to Kafka under `KafkaSettings`' retry policy (used by the monitor and the trainer)."""
    return _with_policy(kafka, connect, "Kafka", kafka.bootstrap_servers)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM / SIGINT set `stop`: the loop finishes the batch in flight, commits and returns."""

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the batch in flight, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def connect_redis(redis_settings: RedisSettings) -> redis.Redis:
    """A pinged `redis.Redis` client, with bounded retries (StartupError when unreachable)."""
    import redis

    def connect() -> redis.Redis:
        client = redis.Redis.from_url(redis_settings.url, socket_connect_timeout=5, **redis_settings.client_kwargs())
        client.ping()
        return client

    return _with_policy(redis_settings, connect, "Redis", redis_settings.url)
