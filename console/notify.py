"""`dlsr notify`: follow `dlsr.alerts` in a consumer group of its own and post each alert to webhooks.

The filters are `dlsr alerts`' (`console.subscriber.AlertFilter`: `--source`, `--kind`, `--min-severity`) and so is
the severity (derived from kind and state). Two payloads:

- `slack`: `text` (the notification line, an emoji by severity) plus `blocks` (the line and the details), with a
  colour bar by severity in `attachments`; a drift `cleared` says which `raised` it resolves;
- `json`: the alert document plus `severity`, and `resolves: drift:<source>:<seq-1>` on a cleared drift.

Delivery, per alert and webhook:

1. skip it when Redis says it was already posted there (`Keys.notify_posted(webhook_id)`: a sorted set of alert
   ids scored by post time, trimmed to `notify.dedupe_ttl_s`), so a replay after a crash posts nothing twice;
2. post it; 5xx, 429 (its Retry-After honoured up to `backoff_max_s`), timeouts and connection errors are
   retried with capped exponential backoff (`backoff_s` doubling to `backoff_max_s`) up to `max_attempts`
   posts; any other answer but 2xx is final;
3. a success is marked in Redis; a final failure is dead-lettered to `kafka.dlq_topic` (the alert's bytes, key
   and headers plus `error=webhook_failed`, `error_detail` with the HTTP status, `origin=topic:partition:offset`)
   and not marked, so the same alert produced again (a redrive) is posted again;
4. then, and only then, the alert's offset is committed.

At-least-once: the one window for a repeat is a crash between a webhook's 2xx and the Redis mark. A post that
timed out may still have arrived; its retry can repeat it (webhooks that de-duplicate can use `alert_id`).
SIGTERM finishes the alert in hand (a post in flight is completed; a retry wait is cut short, the alert is then
left uncommitted and replayed on restart), commits and returns. Redis and broker outages are waited out
(`common.connections.ride_out`) for their sections' `outage_budget_s`.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dlsr_monitor.common.connections import Abandoned, OutagePolicy, redis_errors, ride_out
from dlsr_monitor.common.contract import DLQ_ERROR, DLQ_ERROR_DETAIL, DLQ_ORIGIN
from dlsr_monitor.common.keys import Keys
from dlsr_monitor.common.streams import Message, SinkError, Source
from dlsr_monitor.console.subscriber import AlertFilter, alert_line, decode_alert, severity_of

if TYPE_CHECKING:
    import redis
    import requests

    from dlsr_monitor.common.observability import Health
    from dlsr_monitor.common.streams import Sink
    from dlsr_monitor.config.settings import NotifySettings, Settings

log = logging.getLogger(__name__)

DLQ_REASON = "webhook_failed"
POLL_RECORDS = 20  # alerts in hand at most; each is committed as soon as it is done
PRODUCE_TIMEOUT_S = 30.0

EMOJI = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}
RESOLVED_EMOJI = ":white_check_mark:"
COLOUR = {"critical": "#d1242f", "warning": "#d4a72c", "info": "#1f6feb"}
RESOLVED_COLOUR = "#2da44e"


# ---- what is posted ---------------------------------------------------------------------------------------
def resolves(alert: dict) -> str | None:
    """For a drift `cleared`, the alert id of the `raised` it ends (`drift:<source>:<seq-1>`); else None."""
    if alert.get("kind") != "drift" or alert.get("state") != "cleared":
        return None
    seq = alert.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    return f"drift:{alert.get('source')}:{seq - 1}"


def json_payload(alert: dict) -> dict:
    """The generic payload: the alert document plus `severity` (and `resolves` on a cleared drift)."""
    out = {**alert, "severity": severity_of(alert)}
    if (ended := resolves(alert)) is not None:
        out["resolves"] = ended
    return out


def _esc(text: object) -> str:
    # Slack mrkdwn: &, < and > are control characters (links, mentions); sources and reasons are untrusted.
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _title(alert: dict) -> str:
    kind, src = alert.get("kind"), alert.get("source", "?")
    if kind == "ood":
        return f"OOD image on {src}"
    if kind == "drift":
        return f"Drift {alert.get('state', '?')} on {src}"
    if kind == "model":
        event = alert.get("event")
        return f"Model {alert.get('version', '?')} {'failed to load' if event == 'load_failed' else event or '?'}"
    return f"{kind or 'alert'} on {src}"


def slack_payload(alert: dict) -> dict:
    """A Slack-compatible incoming-webhook payload: `text` + `blocks`, a colour bar by severity."""
    sev = severity_of(alert)
    ended = resolves(alert)
    emoji = RESOLVED_EMOJI if ended else EMOJI[sev]
    title = _title(alert)
    if ended:
        title += f" (resolves {ended})"
    text = f"{emoji} {sev.upper()}: {title}"
    detail = alert_line(alert)
    fields = [
        {"type": "mrkdwn", "text": f"*Severity*\n{sev}"},
        {"type": "mrkdwn", "text": f"*Source*\n{_esc(alert.get('source', '?'))}"},
        {"type": "mrkdwn", "text": f"*Kind*\n{_esc(alert.get('kind', '?'))}"},
    ]
    model = alert.get("model_version") or alert.get("version")
    if model:
        fields.append({"type": "mrkdwn", "text": f"*Model*\n{_esc(model)}"})
    context = f"alert `{_esc(alert.get('alert_id', '?'))}`"
    if ended:
        context += f" · resolves `{_esc(ended)}`"
    blocks = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} *{_esc(title)}*\n{_esc(detail)}"}},
        {"type": "section", "fields": fields},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
    ]
    colour = RESOLVED_COLOUR if ended else COLOUR[sev]
    return {"text": _esc(text), "blocks": blocks, "attachments": [{"color": colour, "fallback": _esc(text)}]}


def build_payload(alert: dict, style: str) -> dict:
    """`style` "slack" or "json"."""
    if style == "slack":
        return slack_payload(alert)
    if style == "json":
        return json_payload(alert)
    raise ValueError(f"payload must be slack or json, got {style!r}")


# ---- posting with retries ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Webhook:
    """One target. `id` (a hash of the URL) names it in Redis keys, logs and dead letters: the URL's path is
    often a secret (Slack's is), so only the scheme and host (`where`) are ever printed."""

    url: str

    @property
    def id(self) -> str:
        return hashlib.sha256(self.url.encode()).hexdigest()[:16]

    @property
    def where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


@dataclass(frozen=True)
class RetryPolicy:
    """How one alert is posted: `max_attempts` posts, `timeout_s` each, backoff doubling from `backoff_s` to
    `backoff_max_s` (a Retry-After replaces the backoff, capped at `backoff_max_s`)."""

    timeout_s: float = 10.0
    max_attempts: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0

    @classmethod
    def of(cls, notify: NotifySettings) -> RetryPolicy:
        return cls(notify.timeout_s, notify.max_attempts, notify.backoff_s, notify.backoff_max_s)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.backoff_max_s)
        return min(self.backoff_s * 2.0 ** (attempt - 1), self.backoff_max_s)


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from now; None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


@dataclass(frozen=True)
class PostResult:
    """How posting one alert to one webhook ended."""

    ok: bool
    status: int | None  # the last HTTP status (None: no answer)
    attempts: int
    detail: str = ""  # why the last attempt failed
    abandoned: bool = False  # a stop came during a retry wait: neither posted nor given up


def _snippet(resp: requests.Response, limit: int = 300) -> str:
    try:
        raw = resp.raw.read(limit, decode_content=True) if resp.raw is not None else b""
    except Exception:  # the body is only for the operator's eyes
        raw = b""
    return " ".join(raw.decode("utf-8", "replace").split())[:limit]


def post_with_retries(
    session: requests.Session,
    hook: Webhook,
    payload: dict,
    policy: RetryPolicy,
    *,
    stop: threading.Event | None = None,
    sleep: Callable[[float], None] = time.sleep,
    extra: dict | None = None,
) -> PostResult:
    """POST `payload` as JSON to `hook` under `policy`. Never raises for HTTP or network trouble."""
    import requests

    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "dlsr-notify/1"}
    status: int | None = None
    detail = ""
    attempt = 0
    while True:
        attempt += 1
        wait_hint: float | None = None
        try:
            resp = session.post(
                hook.url,
                data=body,
                headers=headers,
                timeout=policy.timeout_s,
                allow_redirects=False,
                stream=True,
            )
        except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            status, detail = None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        except requests.RequestException as exc:  # an invalid URL, too many redirects: retrying cannot help
            return PostResult(False, None, attempt, f"{type(exc).__name__}: {exc}")
        else:
            with resp:
                status = resp.status_code
                if 200 <= status < 300:
                    return PostResult(True, status, attempt)
                detail = f"HTTP {status}" + (f": {text}" if (text := _snippet(resp)) else "")
                if status != 429 and status < 500:
                    return PostResult(False, status, attempt, detail)
                wait_hint = retry_after_s(resp.headers.get("Retry-After"))
        if attempt >= policy.max_attempts:
            return PostResult(False, status, attempt, detail)
        pause = policy.delay(attempt, wait_hint)
        log.warning(
            "webhook %s (%s) failed (attempt %d/%d, %s): retrying in %.2f s",
            hook.id, hook.where, attempt, policy.max_attempts, detail, pause, extra=extra,
        )  # fmt: skip
        if stop is not None:
            if stop.wait(pause) or stop.is_set():
                return PostResult(False, status, attempt, detail, abandoned=True)
        else:
            sleep(pause)


# ---- de-duplication ---------------------------------------------------------------------------------------
class PostedSet:
    """Alert ids posted per webhook, in Redis (`Keys.notify_posted`), remembered for `ttl_s`."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: float) -> None:
        self.redis, self.keys, self.ttl_s = client, keys, float(ttl_s)

    def seen(self, hook: Webhook, alert_id: str) -> bool:
        score = self.redis.zscore(self.keys.notify_posted(hook.id), alert_id)
        return score is not None and float(score) >= time.time() - self.ttl_s

    def mark(self, hook: Webhook, alert_id: str) -> None:
        """Idempotent: re-marking only moves the post time."""
        key, now = self.keys.notify_posted(hook.id), time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(key, {alert_id: now})
        pipe.zremrangebyscore(key, "-inf", now - self.ttl_s)
        pipe.expire(key, max(1, math.ceil(self.ttl_s)))
        pipe.execute()


# ---- the service ------------------------------------------------------------------------------------------
@dataclass
class NotifyStats:
    """Counts of one run (the tests read them; the exit log line reports them)."""

    posted: int = 0  # (alert, webhook) pairs accepted with a 2xx
    failed: int = 0  # pairs given up on and dead-lettered
    deduped: int = 0  # pairs skipped: already posted there (a replay)
    filtered: int = 0  # alerts the filters dropped
    undecodable: int = 0  # records on the topic that are not alerts
    retries: int = 0  # posts beyond the first of an alert

    def line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in asdict(self).items())


class _Stopped(Exception):
    """A stop came while the alert in hand could not be finished; it stays uncommitted and is replayed."""


class Notifier:
    """The loop: poll, filter, post to every webhook (de-duplicated), dead-letter what failed, commit.

    Args:
        source: the alerts topic in the notifier's consumer group (`KafkaSource`).
        sink: where dead letters go (`KafkaSink`).
        posted: the Redis de-duplication set.
        webhooks: targets, each gets every alert that passes `flt`.
        payload: "slack" or "json".
        dlq_topic: the dead-letter topic.
        outages: `OutagePolicy` per "Redis" and "Kafka" (how long outages are waited out).
    """

    def __init__(
        self,
        *,
        source: Source,
        sink: Sink,
        posted: PostedSet,
        webhooks: Sequence[Webhook],
        flt: AlertFilter,
        payload: str,
        policy: RetryPolicy,
        dlq_topic: str,
        outages: dict[str, OutagePolicy] | None = None,
        session: requests.Session | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        import requests

        if not webhooks:
            raise ValueError("no webhook to post to")
        build_payload({}, payload)  # refuse an unknown style now, not on the first alert
        self.source, self.sink, self.posted = source, sink, posted
        self.webhooks, self.flt, self.payload, self.policy = list(webhooks), flt, payload, policy
        self.dlq_topic = dlq_topic
        self.outages = outages or {}
        self.session = session or requests.Session()
        self.stop = stop or threading.Event()
        self.stats = NotifyStats()
        self.health: Health | None = None  # set by run_notify when the endpoints are served

    # -- one alert -----------------------------------------------------------------------------------------
    def _redis(self, what: Callable[[], Any]) -> Any:
        try:
            return ride_out(
                "Redis",
                what,
                errors=redis_errors(),
                policy=self.outages.get("Redis", OutagePolicy()),
                stop=self.stop,
            )
        except Abandoned as exc:
            raise _Stopped(str(exc)) from exc

    def handle(self, msg: Message) -> bool:
        """Post one record to every webhook it is due for; False when there was nothing to post (not an alert,
        filtered out). Raises `_Stopped` when a stop leaves it unfinished."""
        alert = decode_alert(msg.value) if msg.value else None
        origin = f"{msg.topic}:{msg.partition}:{msg.offset}"
        if alert is None:
            self.stats.undecodable += 1
            log.warning("record %s is not an alert: skipped", origin)
            return False
        if not self.flt.accepts(alert):
            self.stats.filtered += 1
            return False
        alert_id = str(alert.get("alert_id") or origin)
        extra = {"source": str(alert.get("source", "?")), "alert_id": alert_id}
        body = build_payload(alert, self.payload)
        for hook in self.webhooks:
            if self._redis(lambda hook=hook: self.posted.seen(hook, alert_id)):
                self.stats.deduped += 1
                log.info("%s already posted to %s (%s): skipped", alert_id, hook.id, hook.where, extra=extra)
                continue
            result = post_with_retries(self.session, hook, body, self.policy, stop=self.stop, extra=extra)
            self.stats.retries += result.attempts - 1
            if result.abandoned:
                raise _Stopped(f"stopped while retrying {alert_id} to {hook.where}")
            if result.ok:
                self._redis(lambda hook=hook: self.posted.mark(hook, alert_id))
                self.stats.posted += 1
                log.info(
                    "posted %s to %s (%s), HTTP %s after %d attempt(s)",
                    alert_id, hook.id, hook.where, result.status, result.attempts, extra=extra,
                )  # fmt: skip
            else:
                self._dead_letter(msg, hook, result, origin)
                self.stats.failed += 1
                log.error(
                    "gave up on %s to %s (%s) after %d attempt(s): %s; dead-lettered to %s",
                    alert_id, hook.id, hook.where, result.attempts, result.detail, self.dlq_topic, extra=extra,
                )  # fmt: skip
        return True

    def _dead_letter(self, msg: Message, hook: Webhook, result: PostResult, origin: str) -> None:
        from kafka.errors import KafkaError

        drop = {DLQ_ERROR, DLQ_ERROR_DETAIL, DLQ_ORIGIN}
        detail = f"webhook {hook.id} ({hook.where}) after {result.attempts} attempt(s): {result.detail or 'no answer'}"
        headers = [(k, v) for k, v in msg.headers if k not in drop] + [
            (DLQ_ERROR, DLQ_REASON.encode()),
            (DLQ_ERROR_DETAIL, detail.encode("utf-8", "replace")[:1000]),
            (DLQ_ORIGIN, origin.encode()),
        ]

        def produce() -> None:
            self.sink.send(self.dlq_topic, msg.key, msg.value or b"", headers)
            self.sink.flush(PRODUCE_TIMEOUT_S)

        try:
            ride_out(
                "Kafka",
                produce,
                errors=(SinkError, KafkaError),
                policy=self.outages.get("Kafka", OutagePolicy()),
                stop=self.stop,
            )
        except Abandoned as exc:
            raise _Stopped(str(exc)) from exc

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> NotifyStats:
        """Until `stop`: returns the counts (the alert in hand is finished and committed first)."""
        try:
            while not self.stop.is_set():
                if self.health is not None:
                    self.health.progressed()
                messages = self.source.poll(POLL_RECORDS, 0.5)
                owned = self.source.assigned()
                done: dict[tuple[str, int], int] = {}
                try:
                    for msg in messages:
                        tp = (msg.topic, msg.partition)
                        if owned is not None and tp not in owned:
                            continue  # revoked since the poll: its new owner replays it
                        posted_any = self.handle(msg)
                        done[tp] = msg.offset + 1
                        if self.stop.is_set():
                            break
                        if posted_any:  # each alert that reached a webhook is committed at once
                            self.source.commit(done)
                            done = {}
                except _Stopped as exc:
                    log.warning("%s; uncommitted, it is replayed on restart", exc)
                    self.stop.set()
                if done:
                    self.source.commit(done)
        finally:
            log.info("notify stopped: %s", self.stats.line())
        return self.stats


def run_notify(
    settings: Settings,
    *,
    webhooks: Sequence[str] | None = None,
    flt: AlertFilter | None = None,
    payload: str | None = None,
    stop: threading.Event | None = None,
) -> NotifyStats:
    """Wire a `Notifier` from the settings (`webhooks` / `payload` override `settings.notify`) and run it until
    `stop` (the CLI sets it on SIGTERM / SIGINT). Outages at start-up are waited out like the services'."""
    from dlsr_monitor.common.connections import connect_redis, kafka_retry
    from dlsr_monitor.common.kafka_io import KafkaSink, KafkaSource, ensure_topics

    stop = stop or threading.Event()
    kafka, notify = settings.kafka, settings.notify
    urls = list(webhooks) if webhooks else list(notify.webhooks)
    if not urls:
        raise ValueError("no webhook: pass --webhook URL or set DLSR_NOTIFY__WEBHOOKS")
    hooks = [Webhook(u) for u in dict.fromkeys(urls)]
    try:
        client = connect_redis(settings.redis, wait=True, stop=stop)
        kafka_retry(
            kafka,
            lambda: ensure_topics(
                kafka, [kafka.alerts_topic, kafka.dlq_topic], partitions=kafka.topic_partitions
            ),
            wait=True,
            stop=stop,
        )
        sink = kafka_retry(kafka, lambda: KafkaSink(kafka), wait=True, stop=stop)
        source = kafka_retry(
            kafka,
            lambda: KafkaSource(kafka, kafka.alerts_topic, notify.group_id, max_poll_records=POLL_RECORDS),
            wait=True,
            stop=stop,
        )
    except Abandoned:
        return NotifyStats()
    notifier = Notifier(
        source=source,
        sink=sink,
        posted=PostedSet(client, Keys.of(settings.redis), notify.dedupe_ttl_s),
        webhooks=hooks,
        flt=flt or AlertFilter(),
        payload=payload or notify.payload,
        policy=RetryPolicy.of(notify),
        dlq_topic=kafka.dlq_topic,
        outages={"Redis": OutagePolicy.of(settings.redis), "Kafka": OutagePolicy.of(kafka)},
        stop=stop,
    )
    log.info(
        "notify following %s as group %s: %d webhook(s) (%s), %s payload",
        kafka.alerts_topic, notify.group_id, len(hooks), ", ".join(h.where for h in hooks), notifier.payload,
    )  # fmt: skip
    from dlsr_monitor.common.observability import Health, NotifyMetrics, serve

    notifier.health = Health(settings.metrics.stall_s)
    for check in ("redis", "kafka", "webhooks"):
        notifier.health.set(check, True)
    metrics = NotifyMetrics(lambda: {k: getattr(notifier.stats, k) for k in ("posted", "failed", "deduped")})
    server = serve(settings.metrics, metrics.registry, notifier.health)
    try:
        return notifier.run()
    finally:
        if server is not None:
            server.stop()
        source.close()
        sink.close()
        notifier.session.close()
        client.close()
