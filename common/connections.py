"""One way to connect (arq's `connections.py` is the model): Kafka and Redis clients with the same start-up
retry policy and the same one-line `StartupError`, the outage policy the long-running services share (wait an
outage out with capped exponential backoff and jitter), and their signal handling.

Commands (`dlsr alerts`, `dlsr model list` ...) fail within their bounded start-up retries; services
(`wait=True`) keep waiting for as long as the section's `outage_budget_s` allows (0 = forever).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from dlsr_monitor.config.errors import StartupError

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.config.settings import KafkaSettings, RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

_FIX = {"Kafka": "start the broker or set DLSR_KAFKA__BOOTSTRAP_SERVERS", "Redis": "start Redis or set DLSR_REDIS__URL"}


class Abandoned(RuntimeError):
    """A stop was requested while an outage was being waited out (the work in hand is replayed later)."""


@dataclass(frozen=True)
class OutagePolicy:
    """How a service waits out an outage: backoff from `backoff_s` doubling to `backoff_max_s` with jitter,
    for at most `budget_s` seconds (0 = indefinitely)."""

    budget_s: float = 0.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    @classmethod
    def of(cls, section: KafkaSettings | RedisSettings) -> OutagePolicy:
        return cls(budget_s=section.outage_budget_s, backoff_s=section.retry_backoff_s)


def ride_out(
    what: str,
    step: Callable[[], T],
    *,
    errors: tuple[type[BaseException], ...],
    policy: OutagePolicy,
    stop: threading.Event | None = None,
    on_change: Callable[[bool], None] | None = None,
) -> T:
    """Run `step`; while it raises one of `errors`, wait and retry (the step must be idempotent).

    Logs one line when `what` goes away and one when it is back; `on_change(False)` / `on_change(True)` tell the
    caller (readiness). Re-raises the last error once `policy.budget_s` is spent; raises `Abandoned` when `stop`
    is set meanwhile.
    """
    delay, started = policy.backoff_s, None
    while True:
        try:
            result = step()
        except errors as exc:
            now = time.monotonic()
            if started is None:
                started = now
                log.warning("%s unreachable (%s: %s): waiting it out", what, type(exc).__name__, exc)
                if on_change is not None:
                    on_change(False)
            if policy.budget_s and now - started > policy.budget_s:
                log.error("%s still unreachable after %.0f s (outage budget): giving up", what, now - started)
                raise
            if stop is not None and stop.is_set():
                raise Abandoned(f"stopped while {what} was unreachable; the work in hand is replayed") from exc
            pause = delay * (0.5 + random.random())  # jitter: replicas do not retry in lockstep
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
            delay = min(delay * 2.0, policy.backoff_max_s)
            continue
        if started is not None:
            log.warning("%s is back after %.1f s; resuming", what, time.monotonic() - started)
            if on_change is not None:
                on_change(True)
        return result


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


def _with_policy(
    section: KafkaSettings | RedisSettings,
    connect: Callable[[], T],
    what: str,
    where: str,
    *,
    wait: bool,
    stop: threading.Event | None = None,
) -> T:
    """Start-up connection under a section's policy: bounded retries, or (`wait`) its outage budget."""
    if not wait:
        return with_retries(
            connect, what=what, where=where, retries=section.connect_retries, backoff_s=section.retry_backoff_s,
            fix=_FIX[what],
        )
    try:
        return ride_out(what, connect, errors=(Exception,), policy=OutagePolicy.of(section), stop=stop)
    except Abandoned:
        raise
    except Exception as exc:
        raise StartupError(
            f"{what} at {where} unreachable for the whole outage budget ({section.outage_budget_s:g} s): "
            f"{type(exc).__name__}: {exc}; {_FIX[what]}"
        ) from exc


def kafka_retry(
    kafka: KafkaSettings, connect: Callable[[], T], *, wait: bool = False, stop: threading.Event | None = None
) -> T:
    """Connect to Kafka under `KafkaSettings`' retry policy (used by the monitor and the trainer)."""
    return _with_policy(kafka, connect, "Kafka", kafka.bootstrap_servers, wait=wait, stop=stop)


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM / SIGINT set `stop`: the loop finishes the batch in flight, commits and returns."""

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the batch in flight, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def redis_errors() -> tuple[type[BaseException], ...]:
    """The redis-py errors that mean 'the server is unreachable' (an outage), not 'the command is wrong'."""
    from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

    return (ConnectionError, TimeoutError, BusyLoadingError, OSError)


def redis_client(redis_settings: RedisSettings) -> redis.Redis:
    """A client for the settings, not yet connected: `redis.Redis`, or `RedisCluster` (same API for everything
    this product calls) when `redis.cluster` is set."""
    import redis

    kwargs = {"socket_connect_timeout": 5, **redis_settings.client_kwargs()}
    if redis_settings.cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(redis_settings.url, **kwargs)
    return redis.Redis.from_url(redis_settings.url, **kwargs)


def connect_redis(
    redis_settings: RedisSettings, *, wait: bool = False, stop: threading.Event | None = None
) -> redis.Redis:
    """A pinged `redis.Redis` client: bounded retries (StartupError when unreachable), or with `wait` (services)
    for as long as the outage budget allows."""

    def connect() -> redis.Redis:
        client = redis_client(redis_settings)
        client.ping()
        return client

    return _with_policy(redis_settings, connect, "Redis", redis_settings.url, wait=wait, stop=stop)
