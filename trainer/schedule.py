"""The trainer service (`dlsr trainer run`): vetted intake, baseline feeding, and jobs on a schedule or trigger.

A job runs when any of these holds, checked every `poll_s`:
- manual: `dlsr trainer trigger` left a request in Redis;
- new_vetted: at least `min_new_vetted` vetted images arrived since the last job;
- schedule: `interval_s` passed since the last job started (and there is vetted data).
Only the trainer holding the Redis lock runs it; the others keep taking in vetted data. Between jobs, newly vetted
images are scored by the live model and fed to its baseline reservoir, so thresholds follow vetted data only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.common.connections import Abandoned, OutagePolicy, redis_errors, ride_out
from dlsr_monitor.common.hotswap import ModelWatcher
from dlsr_monitor.common.keys import Keys
from dlsr_monitor.common.observability import Health, TrainerMetrics
from dlsr_monitor.common.registry import Registry
from dlsr_monitor.trainer.history import JobHistory, JobRecord
from dlsr_monitor.trainer.intake import VettedIntake, VettedStore
from dlsr_monitor.trainer.job import JobConfig, JobContext, run_job
from dlsr_monitor.trainer.lock import JobLock

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.config.settings import ModelSettings, Settings, TrainerSettings

log = logging.getLogger(__name__)

MANUAL = "manual"
NEW_VETTED = "new_vetted"
SCHEDULE = "schedule"

#: Seconds between a running trainer service's heartbeats, and how long one stays valid (`dlsr trainer trigger`
#: says "no trainer is alive" when none was written in the last HEARTBEAT_TTL_S seconds).
HEARTBEAT_S = 5.0
HEARTBEAT_TTL_S = 30


def request_run(redis: redis.Redis, keys: Keys, by: str = "cli") -> None:
    """Ask the trainer service for a job now (what `dlsr trainer trigger` does)."""
    redis.set(keys.trainer_trigger(), json.dumps({"by": by, "at": time.time()}))


def job_config(trainer: TrainerSettings, model: ModelSettings) -> JobConfig:
    """JobConfig from `config.TrainerSettings` (every field the two share) and the model's alpha, calibration
    method and delta."""
    shared = {f.name for f in dataclasses.fields(JobConfig)} & set(type(trainer).model_fields)
    return JobConfig(
        alpha=model.alpha, calibration=model.calibration, delta=model.delta,
        **{name: getattr(trainer, name) for name in shared},
    )


@dataclass
class TrainerService:
    """One trainer process. Every collaborator is passed in; `build_service` wires them from settings."""

    ctx: JobContext
    interval_s: float
    min_new_vetted: int
    lock_ttl_s: float = 120.0
    intake: VettedIntake | None = None
    baseline: Callable[[str, np.ndarray], Any] | None = None  # (version, scores): live-model reservoir
    progress: bool = True
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    watcher: ModelWatcher | None = None
    outage: OutagePolicy = field(default_factory=OutagePolicy)
    metrics: TrainerMetrics = field(default_factory=TrainerMetrics)
    health: Health = field(default_factory=Health)
    heartbeat_s: float = HEARTBEAT_S
    heartbeat_ttl_s: int = HEARTBEAT_TTL_S

    @property
    def keys(self) -> Keys:
        return self.ctx.keys

    @property
    def redis(self) -> Any:
        return self.ctx.redis

    # ---- decisions --------------------------------------------------------------------------------
    def new_vetted(self) -> int:
        return int(self.redis.get(self.keys.vetted_new()) or 0)

    def due(self, now: float | None = None) -> str | None:
        """Why a job should run now (MANUAL, NEW_VETTED, SCHEDULE), or None."""
        if self.redis.exists(self.keys.trainer_trigger()):
            return MANUAL
        if self.new_vetted() >= self.min_new_vetted:
            return NEW_VETTED
        assert self.ctx.history is not None
        last = self.ctx.history.last_start()
        now = time.time() if now is None else now
        if (last is None or now - last >= self.interval_s) and len(self.ctx.store) > 0:
            return SCHEDULE
        return None

    # ---- one job under the lock -------------------------------------------------------------------
    def run_once(self, trigger: str) -> JobRecord | None:
        """Run one job if no other trainer is running one; None when the lock is held elsewhere."""
        lock = JobLock(self.redis, self.keys.trainer_lock(), ttl_s=self.lock_ttl_s, owner=self.owner)
        if not lock.acquire():
            log.info("a job is already running (%s); not starting another", lock.holder())
            return None
        try:
            # Consume the requests this job answers, under the lock, so a second trainer cannot answer them too.
            self.redis.delete(self.keys.trainer_trigger())
            assert self.ctx.history is not None
            for job_id in self.ctx.history.close_abandoned(self.owner):
                log.warning("job %s was abandoned by a trainer that died mid-job", job_id)
            taken = self.new_vetted()
            self.health.busy(True)
            try:
                rec = run_job(self.ctx, trigger, lock=lock, progress=self.progress)
            finally:
                self.health.busy(False)
            self.metrics.job_done(
                rec.outcome, rec.duration_s,
                {name: bool(g.get("passed", True)) for name, g in rec.gates.items() if isinstance(g, dict)},
            )
            if taken:
                self.redis.decrby(self.keys.vetted_new(), taken)  # arrivals during the job count for the next
            return rec
        finally:
            lock.release()

    def _set_ready(self, up: bool) -> None:
        self.health.set("redis", up)
        self.metrics.ready.set(int(up))

    # ---- the service loop -------------------------------------------------------------------------
    def take_in(self, timeout_s: float) -> int:
        """Read vetted messages; count them; score the new ones with the live model for its reservoir."""
        if self.intake is None:
            time.sleep(timeout_s)
            return 0
        fresh = self.intake.poll(timeout_s)
        if not fresh:
            return 0
        self.redis.incrby(self.keys.vetted_new(), len(fresh))
        self._feed_baseline(fresh)
        return len(fresh)

    def _feed_baseline(self, images: list[bytes]) -> None:
        if self.baseline is None or self.watcher is None:
            return
        try:
            self.watcher.poll_once()
            handle = self.watcher.current()
            if handle is None:
                return
            from dlsr.readers import ImageItem

            feats = self.ctx.ops.features(
                [ImageItem(name=str(i), data=d) for i, d in enumerate(images)], progress=False
            )
            scores = np.asarray(handle.detector.score(feats), dtype=np.float64)
            self.baseline(handle.version, scores)
        except (
            Exception
        ) as exc:  # the reservoir is an optimisation of thresholds, never a reason to stop intake
            log.warning("baseline update skipped: %s", exc)

    def step(self, timeout_s: float = 1.0) -> JobRecord | None:
        """One loop iteration: intake, then a job if one is due."""
        self.take_in(timeout_s)
        reason = self.due()
        return self.run_once(reason) if reason else None

    # ---- liveness for `dlsr trainer trigger` --------------------------------------------------------
    def beat(self, poll_s: float) -> None:
        """Write this trainer's heartbeat (expires after `heartbeat_ttl_s`): `dlsr trainer trigger` reads it."""
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.set(
            self.keys.trainer_heartbeat(self.owner),
            json.dumps({"owner": self.owner, "ts": now, "poll_s": poll_s}),
            ex=max(1, int(self.heartbeat_ttl_s)),
        )
        pipe.zadd(self.keys.trainer_heartbeats(), {self.owner: now})
        pipe.execute()

    def _beat_until(self, done: threading.Event, poll_s: float) -> None:
        # A thread, not a loop step: a job blocks the loop for minutes, and the trainer is alive meanwhile.
        failing = False
        while True:
            try:
                self.beat(poll_s)
                failing = False
            except Exception as exc:  # best effort: Redis outages are the loop's to report
                if not failing:
                    log.debug("trainer heartbeat not written: %s", exc)
                failing = True
            if done.wait(self.heartbeat_s):
                return

    def _forget_heartbeat(self) -> None:
        try:
            self.redis.delete(self.keys.trainer_heartbeat(self.owner))
            self.redis.zrem(self.keys.trainer_heartbeats(), self.owner)
        except Exception as exc:  # it expires by itself
            log.debug("trainer heartbeat not removed: %s", exc)

    def serve(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Run until `stop` is set (SIGTERM/SIGINT in the CLI); a heartbeat says it is alive meanwhile."""
        done = threading.Event()
        beats = threading.Thread(
            target=self._beat_until, args=(done, poll_s), name="dlsr-trainer-heartbeat", daemon=True
        )
        beats.start()
        try:
            self._serve(stop, poll_s)
        finally:
            done.set()
            beats.join(timeout=5)
            self._forget_heartbeat()

    def _serve(self, stop: threading.Event, poll_s: float) -> None:
        log.info(
            "trainer %s: refit every %.0f s or after %d new vetted images; store %s",
            self.owner,
            self.interval_s,
            self.min_new_vetted,
            self.ctx.store.root,
        )
        last_error = None
        while not stop.is_set():
            try:
                # A Redis outage is waited out with capped backoff (one line when it goes, one when it is back).
                rec = ride_out(
                    "Redis", lambda: self.step(poll_s), errors=redis_errors(), policy=self.outage, stop=stop,
                    on_change=self._set_ready,
                )
                self.health.progressed()
                if rec is not None:
                    log.info("job %s %s: %s", rec.job_id, rec.outcome, rec.message)
                last_error = None
            except Abandoned:
                break
            except Exception as exc:  # a Kafka hiccup or a bug in one step: log once per distinct error, go on
                msg = f"{type(exc).__name__}: {exc}"
                if msg != last_error:
                    log.error("trainer loop error (%s); retrying every %.0f s", msg, poll_s)
                last_error = msg
                stop.wait(poll_s)


def build_service(
    settings: Settings,
    *,
    intake: bool = True,
    alerts: bool | None = None,
    progress: bool = True,
    ops: Any | None = None,
    wait: bool = False,
    announce: Callable[[str], None] | None = None,
) -> TrainerService:
    """Wire a TrainerService from `config.Settings` (Redis, registry, store, dlsr ops, Kafka intake and alerts).

    `intake`: consume the vetted topic (the service; `dlsr trainer fit` must not join the service's group).
    `alerts`: send `model` alerts to Kafka (default: same as `intake`).
    `wait`: wait out Redis / Kafka at start-up for their outage budget (the service), instead of bounded retries.
    `announce`: receives the one-line fit-time estimate before each fit (`dlsr trainer fit` prints it).

    Raises StartupError when Redis or Kafka is unreachable after the configured retries.
    """
    from dlsr_monitor.common.baseline import BaselineReservoir
    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.recent_alerts import RecentAlerts
    from dlsr_monitor.trainer.ops import DlsrOps

    tr, model = settings.trainer, settings.model
    redis = connect_redis(settings.redis, wait=wait)
    keys = Keys.of(settings.redis)
    registry = Registry(redis, keys, model.artifact_store)
    if registry.ensure_epoch() and (version := registry.recover()) is not None:
        log.critical("Redis held no state for prefix %r: registry rebuilt from the artifact store, %s live",
                     keys.prefix, version)
    store = VettedStore(tr.workdir)
    ops = ops or DlsrOps(model, tr.detector, tr.refit_epochs, announce=announce)
    reservoir = BaselineReservoir(redis, keys, max_size=tr.baseline_max)
    recent = RecentAlerts(redis, keys)
    alpha = model.alpha
    on_alert = None
    source = None
    alerts = intake if alerts is None else alerts
    if intake or alerts:
        import functools

        from dlsr_monitor.common.connections import kafka_retry
        from dlsr_monitor.common.kafka_io import KafkaSink, KafkaSource, ensure_topics

        kafka = settings.kafka
        retry = functools.partial(kafka_retry, kafka, wait=wait)
        retry(
            lambda: ensure_topics(
                kafka, [kafka.vetted_topic, kafka.alerts_topic], partitions=kafka.topic_partitions
            )
        )
        if intake:
            source = retry(lambda: KafkaSource(kafka, kafka.vetted_topic, tr.group_id))
        if alerts:
            sink = retry(lambda: KafkaSink(kafka))

            def on_alert(alert: Any) -> None:
                from dlsr_monitor.common.contract import alert_to_json

                sink.send(kafka.alerts_topic, alert.source.encode(), alert.to_bytes())
                sink.flush(30.0)
                recent.push(alert_to_json(alert))

    ctx = JobContext(
        redis=redis,
        keys=keys,
        registry=registry,
        store=store,
        ops=ops,
        config=job_config(tr, model),
        history=JobHistory(redis, keys, keep=tr.keep_jobs),
        on_alert=on_alert,
        add_baseline=lambda v, s: reservoir.add(v, s, alpha),
    )
    watcher = ModelWatcher(redis, keys, model.artifact_store, ops.load, poll_s=tr.poll_s)
    return TrainerService(
        ctx=ctx,
        interval_s=tr.interval_s,
        min_new_vetted=tr.min_new_vetted,
        lock_ttl_s=tr.lock_ttl_s,
        intake=VettedIntake(source, store) if source is not None else None,
        baseline=lambda v, s: reservoir.add(v, s, alpha),
        progress=progress,
        watcher=watcher,
        outage=OutagePolicy.of(settings.redis),
        health=Health(settings.metrics.stall_s),
    )
