"""`dlsr alerts`: follow the alerts topic with filters, as human lines or JSON lines.

Every run joins a consumer group of its own (a fresh id unless `--group` names one), so any number of subscribers
each see every alert; `--from-beginning` replays the topic first, `--since 2h` (or an ISO time) from that time. A
broker that stops answering ends the run with one line after the start-up retry budget, never a silent wait. The alert contract (common/contract.py) has no
severity field, so severity is derived here from kind and state: ood = warning, drift raised = critical, drift
cleared = info, model live = info, model load_failed = critical.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from dlsr_monitor.console.dashboard import alert_line, severity_of

SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class AlertFilter:
    """Which alerts a subscriber wants; empty sets mean "all"."""

    sources: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    min_severity: str = "info"

    def __post_init__(self) -> None:
        if self.min_severity not in SEVERITY_ORDER:
            raise ValueError(
                f"min_severity must be one of {', '.join(SEVERITY_ORDER)}, got {self.min_severity!r}"
            )

    def accepts(self, alert: dict) -> bool:
        """True when the alert passes every filter (model alerts, source '*', match any --source)."""
        if self.kinds and alert.get("kind") not in self.kinds:
            return False
        src = alert.get("source")
        if self.sources and src not in self.sources and src != "*":
            return False
        return SEVERITY_ORDER[severity_of(alert)] >= SEVERITY_ORDER[self.min_severity]


def decode_alert(value: bytes) -> dict | None:
    """The alert as a dict, validated against the contract when possible; None for a record that is not JSON."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        from dlsr_monitor.common.contract import parse_alert

        return parse_alert(value).model_dump(mode="json")
    except Exception:  # an alert from a newer schema: still show what it says
        return data


def format_alert(alert: dict, *, as_json: bool) -> str:
    """One output line: JSON (with `severity` added) or the human line."""
    if as_json:
        return json.dumps({**alert, "severity": severity_of(alert)}, separators=(",", ":"), sort_keys=True)
    return alert_line(alert)


def filter_alerts(values: Iterable[bytes], flt: AlertFilter) -> Iterator[dict]:
    """Decoded alerts that pass the filter, in order; undecodable records are skipped."""
    for value in values:
        alert = decode_alert(value)
        if alert is not None and flt.accepts(alert):
            yield alert


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (`90s`, `15m`, `2h`, `1d`) or an ISO-8601 time (UTC unless it has an
    offset: `2025-06-01T12:00`, `2025-06-01 12:00:00+02:00`, `...Z`) -> Unix seconds. ValueError says what works."""
    now = time.time() if now is None else now
    value = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value.lower())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a duration (90s, 15m, 2h, 1d) nor an ISO time (2025-06-01T12:00[Z])"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ts = when.timestamp()
    if ts > now + 60:
        raise ValueError(f"--since {text!r} is in the future")
    return ts


_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SESSION_S = 10.0  # kafka-python's default group session timeout


def broker_silence_limit_s(kafka_settings) -> float:
    """How long `dlsr alerts` follows without any answer from the broker before it stops with one line: the
    start-up retry budget (`connect_retries` attempts, backoff from `retry_backoff_s` doubling to 10 s), at
    least 15 s (longer than the group's 10 s session timeout, so a rebalance is not mistaken for an outage)."""
    budget = sum(min(10.0, kafka_settings.retry_backoff_s * 2**i) for i in range(kafka_settings.connect_retries))
    return max(_SESSION_S + 5.0, budget)


def make_consumer(kafka_settings, *, group_id: str | None, from_beginning: bool):
    """A kafka-python consumer subscribed to the alerts topic in its own group (a fresh id unless given), under
    the one start-up retry policy (`common.connections.with_retries`: bounded, then one StartupError line).

    A fresh group commits nothing (nobody resumes it); a named group auto-commits so a rerun resumes."""
    from kafka import KafkaConsumer

    from dlsr_monitor.common.connections import with_retries

    group = group_id or f"dlsr-alerts-{uuid.uuid4().hex[:12]}"

    def connect():
        consumer = KafkaConsumer(
            group_id=group,
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=group_id is not None,
            **kafka_settings.client_kwargs(),
        )
        consumer.subscribe([kafka_settings.alerts_topic])
        return consumer

    # "not ready (try 1/5)" notes help a person waiting at a terminal; a script gets the one error line only.
    notes = logging.getLogger("dlsr_monitor.common.connections")
    level = notes.level
    if not sys.stderr.isatty():
        notes.setLevel(logging.ERROR)
    try:
        return with_retries(
            connect,
            what="Kafka",
            where=kafka_settings.bootstrap_servers,
            retries=kafka_settings.connect_retries,
            backoff_s=kafka_settings.retry_backoff_s,
            fix="start the broker or set DLSR_KAFKA__BOOTSTRAP_SERVERS",
        )
    finally:
        notes.setLevel(level)


def broker_silence_s(consumer, answered: float) -> float:
    """Seconds since the broker last answered this consumer's group (coordinator found, join, heartbeat), from
    kafka-python's heartbeat record (no public accessor in 2.3, as in `common.kafka_io.KafkaSource`), or since
    `answered` (the last answer seen otherwise) if later; 0.0 when the record cannot be read (no false alarm)."""
    try:
        beat = consumer._coordinator.heartbeat
        last = max(float(beat.last_receive), float(beat.last_reset), answered)
    except Exception:
        return 0.0
    return max(0.0, time.time() - last)


def follow_alerts(
    kafka_settings,
    flt: AlertFilter,
    *,
    as_json: bool = False,
    from_beginning: bool = False,
    since: float | None = None,
    group_id: str | None = None,
    max_alerts: int | None = None,
    idle_timeout_s: float | None = None,
    silence_limit_s: float | None = None,
    out: TextIO | None = None,
    consumer_factory: Callable[..., object] | None = None,
) -> int:
    """Print alerts that pass `flt` until Ctrl-C, `max_alerts` printed or `idle_timeout_s` without a *matching*
    alert. `since` (Unix seconds) replays from that time (the broker's offsets for that timestamp).

    Raises StartupError (one line; the CLI exits 1) when the broker gives no answer at all for `silence_limit_s`
    (default `broker_silence_limit_s`): a broker that went away mid-follow is an error, not an endless wait.
    """
    from dlsr_monitor.config.errors import StartupError

    out = out or sys.stdout
    consumer = (consumer_factory or make_consumer)(
        kafka_settings, group_id=group_id, from_beginning=from_beginning and since is None
    )
    limit = broker_silence_limit_s(kafka_settings) if silence_limit_s is None else silence_limit_s
    if out is sys.stdout and sys.stderr.isatty():  # a hint for a person; pipes and tests stay clean
        where = (
            f"since {datetime.fromtimestamp(since, UTC):%Y-%m-%d %H:%M:%S} UTC" if since is not None
            else "from the beginning" if from_beginning else "new alerts only"
        )
        print(
            f"following {kafka_settings.alerts_topic} at {kafka_settings.bootstrap_servers} ({where}); Ctrl-C stops",
            file=sys.stderr,
        )
    printed = 0
    answered = time.time()  # the consumer's creation counts as the broker's first answer
    last_match = time.monotonic()
    sought: set = set()
    broker_ok = True
    try:
        while max_alerts is None or printed < max_alerts:
            batch = consumer.poll(timeout_ms=500)
            if since is not None:
                batch = _seek_new_partitions(consumer, since, sought, batch)
            values = [rec.value for recs in batch.values() for rec in recs]
            if values:
                answered = time.time()  # records are an answer too
            silent = broker_silence_s(consumer, answered)
            timed_out = idle_timeout_s is not None and time.monotonic() - last_match > idle_timeout_s
            # "No alert within --timeout" is only true of a broker that answered; past the group's session
            # timeout (10 s) without an answer, the run ends as a broker outage (exit 1), not as a quiet stream.
            if silent > limit or (timed_out and silent > _SESSION_S):
                broker_ok = False
                raise StartupError(
                    f"Kafka at {kafka_settings.bootstrap_servers} stopped answering: no reply for {silent:.0f} s "
                    f"(limit {limit:.0f} s: DLSR_KAFKA__CONNECT_RETRIES x DLSR_KAFKA__RETRY_BACKOFF_S); "
                    "start it again and rerun (`--since` replays what was missed)"
                )
            for alert in filter_alerts(values, flt):
                print(format_alert(alert, as_json=as_json), file=out, flush=True)
                printed += 1
                last_match = time.monotonic()
                if max_alerts is not None and printed >= max_alerts:
                    break
            if timed_out:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `dlsr alerts --json | head` closed the pipe: not an error
        pass
    finally:
        # Never the unbounded commit of kafka-python's default close: with the broker gone it waits forever.
        try:
            consumer.close(autocommit=broker_ok and group_id is not None, timeout_ms=5000)
        except TypeError:  # a test double's close()
            consumer.close()
        except Exception:  # closing is best effort; the line above (if any) is what matters
            pass
    return 0


def _seek_new_partitions(consumer, since: float, sought: set, batch: dict) -> dict:
    """Move newly assigned partitions to the first offset at or after `since` (the end when there is none);
    records this poll fetched for them from the reset position are dropped (they are fetched again)."""
    fresh = [tp for tp in consumer.assignment() if tp not in sought]
    if not fresh:
        return batch
    from kafka.errors import KafkaError

    from dlsr_monitor.config.errors import StartupError

    try:
        found = consumer.offsets_for_times({tp: int(since * 1000) for tp in fresh})
    except KafkaError as exc:
        raise StartupError(f"Kafka did not give the offsets for --since ({type(exc).__name__}: {exc})") from exc
    for tp in fresh:
        hit = found.get(tp)
        if hit is None:
            consumer.seek_to_end(tp)
        else:
            consumer.seek(tp, hit.offset)
    sought.update(fresh)
    return {tp: recs for tp, recs in batch.items() if tp not in fresh}
