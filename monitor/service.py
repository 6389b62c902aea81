"""The monitor loop: poll -> decode -> preprocess -> score in batches -> Redis effects -> produce -> commit.

The loop talks to a `Source` and a `Sink` (monitor.batching), so it runs the same on Kafka (monitor.kafka_io)
and on in-memory lists (unit tests). Decoding and preprocessing of batch k+1 run on a thread pool while batch
k is scored, so the scorer never waits on image decoding. At most two batches are in flight: memory is bounded
whatever the input rate.

Delivery: a batch's offsets are committed only after its Redis effects are applied (exactly once, by the
per-partition watermark in `MonitorState.apply_batch`) and every record it produced was acknowledged. A crash
anywhere replays the uncommitted batches: outputs at least once with deterministic ids (`image_id`,
`ood:<image_id>`, `drift:<source>:<seq>`), Redis effects exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.batching import Message, Sink, Source, collect_batch
from monitor.contract import (
    InputMeta,
    ModelAlert,
    OodAlert,
    ScoreRecord,
    alert_to_json,
    dlq_headers,
    parse_input_meta,
)
from monitor.drift import DriftTest
from monitor.state import MonitorState, WindowRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputTopics:
    scores: str
    alerts: str
    dlq: str


@dataclass
class _Prepared:
    """A decoded, preprocessed batch, tied to the model handle it was prepared for."""

    messages: list[Message]
    metas: list[InputMeta]
    handle: Any
    good: list[int] = field(default_factory=list)  # indices into messages, in pixel order
    pixels: Any = None  # torch.Tensor (len(good), 3, H, W)
    dead: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (reason, detail)


@dataclass
class RunStats:
    """Counters of one run (also used by tests and the benchmark)."""

    batches: int = 0
    messages: int = 0
    scored: int = 0
    dead: int = 0
    ood: int = 0
    drift_alerts: int = 0
    model_alerts: int = 0
    replayed: int = 0  # records whose Redis effects were already applied (a replay)
    score_s: float = 0.0  # time inside detector.score_pixels
    started: float = field(default_factory=time.time)


class MonitorService:
    """One monitor instance.

    Args:
        source, sink: the stream adapters.
        state: Redis state (windows, drift, heartbeats, thresholds).
        current_model: returns the `ModelHandle` to use (ModelWatcher.current), called once per batch.
        monitor: `MonitorSettings` (batching, limits, drift, heartbeat).
        topics: output topic names.
        group: consumer group id (names the watermark keys).
        decode: `decode(bytes, max_bytes=, max_pixels=) -> PIL.Image` (dlsr.images.decode_image).
        decode_error: the exception type `decode` raises for bad input (dlsr.images.ImageDecodeError).
        events: queue of ModelWatcher events (see `on_model_event`); one is made when omitted.
    """

    def __init__(
        self,
        *,
        source: Source,
        sink: Sink,
        state: MonitorState,
        current_model: Callable[[], Any],
        monitor: Any,
        topics: OutputTopics,
        group: str,
        decode: Callable[..., Any] | None = None,
        decode_error: type[Exception] | None = None,
        events: queue.Queue | None = None,
    ) -> None:
        if decode is None or decode_error is None:
            from dlsr.images import ImageDecodeError, decode_image

            decode, decode_error = decode_image, ImageDecodeError
        self.source, self.sink, self.state = source, sink, state
        self.current_model = current_model
        self.cfg = monitor
        self.topics = topics
        self.group = group
        self.instance = monitor.instance_id
        self._decode, self._decode_error = decode, decode_error
        self._pool = ThreadPoolExecutor(max_workers=monitor.decode_threads, thread_name_prefix="dlsr-decode")
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlsr-prepare")
        self._events: queue.Queue = events if events is not None else queue.Queue()
        self._thresholds: dict[str, tuple[float, float, np.ndarray | None]] = {}  # version -> (t, when, cal)
        self.stats = RunStats()
        self._last_beat = 0.0
        self._beat_count = 0
        self._last_version: str | None = None

    # ---- model events (called from the watcher thread) ---------------------------------------------
    def on_model_event(self, event: Any) -> None:
        """Queue a ModelWatcher event; the loop turns it into a `model` alert between batches."""
        self._events.put(event)

    # ---- preparing a batch (worker threads) ----------------------------------------------------------
    def _decode_one(self, msg: Message) -> Any:
        if msg.value is None:
            raise self._decode_error("empty", "message has no value (a tombstone)")
        return self._decode(msg.value, max_bytes=self.cfg.max_image_bytes, max_pixels=self.cfg.max_image_pixels)

    def _prepare(self, messages: list[Message], handle: Any) -> _Prepared:
        metas = [
            parse_input_meta(
                topic=m.topic,
                partition=m.partition,
                offset=m.offset,
                key=m.key,
                headers=m.headers,
                timestamp_ms=m.timestamp_ms,
            )
            for m in messages
        ]
        prep = _Prepared(messages, metas, handle)
        futures = [self._pool.submit(self._decode_one, m) for m in messages]
        images = []
        for i, fut in enumerate(futures):
            try:
                images.append(fut.result())
                prep.good.append(i)
            except self._decode_error as exc:
                prep.dead[i] = (getattr(exc, "reason", "undecodable"), getattr(exc, "detail", "") or str(exc))
            except Exception as exc:  # a decoder bug must not stop the stream: dead-letter it, say what
                prep.dead[i] = ("decode_failed", f"{type(exc).__name__}: {exc}")
        if images:
            import torch

            encoder = handle.detector.encoder
            # Preprocess in chunks on the decode threads (encoder.preprocess is thread-safe).
            n = max(1, math.ceil(len(images) / self.cfg.decode_threads))
            chunks = [images[i : i + n] for i in range(0, len(images), n)]
            try:
                prep.pixels = torch.cat(list(self._pool.map(encoder.preprocess, chunks)))
            except Exception:
                # One image the decoder accepted but the preprocessing cannot take: find it, dead-letter it,
                # keep the rest of the batch.
                tensors, good = [], []
                for i, im in zip(prep.good, images, strict=True):
                    try:
                        tensors.append(encoder.preprocess([im]))
                        good.append(i)
                    except Exception as exc:
                        prep.dead[i] = ("preprocess_failed", f"{type(exc).__name__}: {exc}")
                prep.good = good
                prep.pixels = torch.cat(tensors) if tensors else None
        return prep

    # ---- thresholds -----------------------------------------------------------------------------------
    def _threshold(self, handle: Any) -> tuple[float, np.ndarray | None]:
        """Threshold in force for this version: the vetted reservoir's conformal one when it is big enough,
        else the registry's; re-read every `threshold_refresh_s`."""
        now = time.monotonic()
        cached = self._thresholds.get(handle.version)
        if cached is not None and now - cached[1] < self.cfg.threshold_refresh_s:
            return cached[0], cached[2]
        cal = getattr(handle.detector, "calibration_scores", None)
        threshold = float(handle.threshold)
        try:
            value = self.state.baseline_threshold(handle.version, float(handle.alpha))
            if value is not None and math.isfinite(value):
                if value != threshold and self.state.redis.llen(self.state.keys.baseline(handle.version)):
                    cal = self.state.baseline_scores(handle.version)  # p-values against the same reservoir
                threshold = float(value)
        except Exception as exc:  # Redis hiccup: keep the last known threshold
            log.warning("threshold refresh failed (%s); keeping %s", exc, threshold)
            if cached is not None:
                return cached[0], cached[2]
        self._thresholds = {handle.version: (threshold, now, cal)}
        return threshold, cal

    # ---- one batch ----------------------------------------------------------------------------------
    def _process(self, prep: _Prepared) -> None:
        handle = prep.handle
        msgs, metas = prep.messages, prep.metas
        threshold, cal = self._threshold(handle)
        scores = np.empty(0)
        if prep.good:
            t0 = time.perf_counter()
            scores = np.asarray(handle.detector.score_pixels(prep.pixels), dtype=np.float64).reshape(-1)
            self.stats.score_s += time.perf_counter() - t0
        if cal is not None and len(cal) and scores.size:
            from dlsr.calibration import p_values

            pvals = np.asarray(p_values(np.asarray(cal), scores), dtype=np.float64)
        else:
            pvals = np.full(scores.shape, float("nan"))
        now = time.time()
        score_of = dict(zip(prep.good, range(len(prep.good)), strict=True))

        by_part: dict[tuple[str, int], list[WindowRecord]] = defaultdict(list)
        alerts_by_part: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        out_scores: list[tuple[bytes, bytes]] = []
        out_dead: list[tuple[bytes | None, bytes, list]] = []
        out_alerts: list[tuple[bytes, bytes]] = []
        sources: set[str] = set()
        for i, (m, meta) in enumerate(zip(msgs, metas, strict=True)):
            tp = (m.topic, m.partition)
            sources.add(meta.source)
            j = score_of.get(i)
            if j is not None and not math.isfinite(scores[j]):
                prep.dead[i] = ("score_not_finite", f"model {handle.version} scored this image {scores[j]}")
                j = None
            if j is None:
                reason, detail = prep.dead[i]
                origin = f"{m.topic}:{m.partition}:{m.offset}"
                headers = dlq_headers(m.headers, reason=reason, detail=detail, origin=origin, image_id=meta.image_id)
                out_dead.append((m.key, m.value or b"", headers))
                by_part[tp].append(WindowRecord(m.offset, meta.source, meta.ts, scored=False))
                continue
            score = float(scores[j])
            is_ood = bool(score > threshold)
            pval = float(pvals[j]) if math.isfinite(pvals[j]) else 1.0
            latency = (now - m.timestamp_ms / 1000.0) * 1000.0 if m.timestamp_ms else 0.0
            rec = ScoreRecord(
                image_id=meta.image_id,
                source=meta.source,
                topic=m.topic,
                partition=m.partition,
                offset=m.offset,
                ts=meta.ts,
                score=score,
                threshold=threshold,
                p_value=pval,
                is_ood=is_ood,
                model_version=handle.version,
                latency_ms=max(0.0, latency),
                instance=self.instance,
            )
            out_scores.append((meta.source.encode(), rec.to_bytes()))
            by_part[tp].append(WindowRecord(m.offset, meta.source, meta.ts, True, is_ood, score))
            if is_ood:
                self.stats.ood += 1
                if self.cfg.ood_alerts:
                    alert = OodAlert(
                        alert_id=f"ood:{meta.image_id}",
                        source=meta.source,
                        image_id=meta.image_id,
                        topic=m.topic,
                        partition=m.partition,
                        offset=m.offset,
                        ts=meta.ts,
                        score=score,
                        threshold=threshold,
                        p_value=pval,
                        model_version=handle.version,
                    )
                    out_alerts.append((meta.source.encode(), alert.to_bytes()))
                    alerts_by_part[tp].append((m.offset, alert_to_json(alert)))

        # 1. Redis effects, exactly once per input offset.
        for (topic, partition), records in by_part.items():
            res = self.state.apply_batch(
                self.group, topic, partition, records, alerts_by_part.get((topic, partition), [])
            )
            self.stats.replayed += res.skipped
        # 2. Drift from the shared windows (all replicas see the same counters).
        test = DriftTest(
            alpha=float(handle.alpha),
            null_factor=self.cfg.drift_null_factor,
            raise_p=self.cfg.drift_raise_p,
            clear_p=self.cfg.drift_clear_p,
            min_images=self.cfg.drift_min_images,
        )
        drift_alerts = self.state.evaluate_drift(sources, test, model_version=handle.version)
        # 3. Produce everything, then wait for the acknowledgements.
        for key, value in out_scores:
            self.sink.send(self.topics.scores, key, value)
        for key, value, headers in out_dead:
            self.sink.send(self.topics.dlq, key, value, headers)
        for key, value in out_alerts:
            self.sink.send(self.topics.alerts, key, value)
        for a in drift_alerts:
            self.sink.send(self.topics.alerts, a.source.encode(), a.to_bytes())
        model_alerts = self._model_alerts()
        for a in model_alerts:
            self.sink.send(self.topics.alerts, a.source.encode(), a.to_bytes())
        self.sink.flush(self.cfg.produce_timeout_s)
        self.state.mark_drift_emitted(drift_alerts)
        # 4. Only now is the input done.
        commit: dict[tuple[str, int], int] = {}
        for m in msgs:
            tp = (m.topic, m.partition)
            commit[tp] = max(commit.get(tp, 0), m.offset + 1)
        self.source.commit(commit)

        self.stats.batches += 1
        self.stats.messages += len(msgs)
        self.stats.scored += len(out_scores)
        self.stats.dead += len(out_dead)
        self.stats.drift_alerts += len(drift_alerts)
        for a in drift_alerts:
            log.warning("drift %s for source %s: %d/%d OOD in window (p=%.2g)", a.state, a.source,
                        a.window.ood, a.window.images, a.window.p_value)

    def _model_alerts(self) -> list[ModelAlert]:
        out = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            live = ev.kind == "loaded"
            alert = ModelAlert(
                alert_id=f"model:{'live' if live else 'load_failed'}:{ev.version}:{self.instance}",
                event="live" if live else "load_failed",
                version=ev.version,
                previous_version=None if live else ev.active_version,
                reason=None if live else ev.message,
                ts=float(getattr(ev, "at", time.time())),
                instance=self.instance,
            )
            try:
                self.state.push_alert(alert_to_json(alert))
            except Exception as exc:
                log.warning("cannot record model alert in Redis: %s", exc)
            out.append(alert)
            self.stats.model_alerts += 1
        return out

    # ---- heartbeat ----------------------------------------------------------------------------------
    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.cfg.heartbeat_s:
            return
        dt = now - self._last_beat if self._last_beat else max(1e-9, time.time() - self.stats.started)
        rate = (self.stats.messages - self._beat_count) / dt if dt > 0 else 0.0
        handle = self.current_model()
        try:
            self.state.heartbeat(
                self.instance,
                model_version=handle.version if handle else None,
                rate=rate,
                lag=self.source.lag(),
                extra={
                    "scored": self.stats.scored,
                    "dead": self.stats.dead,
                    "messages": self.stats.messages,
                    "batches": self.stats.batches,
                    "score_s": round(self.stats.score_s, 3),
                    "group": self.group,
                },
            )
        except Exception as exc:  # liveness is best effort; the stream must go on
            log.warning("heartbeat failed: %s", exc)
        self._last_beat, self._beat_count = now, self.stats.messages
        _trim_heap()

    # ---- the loop -------------------------------------------------------------------------------------
    def _collect(self) -> list[Message]:
        return collect_batch(
            self.source.poll,
            batch_max=self.cfg.batch_max,
            wait_s=self.cfg.batch_wait_ms / 1000.0,
            idle_s=0.2,
        )

    def run(self, stop: threading.Event, *, until_idle: bool = False, max_messages: int | None = None) -> RunStats:
        """Process batches until `stop` is set (then finish the batches in flight, commit, return).

        `until_idle`: also return once the source has nothing more (tests). `max_messages`: stop after that many
        (tests that simulate a crash).
        """
        pending: Future | None = None
        while True:
            handle = self.current_model()
            if handle is None:
                if stop.is_set():
                    break
                self._heartbeat()
                stop.wait(0.2)
                continue
            if self._last_version != handle.version:
                log.info("scoring with model %s", handle.version)
                self._last_version = handle.version
            batch: list[Message] = []
            limit_hit = max_messages is not None and self.stats.messages >= max_messages
            if not stop.is_set() and not limit_hit:
                batch = self._collect()
            # Prepare batch k+1 while batch k is scored. On shutdown no new batch is polled, and the one
            # already polled is finished and committed, not dropped. On an error the prepared batch is simply
            # not committed: it is replayed after the restart.
            nxt = self._prep.submit(self._prepare, batch, handle) if batch else None
            cur, pending = pending, nxt
            if cur is not None:
                self._process(cur.result())
            self._heartbeat()
            if pending is None and (stop.is_set() or limit_hit or (until_idle and not batch)):
                break
        self._heartbeat(force=True)
        return self.stats

    def close(self) -> None:
        """Release threads and the adapters."""
        self._pool.shutdown(wait=True)
        self._prep.shutdown(wait=True)
        self.source.close()
        self.sink.close()


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def limit_heap_growth() -> None:
    """Linux/glibc: at most 2 malloc arenas. Batches are built on worker threads and freed on the scoring
    thread; with one arena per thread the freed space is scattered and RSS creeps up over hours."""
    try:
        libc = _glibc()
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-8, 2)  # M_ARENA_MAX
    except Exception:  # not glibc: nothing to tune
        pass


def _trim_heap() -> None:
    # Hand freed heap pages back to the OS (glibc keeps them otherwise): keeps RSS flat at a steady rate.
    try:
        libc = _glibc()
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except Exception:
        pass


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM / SIGINT set `stop`: the loop finishes the batch in flight, commits and returns."""

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: finishing the batch in flight, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def connect_redis(redis_settings: Any) -> Any:
    """A pinged `redis.Redis` client, with bounded retries (StartupError when unreachable)."""
    import redis

    from monitor.kafka_io import with_retries

    def connect() -> Any:
        client = redis.Redis.from_url(redis_settings.url, socket_connect_timeout=5, **redis_settings.client_kwargs())
        client.ping()
        return client

    return with_retries(
        connect,
        what="Redis",
        where=redis_settings.url,
        retries=redis_settings.connect_retries,
        backoff_s=redis_settings.retry_backoff_s,
        fix="start Redis or set DLSR_REDIS__URL",
    )


def run_monitor(settings: Any, stop: threading.Event | None = None, *, handle_signals: bool = True) -> RunStats:
    """Wire the service from `config.Settings` and run it until SIGTERM/SIGINT (or `stop`).

    Raises StartupError (one line) when Kafka or Redis is unreachable after the configured retries.
    """
    from monitor.hotswap import ModelWatcher
    from monitor.kafka_io import KafkaSink, KafkaSource, ensure_topics
    from monitor.kafka_io import kafka_retry as kafka_retry_policy
    from monitor.keys import Keys

    stop = stop or threading.Event()
    if handle_signals:
        install_signal_handlers(stop)
        limit_heap_growth()  # only when we own the process
    kafka, mon = settings.kafka, settings.monitor
    redis_client = connect_redis(settings.redis)
    keys = Keys(settings.redis.prefix)
    state = MonitorState.from_settings(redis_client, keys, mon)
    kafka_retry = functools.partial(kafka_retry_policy, kafka)
    kafka_retry(
        lambda: ensure_topics(
            kafka,
            [kafka.input_topic, kafka.scores_topic, kafka.alerts_topic, kafka.dlq_topic],
            partitions=kafka.topic_partitions,
        )
    )
    sink = kafka_retry(lambda: KafkaSink(kafka))

    from dlsr.artifacts import load_detector

    device = settings.model.device
    events: queue.Queue = queue.Queue()
    watcher = ModelWatcher(
        redis_client,
        keys,
        settings.model.artifact_store,
        functools.partial(load_detector, device=device),
        on_event=events.put,
    )
    watcher.start()
    service: MonitorService | None = None
    try:
        waited = 0.0
        while not watcher.wait_ready(1.0):
            if stop.is_set():
                return RunStats()
            waited += 1.0
            if waited % 15 == 1:
                log.warning("waiting for a model: %s", watcher.last_error or "loading")
        source = kafka_retry(
            lambda: KafkaSource(kafka, kafka.input_topic, kafka.group_id, max_poll_records=mon.max_poll_records)
        )
        service = MonitorService(
            source=source,
            sink=sink,
            state=state,
            current_model=watcher.current,
            monitor=mon,
            topics=OutputTopics(kafka.scores_topic, kafka.alerts_topic, kafka.dlq_topic),
            group=kafka.group_id,
            events=events,
        )
        log.info("monitor %s consuming %s as group %s", mon.instance_id, kafka.input_topic, kafka.group_id)
        stats = service.run(stop)
        log.info(
            "monitor %s stopped: %d messages, %d scored, %d dead letters",
            mon.instance_id, stats.messages, stats.scored, stats.dead,
        )
        return stats
    finally:
        watcher.stop()
        if service is not None:
            service.close()
        else:
            sink.close()
        with contextlib.suppress(Exception):
            state.remove_heartbeat(mon.instance_id)
        redis_client.close()
