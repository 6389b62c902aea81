"""`dlsr alerts`: follow the alerts topic with filters, as human lines or JSON lines.

Every run joins a consumer group of its own (a fresh id unless `--group` names one), so any number of subscribers
each see every alert; `--from-beginning` replays the topic first. The alert contract (common/contract.py) has no
severity field, so severity is derived here from kind and state: ood = warning, drift raised = critical, drift
cleared = info, model live = info, model load_failed = critical.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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


def make_consumer(kafka_settings, *, group_id: str | None, from_beginning: bool):
    """A kafka-python consumer on the alerts topic in its own group (fresh id unless given)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from dlsr_monitor.config.errors import StartupError

    group = group_id or f"dlsr-alerts-{uuid.uuid4().hex[:12]}"
    last: Exception | None = None
    for attempt in range(kafka_settings.connect_retries):
        try:
            return KafkaConsumer(
                kafka_settings.alerts_topic,
                group_id=group,
                auto_offset_reset="earliest" if from_beginning else "latest",
                enable_auto_commit=True,
                consumer_timeout_ms=500,
                **kafka_settings.client_kwargs(),
            )
        except KafkaError as exc:
            last = exc
            time.sleep(min(10.0, kafka_settings.retry_backoff_s * 2**attempt))
    raise StartupError(
        f"Kafka at {kafka_settings.bootstrap_servers} is not reachable ({last}); start the broker or set "
        "DLSR_KAFKA__BOOTSTRAP_SERVERS"
    )


def follow_alerts(
    kafka_settings,
    flt: AlertFilter,
    *,
    as_json: bool = False,
    from_beginning: bool = False,
    group_id: str | None = None,
    max_alerts: int | None = None,
    idle_timeout_s: float | None = None,
    out: TextIO | None = None,
    consumer_factory: Callable[..., object] | None = None,
) -> int:
    """Print alerts that pass `flt` until Ctrl-C, `max_alerts` printed or `idle_timeout_s` without one."""
    out = out or sys.stdout
    consumer = (consumer_factory or make_consumer)(
        kafka_settings, group_id=group_id, from_beginning=from_beginning
    )
    if out is sys.stdout and sys.stderr.isatty():  # a hint for a person; pipes and tests stay clean
        where = "from the beginning" if from_beginning else "new alerts only"
        print(
            f"following {kafka_settings.alerts_topic} at {kafka_settings.bootstrap_servers} ({where}); Ctrl-C stops",
            file=sys.stderr,
        )
    printed = 0
    last_seen = time.monotonic()
    try:
        while max_alerts is None or printed < max_alerts:
            batch = consumer.poll(timeout_ms=500)
            values = [rec.value for recs in batch.values() for rec in recs]
            if values:
                last_seen = time.monotonic()
            for alert in filter_alerts(values, flt):
                print(format_alert(alert, as_json=as_json), file=out, flush=True)
                printed += 1
                if max_alerts is not None and printed >= max_alerts:
                    break
            if idle_timeout_s is not None and time.monotonic() - last_seen > idle_timeout_s:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `dlsr alerts --json | head` closed the pipe: not an error
        pass
    finally:
        consumer.close()
    return 0
