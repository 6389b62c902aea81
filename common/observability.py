"""Prometheus metrics and health endpoints for the services, with `prometheus-client`.

One `CollectorRegistry` per service object (no module-level metrics, so tests and several services in one process
never share counters). `serve(...)` exposes `/metrics`, `/healthz` (liveness: the loop made progress within
`stall_s`, or is idle with nothing to consume) and `/readyz` (model loaded, broker and Redis reachable) on one port.

Label cardinality is bounded: at most `max_sources` distinct `source` values per metric; later sources are counted
under `source="other"` (a camera fleet of thousands must not become thousands of time series per metric).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import MetricsSettings

log = logging.getLogger(__name__)
OTHER = "other"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Health:
    """What /healthz and /readyz answer, updated by the service loop (thread-safe enough: plain assignments)."""

    def __init__(self, stall_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = float(stall_s)
        self._clock = clock
        self.last_progress = clock()
        self.checks: dict[str, bool] = {}
        self.detail: dict[str, object] = {}  # extra facts shown in both answers (e.g. broker_seen_s)
        self.busy_since: float | None = None  # inside one long step (a trainer job) that reports no progress

    def progressed(self) -> None:
        """The loop finished a step (a batch committed, or a poll that found nothing to consume)."""
        self.last_progress = self._clock()

    def set(self, name: str, ok: bool) -> None:
        self.checks[name] = bool(ok)

    def live(self) -> tuple[bool, dict]:
        now = self._clock()
        age = now - self.last_progress
        body = {"last_progress_s": round(age, 3), "stall_s": self.stall_s, **self.detail}
        if self.busy_since is not None:  # a refit can take an hour on a CPU: the loop is busy, not stalled
            return True, {**body, "busy_s": round(now - self.busy_since, 3)}
        return age <= self.stall_s, body

    def busy(self, on: bool) -> None:
        """Enter / leave a long step; leaving counts as progress."""
        self.busy_since = self._clock() if on else None
        if not on:
            self.progressed()

    def ready(self) -> tuple[bool, dict]:
        ok = bool(self.checks) and all(self.checks.values())
        return ok, {"checks": dict(self.checks)}


class SourceLabels:
    """Caps distinct `source` label values; the first `max_sources` seen keep their name."""

    def __init__(self, max_sources: int) -> None:
        self.max_sources = int(max_sources)
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, source: str) -> str:
        with self._lock:
            if source in self._known:
                return source
            if len(self._known) < self.max_sources:
                self._known.add(source)
                return source
            return OTHER


class MonitorMetrics:
    """The monitor's metrics (names follow Prometheus conventions: `_total` counters, units in names)."""

    def __init__(self, max_sources: int = 50, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.label = SourceLabels(max_sources)
        self.images = Counter("dlsr_images", "Images scored", ["source"], registry=r)
        self.ood = Counter("dlsr_ood", "Images flagged OOD (score over the threshold)", ["source"], registry=r)
        self.dead = Counter("dlsr_dead_letters", "Input messages dead-lettered, by reason", ["reason"], registry=r)
        self.drift = Gauge("dlsr_drift_raised", "1 while drift is raised for the source", ["source"], registry=r)
        self.batch = Histogram("dlsr_batch_size", "Messages per scored batch", buckets=_BATCH_BUCKETS, registry=r)
        self.score_s = Histogram("dlsr_score_seconds", "Model time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(
            "dlsr_end_to_end_latency_seconds", "Kafka timestamp to score record", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge("dlsr_consumer_lag", "Messages behind the end, per owned partition", ["partition"],
                         registry=r)
        self.model = Info("dlsr_model", "The live model version", registry=r)
        self.alpha = Gauge("dlsr_alpha", "Target false-alarm rate of the live model", registry=r)
        self.ready = Gauge("dlsr_ready", "1 when broker and Redis are reachable and a model serves", registry=r)
        self.outages = Counter("dlsr_outages", "Redis or broker outages waited out", ["what"], registry=r)

    def batch_done(
        self,
        *,
        scored: Iterable[tuple[str, bool]],
        dead_reasons: Iterable[str],
        batch_size: int,
        score_s: float,
        latencies_s: Iterable[float],
    ) -> None:
        """One committed batch: `scored` is (source, is_ood) per scored image."""
        for source, is_ood in scored:
            label = self.label(source)
            self.images.labels(label).inc()
            if is_ood:
                self.ood.labels(label).inc()
        for reason in dead_reasons:
            self.dead.labels(reason).inc()
        self.batch.observe(batch_size)
        self.score_s.observe(score_s)
        for s in latencies_s:
            if s >= 0:
                self.latency.observe(s)

    def drift_state(self, source: str, raised: bool) -> None:
        self.drift.labels(self.label(source)).set(1 if raised else 0)

    def model_live(self, version: str, alpha: float) -> None:
        self.model.info({"version": version})
        self.alpha.set(alpha)

    def partition_lag(self, lags: dict[int, int]) -> None:
        for partition, lag in lags.items():
            self.lag.labels(str(partition)).set(lag)


class TrainerMetrics:
    """The trainer's metrics: job outcomes and durations, gate results."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("dlsr_trainer_jobs", "Trainer jobs, by outcome", ["outcome"], registry=r)
        self.duration = Histogram(
            "dlsr_trainer_job_duration_seconds", "Trainer job wall time",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200), registry=r,
        )
        self.gates = Counter("dlsr_trainer_gate_results", "Gate results", ["gate", "result"], registry=r)
        self.ready = Gauge("dlsr_ready", "1 when Redis is reachable", registry=r)

    def job_done(self, outcome: str, duration_s: float | None, gates: dict[str, bool]) -> None:
        self.jobs.labels(outcome).inc()
        if duration_s is not None:
            self.duration.observe(duration_s)
        for gate, passed in gates.items():
            self.gates.labels(gate, "pass" if passed else "fail").inc()


class NotifyMetrics:
    """The notifier's metrics, read from its counters at scrape time (`stats()` -> {outcome: count})."""

    def __init__(self, stats: Callable[[], dict[str, int]], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._stats = stats
        self.registry.register(self)

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily("dlsr_notify_posts", "Webhook posts of alerts, by outcome", labels=["outcome"])
        for outcome, n in self._stats().items():
            fam.add_metric([outcome], n)
        yield fam


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        log.debug("metrics http: " + format, *args)


class MetricsServer:
    """`/metrics`, `/healthz`, `/readyz` on one port, served from a daemon thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):  # noqa: ANN001, ANN202 - the WSGI signature
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                ok, body = health.live() if path == "/healthz" else health.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "application/json")])
                return [json.dumps({"ok": ok, **body}).encode()]
            return metrics_app(environ, start_response)

        self._server: WSGIServer = make_server(host, port, app, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="dlsr-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics and health on port %d (/metrics, /healthz, /readyz)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(settings: MetricsSettings, registry: CollectorRegistry, health: Health) -> MetricsServer | None:
    """Start the endpoints when `settings.port` is set (else None: metrics are off)."""
    if settings.port is None:
        return None
    return MetricsServer(settings.host, settings.port, registry, health).start()
