"""`dlsr notify`: payloads, the retry policy against a real HTTP server, and the service on the real broker and
Redis (filters, dead letters, commits, de-duplication, a SIGKILL mid-stream and a restart of the OS process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from dlsr_monitor.common.contract import DriftAlert, ModelAlert, OodAlert, WindowStats
from dlsr_monitor.console.notify import (
    NotifyStats,
    RetryPolicy,
    Webhook,
    build_payload,
    json_payload,
    post_with_retries,
    resolves,
    retry_after_s,
    run_notify,
    slack_payload,
)
from dlsr_monitor.console.subscriber import AlertFilter
from tests.conftest import create_topics

ROOT = Path(__file__).resolve().parents[2]


def _ood(source: str, n: int) -> OodAlert:
    return OodAlert(
        alert_id=f"ood:{source}/{n:04d}", source=source, image_id=f"{source}/{n:04d}", topic="images", partition=0,
        offset=n, ts=1_700_000_000.0 + n, score=1.5, threshold=1.0, p_value=0.004, model_version="v1",
    )  # fmt: skip


def _drift(source: str, state: str, seq: int) -> DriftAlert:
    window = WindowStats(
        images=200, ood=60, rate=0.3, null_rate=0.02, p_value=1e-20, window_s=600, since=0.0, until=600.0
    )
    return DriftAlert(
        alert_id=f"drift:{source}:{seq}", source=source, state=state, seq=seq, ts=1_700_000_100.0, window=window,
        model_version="v1",
    )  # fmt: skip


FAILED = ModelAlert(
    alert_id="model:v3:failed", event="load_failed", version="v3", reason="sha256 mismatch", ts=1.0
)


def _doc(alert) -> dict:
    return alert.model_dump(mode="json")


# ---- a real webhook server ----------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (past the client's timeout: a timed-out post)


@dataclass
class Request:
    t: float
    path: str
    body: dict
    key: str
    status: int | None = None  # what the server answered (None while held)


class WebhookServer:
    """http.server in a thread. Replies come from `script[key]` (key: the path, or the body's `alert_id` with
    `by_alert_id`), then 200. `on_request(request)` may block or return a Reply that overrides the script."""

    def __init__(self, *, by_alert_id: bool = False) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.requests: list[Request] = []
        self.on_request: Callable[[Request], Reply | None] | None = None
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                key = str(body.get("alert_id")) if by_alert_id else self.path
                req = Request(time.monotonic(), self.path, body, key)
                with server._lock:
                    server.requests.append(req)
                    queue = server.script.get(key) or []
                    reply = queue.pop(0) if queue else Reply()
                if server.on_request is not None:
                    reply = server.on_request(req) or reply
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                req.status = reply.status
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok" if reply.status < 300 else b"no")
                except OSError:  # the client gave up (a timeout) or was killed
                    pass

            def log_message(self, *args: object) -> None:  # quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def of(self, key: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.key == key]

    def accepted(self) -> list[str]:
        """Keys answered with a 2xx, in order (a key twice here is a duplicate post)."""
        with self._lock:
            return [r.key for r in self.requests if r.status is not None and 200 <= r.status < 300]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server():
    srv = WebhookServer()
    yield srv
    srv.close()


@pytest.fixture
def alert_server():
    srv = WebhookServer(by_alert_id=True)
    yield srv
    srv.close()


FAST = RetryPolicy(timeout_s=0.3, max_attempts=4, backoff_s=0.05, backoff_max_s=0.4)


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


# ---- payloads (no servers) --------------------------------------------------------------------------------
def test_slack_payload_has_text_blocks_and_a_colour_by_severity():
    raised = slack_payload(_doc(_drift("cam-1", "raised", 1)))
    assert raised["text"].startswith(":rotating_light: CRITICAL: Drift raised on cam-1")
    assert [b["type"] for b in raised["blocks"]] == ["section", "section", "context"]
    assert "60/200 OOD" in raised["blocks"][0]["text"]["text"]
    assert {"type": "mrkdwn", "text": "*Severity*\ncritical"} in raised["blocks"][1]["fields"]
    assert "`drift:cam-1:1`" in raised["blocks"][2]["elements"][0]["text"]
    assert raised["attachments"][0]["color"] == "#d1242f"
    ood = slack_payload(_doc(_ood("cam-2", 7)))
    assert (
        ood["text"].startswith(":warning: WARNING: OOD image on cam-2")
        and ood["attachments"][0]["color"] == "#d4a72c"
    )
    failed = slack_payload(_doc(FAILED))
    assert (
        "Model v3 failed to load" in failed["text"]
        and "sha256 mismatch" in failed["blocks"][0]["text"]["text"]
    )
    json.dumps(raised)  # what goes on the wire


def test_a_cleared_drift_says_which_raised_it_resolves():
    cleared = _doc(_drift("cam-1", "cleared", 4))
    assert resolves(cleared) == "drift:cam-1:3"
    assert resolves(_doc(_drift("cam-1", "raised", 3))) is None and resolves(_doc(_ood("cam-1", 1))) is None
    slack = slack_payload(cleared)
    assert slack["text"] == ":white_check_mark: INFO: Drift cleared on cam-1 (resolves drift:cam-1:3)"
    assert "resolves `drift:cam-1:3`" in slack["blocks"][2]["elements"][0]["text"]
    assert slack["attachments"][0]["color"] == "#2da44e"
    generic = json_payload(cleared)
    assert generic["resolves"] == "drift:cam-1:3" and generic["severity"] == "info"
    assert {k: v for k, v in generic.items() if k not in ("resolves", "severity")} == cleared


def test_json_payload_is_the_alert_plus_severity_and_slack_text_is_escaped():
    doc = _doc(_ood("cam-<b>&", 1))
    assert json_payload(doc) == {**doc, "severity": "warning"}
    assert "resolves" not in json_payload(doc)
    assert "cam-&lt;b&gt;&amp;" in slack_payload(doc)["text"]
    with pytest.raises(ValueError, match="slack or json"):
        build_payload(doc, "xml")


def test_retry_after_and_the_capped_exponential_backoff():
    assert retry_after_s("3") == 3.0 and retry_after_s(" 0.5 ") == 0.5 and retry_after_s("-4") == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("nan") is None
    now = time.time()
    assert 8.0 <= retry_after_s(formatdate(now + 10, usegmt=True), now=now) <= 10.0
    policy = RetryPolicy(backoff_s=1.0, backoff_max_s=5.0)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(1, retry_after=2.5) == 2.5 and policy.delay(1, retry_after=600) == 5.0


def test_a_webhook_is_named_without_its_secret_path():
    hook = Webhook("https://user:pw@hooks.slack.com/services/T0/B0/secret")
    assert hook.where == "https://hooks.slack.com" and len(hook.id) == 16
    assert hook.id != Webhook("https://hooks.slack.com/services/T0/B0/other").id


# ---- the retry policy against a real HTTP server ------------------------------------------------------------
def test_a_accepted_at_once(server, session):
    result = post_with_retries(session, Webhook(server.url("/ok")), slack_payload(_doc(_ood("c", 1))), FAST)
    assert result.ok and result.status == 200 and result.attempts == 1
    (req,) = server.of("/ok")
    assert set(req.body) == {"text", "blocks", "attachments"}


def test_b_two_500s_then_accepted(server, session):
    server.script["/flaky"] = [Reply(500), Reply(502)]
    result = post_with_retries(session, Webhook(server.url("/flaky")), {"alert_id": "x"}, FAST)
    assert result.ok and result.attempts == 3
    t = [r.t for r in server.of("/flaky")]
    assert [r.status for r in server.of("/flaky")] == [500, 502, 200]
    assert t[1] - t[0] >= 0.045 and t[2] - t[1] >= 0.095  # backoff_s, then doubled


def test_c_429_honours_retry_after(server, session):
    server.script["/limited"] = [Reply(429, {"Retry-After": "1"})]
    policy = RetryPolicy(timeout_s=1.0, max_attempts=3, backoff_s=0.01, backoff_max_s=5.0)
    result = post_with_retries(session, Webhook(server.url("/limited")), {"alert_id": "x"}, policy)
    assert result.ok and result.attempts == 2
    first, second = server.of("/limited")
    assert second.t - first.t >= 0.95  # the server's 1 s, not the 0.01 s backoff


def test_d_a_timeout_is_retried(server, session):
    server.script["/slow"] = [Reply(200, delay_s=1.5)]  # answers after the client's 0.3 s timeout
    t0 = time.monotonic()
    result = post_with_retries(session, Webhook(server.url("/slow")), {"alert_id": "x"}, FAST)
    assert result.ok and result.attempts == 2
    assert time.monotonic() - t0 < 1.4  # the client gave up on the first post; it did not wait it out
    assert len(server.of("/slow")) == 2


def test_e_a_400_is_final_and_a_dead_end_connection_is_retried(server, session):
    server.script["/bad"] = [Reply(400)] * 5
    result = post_with_retries(session, Webhook(server.url("/bad")), {"alert_id": "x"}, FAST)
    assert (
        not result.ok
        and result.status == 400
        and result.attempts == 1
        and result.detail.startswith("HTTP 400")
    )
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    result = post_with_retries(session, Webhook(closed), {}, FAST)
    assert not result.ok and result.status is None and result.attempts == FAST.max_attempts
    assert "ConnectionError" in result.detail


def test_a_stop_during_a_retry_wait_abandons_the_alert(server, session):
    server.script["/down"] = [Reply(503)] * 10
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    policy = RetryPolicy(timeout_s=1.0, max_attempts=5, backoff_s=5.0, backoff_max_s=5.0)
    result = post_with_retries(session, Webhook(server.url("/down")), {}, policy, stop=stop)
    assert result.abandoned and not result.ok and result.attempts == 1
    assert time.monotonic() - t0 < 2.0


# ---- the service on the real broker and Redis ---------------------------------------------------------------
def _produce(kafka, alerts) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka.client_kwargs(), acks="all")
    for alert in alerts:
        value = alert if isinstance(alert, bytes) else alert.to_bytes()
        key = b"junk" if isinstance(alert, bytes) else alert.source.encode()
        producer.send(kafka.alerts_topic, key=key, value=value, headers=[("trace", b"t-1")])
    producer.flush(30)
    producer.close()


def _notify_settings(test_settings, prefix: str, **notify):
    values = {"group_id": f"notify-{prefix}", "payload": "json", "timeout_s": 0.3, "backoff_s": 0.05,
              "backoff_max_s": 0.4, "max_attempts": 4, **notify}  # fmt: skip
    return test_settings.model_copy(update={"notify": test_settings.notify.model_copy(update=values)})


class Running:
    """`run_notify` in a thread; `finish()` sets stop and returns its stats."""

    def __init__(self, settings, **kwargs) -> None:
        self.stop = threading.Event()
        self.box: dict = {}

        def target() -> None:
            try:
                self.box["stats"] = run_notify(settings, stop=self.stop, **kwargs)
            except BaseException as exc:  # surfaced by finish()
                self.box["error"] = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait_for(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if "error" in self.box:
                raise self.box["error"]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def finish(self) -> NotifyStats:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "notify did not stop within 30 s"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["stats"]


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in sorted(c.partitions_for_topic(topic))}
    finally:
        c.close(autocommit=False)


def _dead_letters(bootstrap: str, topic: str, n: int, timeout_s: float = 20) -> list:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                      enable_auto_commit=False, consumer_timeout_ms=int(timeout_s * 1000))  # fmt: skip
    out: list = []
    try:
        for rec in c:
            out.append(rec)
            if len(out) >= n:
                break
        return out
    finally:
        c.close()


@pytest.mark.integration
def test_service_filters_retries_dead_letters_and_commits(tansu, test_settings, prefix, keys, alert_server):
    """(a)-(e) through the whole service: accepted, 500 twice, 429 + Retry-After, a timeout, a final 400."""
    kafka = test_settings.kafka
    create_topics(tansu, [kafka.alerts_topic, kafka.dlq_topic], partitions=1)  # one partition: one order
    a, b, c, d, e = (_ood("cam-1", n) for n in range(1, 6))
    alert_server.script = {
        b.alert_id: [Reply(500), Reply(500)],
        c.alert_id: [Reply(429, {"Retry-After": "1"})],
        d.alert_id: [Reply(200, delay_s=1.0)],
        e.alert_id: [Reply(400)] * 9,
    }
    filtered = [_ood("cam-2", 6), _drift("cam-1", "cleared", 2)]  # another source; below --min-severity
    _produce(kafka, [a, b, c, d, e, *filtered, b"not an alert", FAILED])
    # Retry-After is honoured up to backoff_max_s
    settings = _notify_settings(test_settings, prefix, backoff_max_s=2.0)
    t0 = time.monotonic()
    run = Running(settings, webhooks=[alert_server.url()], flt=AlertFilter(sources=frozenset({"cam-1"}),
                                                                           min_severity="warning"))  # fmt: skip
    run.wait_for(lambda: FAILED.alert_id in alert_server.accepted(), 60, "the last alert to be posted")
    stats = run.finish()
    elapsed = time.monotonic() - t0

    assert sorted(alert_server.accepted()) == sorted(x.alert_id for x in (a, b, c, d, FAILED))
    assert [r.status for r in alert_server.of(b.alert_id)] == [500, 500, 200]
    c1, c2 = alert_server.of(c.alert_id)
    assert c2.t - c1.t >= 0.95  # Retry-After, not the 0.05 s backoff
    assert len(alert_server.of(d.alert_id)) == 2 and len(alert_server.of(e.alert_id)) == 1  # 400: no retry
    assert alert_server.of(FAILED.alert_id)[0].body["severity"] == "critical"
    assert stats == NotifyStats(posted=5, failed=1, deduped=0, filtered=2, undecodable=1, retries=4)

    (dead,) = _dead_letters(tansu, kafka.dlq_topic, 1)
    headers = {k: v.decode() for k, v in dead.headers}
    assert dead.value == e.to_bytes() and dead.key == b"cam-1"
    assert headers["error"] == "webhook_failed" and headers["trace"] == "t-1"
    assert "HTTP 400" in headers["error_detail"] and "after 1 attempt(s)" in headers["error_detail"]
    assert headers["origin"] == f"{kafka.alerts_topic}:0:4"
    assert alert_server.url() not in headers["error_detail"]  # only scheme and host: paths hold secrets

    assert _committed(tansu, settings.notify.group_id, kafka.alerts_topic) == {0: 9}  # all 9 records
    print(f"service run: {elapsed:.1f} s")


# ---- the OS process: SIGKILL mid-stream, restart, SIGTERM ---------------------------------------------------
class NotifyProcess:
    """`python -m dlsr_monitor.cli.main notify` configured by DLSR_* variables only, in a tmp working directory."""

    def __init__(self, settings, workdir: Path, name: str) -> None:
        k, r, n = settings.kafka, settings.redis, settings.notify
        env = {key: val for key, val in os.environ.items() if not key.startswith("DLSR_")}
        env.update({
            "DLSR_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
            "DLSR_KAFKA__ALERTS_TOPIC": k.alerts_topic,
            "DLSR_KAFKA__DLQ_TOPIC": k.dlq_topic,
            "DLSR_REDIS__URL": r.url,
            "DLSR_REDIS__PREFIX": r.prefix,
            "DLSR_NOTIFY__GROUP_ID": n.group_id,
            "DLSR_NOTIFY__WEBHOOKS": json.dumps(n.webhooks),
            "DLSR_NOTIFY__PAYLOAD": n.payload,
            "DLSR_NOTIFY__BACKOFF_S": "0.05",
            "DLSR_LOG__FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        })  # fmt: skip
        self.log_path = workdir / f"notify-{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlsr_monitor.cli.main", "notify"],
            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=self._log,
        )  # fmt: skip

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"notify exited with {self.proc.returncode}:\n" + "\n".join(self.lines()[-30:]))

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._log.close()


def _wait(cond: Callable[[], bool], timeout_s: float, what: str, proc: NotifyProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        proc.alive()
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.05)


@pytest.mark.integration
def test_sigkill_mid_stream_then_restart_posts_each_alert_exactly_once(
    tansu, test_settings, prefix, rkeys, alert_server, tmp_path
):
    """30 alerts on 3 partitions; the process is SIGKILLed while its 12th post is in flight (the server holds
    it and answers 503 once the process is gone: not accepted). The restart replays the whole topic (a fresh
    consumer group: as if every commit had been lost) to the same webhook and a second one: the first gets the
    19 it had not accepted and none of the 11 again, the second all 30, each once (de-duplication is per
    webhook); SIGTERM exits 0. Both processes log JSON lines only."""
    kafka = test_settings.kafka
    create_topics(tansu, [kafka.alerts_topic, kafka.dlq_topic], partitions=3)
    alerts = [_ood(f"cam-{n % 3}", n) for n in range(30)]
    _produce(kafka, alerts)
    everything = {a.alert_id for a in alerts}

    def accepted(path: str) -> Counter:
        return Counter(r.key for r in alert_server.requests if r.path == path and r.status == 200)

    held, release = threading.Event(), threading.Event()

    def hold_the_12th(req: Request) -> Reply | None:
        if len(alert_server.requests) == 12:
            held.set()
            release.wait(60)
            return Reply(503)
        return None

    alert_server.on_request = hold_the_12th
    t0 = time.monotonic()
    settings = _notify_settings(test_settings, prefix, webhooks=[alert_server.url("/one")])
    first = NotifyProcess(settings, tmp_path, "first")
    _wait(held.is_set, 60, "the 12th post", first)
    first.proc.kill()
    assert first.wait(10) == -signal.SIGKILL
    release.set()
    t_killed = time.monotonic()
    assert sum(accepted("/one").values()) == 11

    replay = _notify_settings(
        test_settings, prefix, group_id=f"notify-replay-{prefix}", webhooks=[alert_server.url("/one"),
                                                                            alert_server.url("/two")],
    )  # fmt: skip
    second = NotifyProcess(replay, tmp_path, "second")
    _wait(lambda: set(accepted("/one")) == set(accepted("/two")) == everything, 60, "all 30 alerts", second)
    time.sleep(0.3)  # a duplicate in flight would land now
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    t_done = time.monotonic()

    for path in ("/one", "/two"):
        counts = accepted(path)
        assert set(counts) == everything and set(counts.values()) == {1}, (path, counts.most_common(3))
    client, k = rkeys
    for path in ("/one", "/two"):
        key = k.notify_posted(Webhook(alert_server.url(path)).id)
        assert client.zcard(key) == 30 and 0 < client.ttl(key) <= replay.notify.dedupe_ttl_s

    # JSON logs: every stderr line of both processes is one object with the documented fields.
    host = socket.gethostname()
    for proc in (first, second):
        records = [json.loads(line) for line in proc.lines()]
        assert records, "no log lines"
        for rec in records:
            assert {"time", "level", "logger", "message", "instance"} <= set(rec), rec
            assert rec["instance"] == f"{host}-{proc.proc.pid}"
        posted = [r for r in records if r["message"].startswith("posted ")]
        assert posted and all(r["source"].startswith("cam-") for r in posted)
    last = json.loads(second.lines()[-1])
    assert last["message"].startswith("notify stopped:") and last["logger"] == "dlsr_monitor.console.notify"
    assert "posted 49, failed 0, deduped 11" in last["message"], last["message"]
    print(f"first run to the kill {t_killed - t0:.1f} s, restart to SIGTERM exit {t_done - t_killed:.1f} s")
