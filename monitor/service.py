"""The monitor loop: poll -> decode -> preprocess -> score in batches -> Redis effects -> produce -> commit.

The loop talks to a `Source` and a `Sink` (common.streams), so it runs the same on Kafka (common.kafka_io)
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
import hashlib
import inspect
import logging
import math
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from dlsr.calibration import DEFAULT_DELTA, false_alarm_bound, p_values
from dlsr.evidence import shift_of, stage_p_values
from dlsr.images import decoded_bytes
from dlsr_monitor.common.connections import (
    Abandoned,
    OutagePolicy,
    connect_redis,
    install_signal_handlers,
    redis_errors,
    ride_out,
)
from dlsr_monitor.common.connections import kafka_retry as kafka_retry_policy
from dlsr_monitor.common.contract import (
    DEFAULT_SOURCE,
    DriftAlert,
    InputMeta,
    ModelAlert,
    OodAlert,
    ScoreRecord,
    alert_to_json,
    dlq_headers,
    parse_input_meta,
)
from dlsr_monitor.common.hotswap import ModelEvent, ModelHandle, ModelWatcher
from dlsr_monitor.common.kafka_io import KafkaSink, KafkaSource, ensure_topics
from dlsr_monitor.common.keys import Keys
from dlsr_monitor.common.model_checks import load_checked
from dlsr_monitor.common.observability import Health, MonitorMetrics, serve
from dlsr_monitor.common.registry import Registry
from dlsr_monitor.common.streams import Headers, Message, Sink, SinkError, Source
from dlsr_monitor.monitor.batching import collect_batch
from dlsr_monitor.monitor.budget import ByteBudget
from dlsr_monitor.monitor.drift import DriftTest
from dlsr_monitor.monitor.scenes import SceneTracker
from dlsr_monitor.monitor.state import MonitorState, WindowRecord

if TYPE_CHECKING:
    import torch

    from dlsr.encoder import Encoder
    from dlsr_monitor.config.settings import MonitorSettings, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    handle: ModelHandle
    good: list[int] = field(default_factory=list)  # indices into messages, in pixel order
    pixels: torch.Tensor | None = None  # (len(good), 3, H, W)
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
    outages: int = 0  # Redis or broker outages waited out
    score_s: float = 0.0  # time inside detector.score_pixels
    started: float = field(default_factory=time.time)


class _PreprocessError(Exception):
    """An image the decoder accepted but `encoder.preprocess` refused."""


def decoded_budget(monitor: MonitorSettings) -> int:
    """Bytes of decoded pixels allowed in flight: the setting, else (0 = auto) a tenth of physical memory,
    between 256 MiB and 1 GiB."""
    if monitor.max_decoded_bytes:
        return int(monitor.max_decoded_bytes)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return int(min(1 << 30, max(256 << 20, physical // 10)))


@dataclass(frozen=True)
class Scored:
    """The model's verdict on a batch's decodable images (in `_Prepared.good` order)."""

    scores: np.ndarray  # (len(good),) float64
    p_values: np.ndarray  # (len(good),) float64, NaN without calibration scores
    threshold: float
    seconds: float = 0.0  # model time
    # (len(good), S) per-stage p-values against the artifact's stage calibration; None when the model has none
    stage_p_values: np.ndarray | None = None
    # (len(good), D) encoder features of the same pass, when drift evidence is counted per scene; else None
    features: np.ndarray | None = None


@dataclass
class Routed:
    """What one batch turns into: per-partition Redis effects and the records to produce."""

    windows: dict[tuple[str, int], list[WindowRecord]] = field(default_factory=lambda: defaultdict(list))
    window_alerts: dict[tuple[str, int], list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    scores: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, ScoreRecord JSON)
    dead: list[tuple[bytes | None, bytes, Headers]] = field(default_factory=list)  # (key, value, DLQ headers)
    alerts: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, OodAlert JSON)
    sources: set[str] = field(default_factory=set)
    ood: int = 0
    dead_reasons: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)  # Kafka timestamp to score, per scored image


def route(
    prep: _Prepared,
    scored: Scored,
    *,
    instance: str,
    ood_alerts: bool,
    now: float,
    units: np.ndarray | None = None,
) -> Routed:
    """Pure: a scored batch -> score records, OOD alerts, dead letters and window records (no I/O).

    `units`: (len(good),) bool, which scored images open a new drift evidence unit (`monitor.scenes`); None:
    every one does. An image the model scored as non-finite becomes a dead letter (`score_not_finite`), like an undecodable one.
    Last resort: an exception while routing one message dead-letters that message (`internal_error`, with the
    exception class) and the batch goes on.
    """
    out = Routed()
    score_of = dict(zip(prep.good, range(len(prep.good)), strict=True))
    for i, (m, meta) in enumerate(zip(prep.messages, prep.metas, strict=True)):
        tp = (m.topic, m.partition)
        out.sources.add(meta.source)
        try:
            j = score_of.get(i)
            unit = True if units is None or j is None else bool(units[j])
            one = _route_one(m, meta, j, prep.dead.get(i), prep.handle, scored,
                             instance=instance, ood_alerts=ood_alerts, now=now, unit=unit)
        except Exception as exc:  # a bug or an input nobody foresaw: this message only
            log.exception("routing %s:%d:%d failed; dead-lettering it", m.topic, m.partition, m.offset)
            one = _dead_letter(m, meta, "internal_error", f"{type(exc).__name__}: {exc}")
        record, dead, window, alert = one
        out.windows[tp].append(window)
        if record is not None:
            out.scores.append(record)
            if m.timestamp_ms:
                out.latencies_s.append(now - m.timestamp_ms / 1000.0)
        if dead is not None:
            out.dead.append(dead)
            out.dead_reasons.append(next((v.decode("utf-8", "replace") for k, v in dead[2] if k == "error"), "?"))
        if alert is not None:
            out.alerts.append(alert[0])
            out.window_alerts[tp].append(alert[1])
        out.ood += int(window.is_ood)
    return out


_Routed1 = tuple[
    "tuple[bytes, bytes] | None",
    "tuple[bytes | None, bytes, Headers] | None",
    WindowRecord,
    "tuple[tuple[bytes, bytes], tuple[int, str]] | None",
]


def _dead_letter(m: Message, meta: InputMeta, reason: str, detail: str) -> _Routed1:
    origin = f"{m.topic}:{m.partition}:{m.offset}"
    try:
        headers = dlq_headers(m.headers, reason=reason, detail=detail, origin=origin, image_id=meta.image_id)
    except Exception:  # headers nobody can copy: the reason still travels
        headers = [("error", reason.encode()), ("origin", origin.encode())]
    value = m.value if isinstance(m.value, bytes) else b""
    return None, (m.key, value, headers), WindowRecord(m.offset, meta.source, meta.ts, scored=False), None


def _guarantee(handle: ModelHandle) -> dict[str, Any]:
    """The score record's `guarantee` (and `delta` for pac): the live model's calibration method."""
    method = getattr(handle.detector, "calibration_method", None) or "marginal"
    delta = getattr(handle.detector, "delta", None)
    return {"guarantee": method, "delta": float(delta)} if method == "pac" and delta else {"guarantee": method}


def _route_one(
    m: Message,
    meta: InputMeta,
    j: int | None,
    dead: tuple[str, str] | None,
    handle: ModelHandle,
    scored: Scored,
    *,
    instance: str,
    ood_alerts: bool,
    now: float,
    unit: bool = True,
) -> _Routed1:
    """One message -> (score record, dead letter, window record, OOD alert); exactly one of the first two."""
    if j is not None and not math.isfinite(scored.scores[j]):
        dead = ("score_not_finite", f"model {handle.version} scored this image {scored.scores[j]}")
        j = None
    if j is None:
        reason, detail = dead if dead is not None else ("internal_error", "no score and no reason")
        return _dead_letter(m, meta, reason, detail)
    score = float(scored.scores[j])
    is_ood = bool(score > scored.threshold)
    pval = float(scored.p_values[j]) if math.isfinite(scored.p_values[j]) else 1.0
    latency = (now - m.timestamp_ms / 1000.0) * 1000.0 if m.timestamp_ms else 0.0
    evidence: dict[str, Any] = {}  # per-stage p-values and the shift they point to, when the model has them
    if scored.stage_p_values is not None:
        row = scored.stage_p_values[j]
        evidence = {"layers": [float(f"{p:.4g}") for p in row], "shift": shift_of(row, float(handle.alpha))}
    facts = dict(  # what the score record and the OOD alert both say about the image
        image_id=meta.image_id,
        source=meta.source,
        topic=m.topic,
        partition=m.partition,
        offset=m.offset,
        ts=meta.ts,
        score=score,
        threshold=scored.threshold,
        p_value=pval,
        model_version=handle.version,
        **evidence,
    )
    rec = ScoreRecord(
        **facts, is_ood=is_ood, latency_ms=max(0.0, latency), instance=instance,
        sha256=hashlib.sha256(m.value or b"").hexdigest(), input_notes=list(meta.notes) or None,
        **_guarantee(handle),
    )
    key = meta.source.encode()
    window = WindowRecord(m.offset, meta.source, meta.ts, True, is_ood, score, unit)
    alert = None
    if is_ood and ood_alerts:
        ood = OodAlert(alert_id=f"ood:{meta.image_id}", **facts)
        alert = ((key, ood.to_bytes()), (m.offset, alert_to_json(ood)))
    return (key, rec.to_bytes()), None, window, alert


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
        current_model: Callable[[], ModelHandle | None],
        monitor: MonitorSettings,
        topics: OutputTopics,
        group: str,
        decode: Callable[..., Any] | None = None,
        decode_error: type[Exception] | None = None,
        events: queue.Queue | None = None,
        outages: dict[str, OutagePolicy] | None = None,
        metrics: MonitorMetrics | None = None,
        health: Health | None = None,
        check_state: Callable[[], None] | None = None,
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
        self._budget = ByteBudget(decoded_budget(monitor))
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlsr-prepare")
        self._events: queue.Queue = events if events is not None else queue.Queue()
        self._thresholds: dict[str, tuple[float, float, np.ndarray | None]] = {}  # version -> (t, when, cal)
        self._null: tuple[tuple[str, float, int], float | None] | None = None  # (version, t, n) -> drift null
        self.stats = RunStats()
        self._last_beat = 0.0
        self._beat_count = 0
        self._last_version: str | None = None
        self.outages = outages or {}
        self.check_state = check_state  # called with each heartbeat: notices a Redis that lost its state
        self.metrics = metrics or MonitorMetrics()
        self.health = health or Health()
        self.health.set("model", False)
        self.health.set("redis", True)  # the service is built after both answered
        self.health.set("kafka", True)
        self.ready = True  # False while an outage is waited out
        self._stop: threading.Event | None = None
        self._beat_failing = False
        self._broker_ok = True  # the broker answered recently (an empty poll then means idle, not frozen)
        self._no_stage_p: set[str] = set()  # versions whose per-stage p-values failed (logged once each)
        # Drift evidence per scene: each source's previous frame, in this replica (bounded; see monitor.scenes).
        self._scenes = (
            SceneTracker(monitor.drift_scene_distance, monitor.drift_scene_max_s, monitor.drift_scene_sources)
            if monitor.drift_evidence == "scenes"
            else None
        )

    # ---- model events (called from the watcher thread) ---------------------------------------------
    def on_model_event(self, event: ModelEvent) -> None:
        """Queue a ModelWatcher event; the loop turns it into a `model` alert between batches."""
        self._events.put(event)

    # ---- preparing a batch (worker threads) ----------------------------------------------------------
    def _decode_one(self, msg: Message, encoder: Encoder) -> torch.Tensor:
        """Decode, resize and release one image (worker thread): (1, 3, H, W). Its decoded pixels are counted
        against the in-flight budget from before they exist until they are gone."""
        value = msg.value
        if value is None:
            raise self._decode_error("empty", "message has no value (a tombstone)")
        estimate = decoded_bytes(value) if len(value) <= self.cfg.max_image_bytes else 0
        held = self._budget.reserve(estimate)
        try:
            im = self._decode(value, max_bytes=self.cfg.max_image_bytes, max_pixels=self.cfg.max_image_pixels)
            try:
                return encoder.preprocess([im])
            except Exception as exc:  # the decoder accepted it, the preprocessing cannot take it
                raise _PreprocessError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                im.close()
        finally:
            self._budget.release(held)

    def _prepare(self, messages: list[Message], handle: ModelHandle) -> _Prepared:
        metas, broken = [], {}
        for i, m in enumerate(messages):
            try:
                metas.append(
                    parse_input_meta(
                        topic=m.topic,
                        partition=m.partition,
                        offset=m.offset,
                        key=m.key,
                        headers=m.headers,
                        timestamp_ms=m.timestamp_ms,
                    )
                )
            except Exception as exc:  # parse_input_meta never raises by contract; if it does, this message only
                metas.append(InputMeta(f"{m.topic}:{m.partition}:{m.offset}", DEFAULT_SOURCE, time.time()))
                broken[i] = ("internal_error", f"{type(exc).__name__}: {exc}")
        prep = _Prepared(messages, metas, handle)
        encoder = handle.detector.encoder
        futures = {
            i: self._pool.submit(self._decode_one, m, encoder) for i, m in enumerate(messages) if i not in broken
        }
        tensors = []
        for i in range(len(messages)):
            if i in broken:
                prep.dead[i] = broken[i]
                continue
            try:
                tensors.append(futures[i].result())
                prep.good.append(i)
            except self._decode_error as exc:
                prep.dead[i] = (getattr(exc, "reason", "undecodable"), getattr(exc, "detail", "") or str(exc))
            except _PreprocessError as exc:
                prep.dead[i] = ("preprocess_failed", str(exc))
            except Exception as exc:  # a decoder bug must not stop the stream: dead-letter it, say what
                prep.dead[i] = ("decode_failed", f"{type(exc).__name__}: {exc}")
        if tensors:
            import torch

            prep.pixels = torch.cat(tensors)
        return prep

    # ---- thresholds -----------------------------------------------------------------------------------
    def _threshold(self, handle: ModelHandle) -> tuple[float, np.ndarray | None]:
        """Threshold in force for this version: the vetted reservoir's conformal one when it is big enough,
        else the registry's; re-read every `threshold_refresh_s`."""
        now = time.monotonic()
        cached = self._thresholds.get(handle.version)
        if cached is not None and now - cached[1] < self.cfg.threshold_refresh_s:
            return cached[0], cached[2]
        cal = getattr(handle.detector, "calibration_scores", None)
        threshold = float(handle.threshold)
        try:
            value = self.state.baseline.threshold(handle.version, float(handle.alpha))
            if value is not None and math.isfinite(value):
                if value != threshold and self.state.baseline.size(handle.version):
                    cal = self.state.baseline.scores(handle.version)  # p-values against the same reservoir
                threshold = float(value)
        except Exception as exc:  # Redis hiccup: keep the last known threshold
            log.warning("threshold refresh failed (%s); keeping %s", exc, threshold)
            if cached is not None:
                return cached[0], cached[2]
        self._thresholds = {handle.version: (threshold, now, cal)}
        return threshold, cal

    def _null_rate(self, handle: ModelHandle) -> float | None:
        """The drift test's null: the upper 1 - delta bound of the false-alarm rate at the threshold in force.

        The scores that gave the threshold in force are used: the vetted baseline reservoir once it holds
        `baseline_min` scores (the deployment's own stream, and the larger set: a tighter bound), else the
        artifact's calibration scores. With k = #{scores <= threshold} of n this is the Clopper-Pearson upper
        bound for n - k flags in n, which for a threshold that is the k-th order statistic of those same scores
        equals the 1 - delta quantile of the Beta(n - k + 1, k) law of its realised rate. Computed once per
        (version, threshold, n), not per batch. None (DriftTest's default null) when there is nothing to bound.
        """
        if self.cfg.drift_null_factor is not None:
            return None
        threshold, cal = self._threshold(handle)
        n = 0 if cal is None else len(cal)
        key = (handle.version, float(threshold), n)
        if self._null is not None and self._null[0] == key:
            return self._null[1]
        null = None
        if n and math.isfinite(threshold):
            delta = getattr(handle.detector, "delta", None) or DEFAULT_DELTA  # older artifacts: marginal, no delta
            k = int(np.count_nonzero(np.asarray(cal, dtype=np.float64) <= threshold))
            null = false_alarm_bound(n, k, delta)
            null = null if 0.0 < null < 1.0 else None
            log.info("model %s: drift null rate %.4g (false-alarm bound of %d scores at %.6g, delta %g)",
                     handle.version, null or float("nan"), n, threshold, delta)
        self._null = (key, null)
        return null

    # ---- one batch: score -> route -> apply -> emit -> commit --------------------------------------------
    def _process(self, prep: _Prepared) -> None:
        prep = self._owned_only(prep)
        if not prep.messages:
            return
        scored = self._score(prep)
        routed = route(
            prep, scored, instance=self.instance, ood_alerts=self.cfg.ood_alerts, now=time.time(),
            units=self._units(prep, scored),
        )
        # Redis and the broker may go away at any step: each step is idempotent, so it is retried until they
        # are back (the batch is not committed before every step is done).
        drift_alerts = self._ride_out("Redis", lambda: self._apply(routed, prep.handle))
        model_alerts = self._model_alerts()
        self._ride_out("Kafka", lambda: self._emit(routed, [*drift_alerts, *model_alerts]))
        # The one Redis write after `_apply`: a drift transition may be marked emitted only once the broker
        # acknowledged it; until then every replica re-emits it (same alert id), so none is ever lost.
        self._ride_out("Redis", lambda: self.state.mark_drift_emitted(drift_alerts))
        self._commit(prep.messages)
        self._count(prep, routed, scored, drift_alerts)

    def _owned_only(self, prep: _Prepared) -> _Prepared:
        """Drop the messages of partitions a rebalance moved away since they were polled (the new owner
        processes them from the last commit)."""
        owned = self.source.assigned()
        if owned is None:
            return prep
        keep = [i for i, m in enumerate(prep.messages) if (m.topic, m.partition) in owned]
        if len(keep) == len(prep.messages):
            return prep
        log.info("dropping %d polled message(s) of revoked partitions", len(prep.messages) - len(keep))
        new_index = {old: new for new, old in enumerate(keep)}
        rows = [r for r, i in enumerate(prep.good) if i in new_index]
        out = _Prepared([prep.messages[i] for i in keep], [prep.metas[i] for i in keep], prep.handle)
        out.good = [new_index[prep.good[r]] for r in rows]
        out.pixels = prep.pixels[rows] if prep.pixels is not None and rows else None
        out.dead = {new_index[i]: v for i, v in prep.dead.items() if i in new_index}
        return out

    def _ride_out(self, what: str, step: Callable[[], T]) -> T:
        """Run one idempotent step, waiting out an outage of `what` (Redis or Kafka) under its policy."""
        errors = redis_errors() if what == "Redis" else (SinkError,)
        return ride_out(
            what, step, errors=errors, policy=self.outages.get(what, OutagePolicy()), stop=self._stop,
            on_change=functools.partial(self._set_ready, what),
        )

    def _set_ready(self, what: str, up: bool) -> None:
        self.ready = up
        self.health.set(what.lower(), up)
        self.metrics.ready.set(int(up and self.current_model() is not None))
        if not up:
            self.stats.outages += 1
            self.metrics.outages.labels(what).inc()
        self._heartbeat(force=True)  # best effort: the dashboard sees `ready` (when Redis itself is up)

    def _score(self, prep: _Prepared) -> Scored:
        """Scores and p-values of the decodable images, with the threshold in force for this model; per-stage
        p-values too when the model has per-stage calibration (from the same encoder pass)."""
        threshold, cal = self._threshold(prep.handle)
        detector = prep.handle.detector
        stage_cal = getattr(detector, "stage_calibration_scores", None)
        scores, stage_scores, features, seconds = np.empty(0), None, None, 0.0
        if prep.good:
            t0 = time.perf_counter()
            if self._scenes is not None and _returns_features(detector):
                scores, stage_scores, features = detector.score_pixels(
                    prep.pixels, stages=stage_cal is not None, features=True
                )
            elif stage_cal is not None:
                scores, stage_scores = detector.score_pixels(prep.pixels, stages=True)
            else:
                scores = detector.score_pixels(prep.pixels)
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
            seconds = time.perf_counter() - t0
            self.stats.score_s += seconds
        if cal is not None and len(cal) and scores.size:
            pvals = np.asarray(p_values(np.asarray(cal), scores), dtype=np.float64)
        else:
            pvals = np.full(scores.shape, float("nan"))
        return Scored(
            scores, pvals, threshold, seconds, self._stage_p_values(prep, stage_cal, stage_scores), features
        )

    def _units(self, prep: _Prepared, scored: Scored) -> np.ndarray | None:
        """Which scored images open a new drift evidence unit (None: every one, as without de-duplication)."""
        if self._scenes is None or scored.features is None or not prep.good:
            return None
        metas = [prep.metas[i] for i in prep.good]
        return self._scenes.new_units([m.source for m in metas], [m.ts for m in metas], scored.features)

    def _stage_p_values(self, prep: _Prepared, stage_cal: Any, stage_scores: Any) -> np.ndarray | None:
        """(N, S) per-stage p-values, or None: the records then simply carry no `layers` / `shift` (evidence
        that cannot be computed never costs a score)."""
        if stage_cal is None or stage_scores is None:
            return None
        try:
            out = stage_p_values(stage_cal, stage_scores)
            if out.shape[0] != len(prep.good):
                raise ValueError(f"{out.shape[0]} rows of per-stage scores for {len(prep.good)} images")
            return out
        except Exception as exc:  # a broken stage calibration must not stop scoring
            if prep.handle.version not in self._no_stage_p:
                self._no_stage_p.add(prep.handle.version)
                log.warning("model %s: no per-stage p-values (%s); records go without layers/shift",
                            prep.handle.version, exc)
            return None

    def _apply(self, routed: Routed, handle: ModelHandle) -> list[DriftAlert]:
        """The batch's only Redis effects: window counters exactly once per input offset, then drift from the
        shared windows (all replicas see the same counters)."""
        for (topic, partition), records in routed.windows.items():
            res = self.state.apply_batch(
                self.group, topic, partition, records, routed.window_alerts.get((topic, partition), [])
            )
            self.stats.replayed += res.skipped
        test = DriftTest(
            alpha=float(handle.alpha),
            null_factor=self.cfg.drift_null_factor,
            calibration_null=self._null_rate(handle),
            raise_p=self.cfg.drift_raise_p,
            clear_p=self.cfg.drift_clear_p,
            min_images=self.cfg.drift_min_images,
        )
        return self.state.evaluate_drift(
            routed.sources, test, model_version=handle.version, evidence=self.cfg.drift_evidence
        )

    def _emit(self, routed: Routed, alerts: list[DriftAlert | ModelAlert]) -> None:
        """Produce everything, then wait for the acknowledgements (SinkError when the broker refuses; a retry
        sends it all again: same ids)."""
        for key, value in routed.scores:
            self.sink.send(self.topics.scores, key, value)
        for key, value, headers in routed.dead:
            self.sink.send(self.topics.dlq, key, value, headers)
        for key, value in routed.alerts:
            self.sink.send(self.topics.alerts, key, value)
        for a in alerts:
            self.sink.send(self.topics.alerts, a.source.encode(), a.to_bytes())
        self.sink.flush(self.cfg.produce_timeout_s)

    def _commit(self, messages: list[Message]) -> None:
        """Only now is the input done: commit the next offset of every partition in the batch."""
        commit: dict[tuple[str, int], int] = {}
        for m in messages:
            tp = (m.topic, m.partition)
            commit[tp] = max(commit.get(tp, 0), m.offset + 1)
        self.source.commit(commit)

    def _count(self, prep: _Prepared, routed: Routed, scored: Scored, drift_alerts: list[DriftAlert]) -> None:
        self.health.progressed()
        self.metrics.batch_done(
            scored=[(w.source, w.is_ood) for ws in routed.windows.values() for w in ws if w.scored],
            dead_reasons=routed.dead_reasons,
            batch_size=len(prep.messages),
            score_s=scored.seconds,
            latencies_s=routed.latencies_s,
        )
        for a in drift_alerts:
            self.metrics.drift_state(a.source, a.state == "raised")
        self.stats.batches += 1
        self.stats.messages += len(prep.messages)
        self.stats.scored += len(routed.scores)
        self.stats.dead += len(routed.dead)
        self.stats.ood += routed.ood
        self.stats.drift_alerts += len(drift_alerts)
        for a in drift_alerts:
            log.warning("drift %s for source %s: %d/%d OOD in window (p=%.2g)", a.state, a.source,
                        a.window.ood, a.window.images, a.window.p_value, extra={"source": a.source})

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
                self.state.recent_alerts.push(alert_to_json(alert))
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
            if self.check_state is not None:
                self.check_state()
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
                    "ready": int(self.ready and self._broker_ok),
                },
            )
            if self._beat_failing:
                log.info("heartbeats written again")
            self._beat_failing = False
        except Exception as exc:  # liveness is best effort; the stream must go on
            if not self._beat_failing:  # one line per state change, not one per beat
                log.warning("heartbeat failed: %s", exc)
            self._beat_failing = True
        self._last_beat, self._beat_count = now, self.stats.messages
        by_partition = getattr(self.source, "lag_by_partition", None)
        if callable(by_partition):
            self.metrics.partition_lag(by_partition())
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
        self._stop = stop
        pending: Future | None = None
        while True:
            handle = self.current_model()
            if handle is None:
                if stop.is_set():
                    break
                self.health.progressed()
                self._heartbeat()
                stop.wait(0.2)
                continue
            if self._last_version != handle.version:
                log.info("scoring with model %s", handle.version)
                self._last_version = handle.version
                self.metrics.model_live(handle.version, float(handle.alpha))
                self.health.set("model", True)
                self.metrics.ready.set(int(self.ready))
            batch: list[Message] = []
            limit_hit = max_messages is not None and self.stats.messages >= max_messages
            if not stop.is_set() and not limit_hit:
                batch = self._collect()
                if not batch and pending is None and self._broker_answers():
                    self.health.progressed()  # idle: nothing to consume is not a stall
            # Prepare batch k+1 while batch k is scored. On shutdown no new batch is polled, and the one
            # already polled is finished and committed, not dropped. On an error the prepared batch is simply
            # not committed: it is replayed after the restart.
            nxt = self._prep.submit(self._prepare, batch, handle) if batch else None
            cur, pending = pending, nxt
            if cur is not None:
                try:
                    self._process(cur.result())
                except Abandoned as exc:
                    log.warning("%s", exc)
                    if pending is not None:
                        pending.cancel()
                    break
            if pending is None and (stop.is_set() or limit_hit or (until_idle and not batch)):
                break
            self._heartbeat()
        self._heartbeat(force=True)
        return self.stats

    def _broker_answers(self) -> bool:
        """False when the broker has been silent for the stall time: an empty poll then is not 'idle'."""
        seen = getattr(self.source, "broker_seen_s", None)
        age = seen() if callable(seen) else None
        self.health.detail["broker_seen_s"] = None if age is None else round(age, 3)
        answers = age is None or age < self.health.stall_s
        if answers != self._broker_ok:  # a frozen broker: the heartbeat and dlsr_ready say so, once
            log.warning("the broker %s", "answers again" if answers else f"has not answered for {age:.0f} s")
            self._broker_ok = answers
            self.metrics.ready.set(int(answers and self.ready))
            self._heartbeat(force=True)
        return answers

    def close(self) -> None:
        """Release threads and the adapters."""
        self._pool.shutdown(wait=True)
        self._prep.shutdown(wait=True)
        self.source.close()
        self.sink.close()


def _returns_features(detector: Any) -> bool:
    """Whether `detector.score_pixels` can hand back its encoder features (BaseDetector can; a stand-in or an
    older class cannot, and then every image counts as drift evidence)."""
    try:
        return "features" in inspect.signature(detector.score_pixels).parameters
    except (TypeError, ValueError):
        return False


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


def run_monitor(settings: Settings, stop: threading.Event | None = None, *, handle_signals: bool = True) -> RunStats:
    """Wire the service from `config.Settings` and run it until SIGTERM/SIGINT (or `stop`).

    Kafka and Redis outages, at start-up and while running, are waited out for their `outage_budget_s`
    (default forever); StartupError (one line) when a budget is spent.
    """
    stop = stop or threading.Event()
    if handle_signals:
        install_signal_handlers(stop)
        limit_heap_growth()  # only when we own the process
    kafka, mon = settings.kafka, settings.monitor
    try:
        redis_client = connect_redis(settings.redis, wait=True, stop=stop)
    except Abandoned:
        return RunStats()
    keys = Keys.of(settings.redis)
    state = MonitorState.from_settings(redis_client, keys, mon)
    registry = Registry(redis_client, keys, settings.model.artifact_store)

    def check_state() -> None:
        if registry.ensure_epoch():  # no epoch key: a new deployment, or a Redis that lost everything
            version = registry.recover()
            if version is not None:
                log.critical(
                    "Redis held no state for prefix %r (restarted without persistence, or flushed): the registry "
                    "was rebuilt from the artifact store and %s is live again; windows, drift state and baseline "
                    "reservoirs start empty. Run Redis with persistence (appendonly yes).", keys.prefix, version,
                )

    check_state()
    try:  # best effort: readers fall back to their own bucket_s without it
        if (other := state.record_layout(mon.instance_id)) is not None:
            log.warning(
                "another monitor wrote windows under prefix %s with %s; this one uses bucket_s=%d, "
                "window_buckets=%d: give every monitor of a prefix the same window settings",
                settings.redis.prefix, other, mon.bucket_s, mon.window_buckets,
            )
    except Exception as exc:
        log.warning("window layout not recorded in Redis: %s", exc)
    kafka_retry = functools.partial(kafka_retry_policy, kafka, wait=True, stop=stop)
    kafka_retry(
        lambda: ensure_topics(
            kafka,
            [kafka.input_topic, kafka.scores_topic, kafka.alerts_topic, kafka.dlq_topic],
            partitions=kafka.topic_partitions,
        )
    )
    sink = kafka_retry(lambda: KafkaSink(kafka))

    device = settings.model.device
    events: queue.Queue = queue.Queue()
    watcher = ModelWatcher(
        redis_client,
        keys,
        settings.model.artifact_store,
        functools.partial(  # refuses what cannot serve (or was calibrated in another runtime); the old model stays
            load_checked,
            device=device,
            runtime=settings.model.runtime,
            runtime_options={
                "threads": settings.model.runtime_threads,
                "streams": settings.model.runtime_streams,
                "export_dir": settings.model.export_cache,
            },
        ),
        on_event=events.put,
    )
    watcher.start()
    metrics = MonitorMetrics(settings.metrics.max_sources)
    health = Health(settings.metrics.stall_s)
    health.set("model", False)
    server = serve(settings.metrics, metrics.registry, health)
    service: MonitorService | None = None
    try:
        waited = 0.0
        while not watcher.wait_ready(1.0):
            health.progressed()  # waiting for a first model is not a stalled loop (readyz says not ready)
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
            outages={"Redis": OutagePolicy.of(settings.redis), "Kafka": OutagePolicy.of(kafka)},
            metrics=metrics,
            health=health,
            check_state=check_state,
        )
        log.info("monitor %s consuming %s as group %s", mon.instance_id, kafka.input_topic, kafka.group_id)
        stats = service.run(stop)
        log.info(
            "monitor %s stopped: %d messages, %d scored, %d dead letters",
            mon.instance_id, stats.messages, stats.scored, stats.dead,
        )
        return stats
    finally:
        if server is not None:
            server.stop()
        watcher.stop()
        if service is not None:
            service.close()
        else:
            sink.close()
        with contextlib.suppress(Exception):
            state.remove_heartbeat(mon.instance_id)
        redis_client.close()
