"""One trainer job: vetted data -> features (cached) -> fit (warm start) -> calibrate -> gates -> publish or keep.

The job talks to the method through `ModelOps` (features, fit, load), so unit tests run it on synthetic features
in milliseconds and production runs it on `DlsrOps` (dlsr Encoder + FeatureCache + DLSRDetector).
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dlsr.calibration import min_calibration_size
from dlsr_monitor.common.keys import Keys
from dlsr_monitor.common.registry import PointerConflictError, Registry
from dlsr_monitor.trainer import gates as G
from dlsr_monitor.trainer.history import CONFLICT, FAILED, PROMOTED, REJECTED, JobHistory, JobRecord
from dlsr_monitor.trainer.intake import VettedStore, split_entries
from dlsr_monitor.trainer.lock import JobLock
from dlsr_monitor.trainer.reference_ood import reference_ood_images

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A job cannot run (no data, too little calibration data, ...); the message says what to do."""


class ModelOps(Protocol):
    """What a job needs from the method."""

    def features(self, images: Any, *, progress: bool = True) -> np.ndarray: ...

    def fit(self, features: np.ndarray, *, warm_from: Any | None, progress: bool = True) -> Any: ...

    def load(self, path: Path) -> Any: ...

    def can_warm_start(self, old: Any) -> bool: ...

    def identity(self) -> dict: ...


@dataclass
class JobConfig:
    """The knobs of one job (from TrainerSettings + ModelSettings alpha, calibration and delta)."""

    alpha: float = 0.01
    calibration: str = "pac"  # the threshold's guarantee (dlsr.calibration): "marginal" or "pac"
    delta: float = 0.1
    holdout_fraction: float = 0.1
    calibration_fraction: float = 0.2
    reference_size: int = 500
    fa_sigmas: float = 3.0
    max_reference_shift: float = 0.1
    min_auroc: float = 0.9
    min_fit: int = 20
    baseline_max: int = 5000
    reference_ood: Path | None = None
    reference_ood_limit: int = 2000


@dataclass
class JobContext:
    """Everything a job touches, passed in (no globals)."""

    redis: redis.Redis
    keys: Keys
    registry: Registry
    store: VettedStore
    ops: ModelOps
    config: JobConfig = field(default_factory=JobConfig)
    history: JobHistory | None = None
    on_alert: Callable[[Any], None] | None = None  # receives a common.contract.ModelAlert
    add_baseline: Callable[[str, np.ndarray], None] | None = None  # (version, scores) -> reservoir
    owner: str = field(default_factory=lambda: socket.gethostname())

    def __post_init__(self) -> None:
        if self.history is None:
            self.history = JobHistory(self.redis, self.keys)


def min_calibration(alpha: float, method: str = "marginal", delta: float = 0.1) -> int:
    """Smallest calibration set whose conformal threshold is finite (marginal: ceil((n+1)(1-alpha)) <= n;
    pac: (1 - alpha)^n <= delta)."""
    return min_calibration_size(alpha, method=method, delta=delta)


def _last_total(history: JobHistory) -> int:
    # How many vetted images the newest finished job saw: later arrivals are "fresh".
    for rec in history.recent(50):
        if rec.outcome in (PROMOTED, REJECTED, CONFLICT) and "total" in rec.data_sizes:
            return int(rec.data_sizes["total"])
    return 0


def _model_alert(version: str, previous: str | None, reason: str) -> Any:
    try:
        from dlsr_monitor.common.contract import ModelAlert
    except ImportError:  # contract not there: the job still publishes; the alert is simply not sent
        return None
    return ModelAlert(
        alert_id=f"model:{version}:live",
        event="live",
        version=version,
        previous_version=previous,
        reason=reason,
        ts=time.time(),
        instance="trainer",
    )


def run_job(
    ctx: JobContext,
    trigger: str,
    *,
    lock: JobLock | None = None,
    job_id: str | None = None,
    progress: bool = True,
) -> JobRecord:
    """Run one job end to end and record it; never raises for a job-level failure (see the record's outcome)."""
    assert ctx.history is not None
    rec = JobRecord(
        job_id=job_id or ctx.history.new_id(), trigger=trigger, start=time.time(), owner=ctx.owner
    )
    ctx.history.save(rec)
    t0 = time.perf_counter()
    work = ctx.registry.store_root / ".work" / f"{rec.job_id}-{uuid.uuid4().hex[:6]}"
    try:
        _run(ctx, rec, lock, work, progress)
    except Exception as exc:
        rec.outcome = FAILED
        rec.message = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, JobError):
            log.error("job %s failed: %s", rec.job_id, rec.message)
        else:
            log.exception("job %s failed: %s", rec.job_id, rec.message)
    finally:
        rec.duration_s = time.perf_counter() - t0
        shutil.rmtree(work, ignore_errors=True)
        ctx.history.save(rec)
    return rec


def _timed(rec: JobRecord, name: str, t: float) -> float:
    now = time.perf_counter()
    rec.timings[name] = round(now - t, 3)
    return now


def _run(ctx: JobContext, rec: JobRecord, lock: JobLock | None, work: Path, progress: bool) -> None:
    cfg = ctx.config
    t = time.perf_counter()
    entries = ctx.store.entries()
    if not entries:
        raise JobError(
            "no vetted images yet: ingest some with 'dlsr trainer fit --data PATH' or the vetted topic"
        )
    since = _last_total(ctx.history)  # type: ignore[arg-type]
    split = split_entries(
        entries,
        holdout_fraction=cfg.holdout_fraction,
        calibration_fraction=cfg.calibration_fraction,
        reference_size=cfg.reference_size,
        since_index=since,
    )
    rec.data_sizes = split.sizes()
    need = min_calibration(cfg.alpha, cfg.calibration, cfg.delta)
    if len(split.calibration) < need:
        asked = f"alpha={cfg.alpha}" + (f" with delta={cfg.delta} (pac)" if cfg.calibration == "pac" else "")
        raise JobError(
            f"calibration split has {len(split.calibration)} images; {asked} needs at least {need}: "
            "add vetted images, raise alpha, or raise trainer.calibration_fraction"
        )
    if len(split.fit) < cfg.min_fit:
        raise JobError(f"fit split has {len(split.fit)} images, fewer than {cfg.min_fit}: add vetted images")

    # Features: one pass over every vetted image; the cache makes this cost only the new ones.
    feats = ctx.ops.features(ctx.store.images(entries), progress=progress)
    row = {e.sha: i for i, e in enumerate(entries)}

    def rows(part: list) -> np.ndarray:
        return feats[[row[e.sha] for e in part]]

    t = _timed(rec, "features_s", t)

    current = ctx.registry.current_entry()
    rec.parent = current.version if current else None
    old = None
    if current is not None:
        try:
            old = ctx.ops.load(ctx.registry.verify(current))
        except Exception as exc:  # a broken live artifact must not block a fix: fit cold, skip the shift gate
            log.warning(
                "job %s: live model %s does not load (%s); fitting cold", rec.job_id, current.version, exc
            )
    # The live model's view of the reference sample, taken before a warm start trains those very weights on.
    old_ref = old_cal = None
    if old is not None and len(split.reference) and getattr(old, "calibration_scores", None) is not None:
        old_ref = np.asarray(old.score(rows(split.reference)), dtype=np.float64)
        old_cal = np.array(old.calibration_scores, dtype=np.float64)
    warm = old if (old is not None and ctx.ops.can_warm_start(old)) else None
    rec.data_sizes["warm_start"] = int(warm is not None)
    t = _timed(rec, "load_live_s", t)

    det = ctx.ops.fit(rows(split.fit), warm_from=warm, progress=progress)
    t = _timed(rec, "fit_s", t)
    estimate = getattr(ctx.ops, "last_estimate", None)  # DlsrOps: what the probe promised, next to fit_s
    if estimate is not None:
        rec.timings["fit_estimate_s"] = round(float(estimate.seconds), 3)
    if lock is not None:
        lock.check()

    cal_scores = np.asarray(det.score(rows(split.calibration)), dtype=np.float64)
    hold_scores = np.asarray(det.score(rows(split.holdout)), dtype=np.float64)
    ref_scores = hold_scores[: len(split.reference)]  # reference = the first held-out entries by arrival
    finite_cal = cal_scores[np.isfinite(cal_scores)]
    if finite_cal.size == cal_scores.size:
        # From the features, not the scores: the per-stage calibration (`layers` / `shift` in score records)
        # and the reference sample of the model checks come with them; the scores are the same (deterministic).
        det.calibrate(rows(split.calibration), alpha=cfg.alpha, method=cfg.calibration, delta=cfg.delta)
        threshold = float(det.threshold)
    else:
        threshold = float("nan")  # the finite gate fails below; calibrating on NaN would only raise here
    ood_scores = None
    # The configured reference OOD set plus the images operators confirmed as OOD (`dlsr vet reject`).
    ood_images = reference_ood_images(
        cfg.reference_ood, getattr(ctx.store, "root", None), limit=cfg.reference_ood_limit
    )
    if ood_images is not None:
        ood_feats = ctx.ops.features(ood_images, progress=progress)
        ood_scores = np.asarray(det.score(ood_feats), dtype=np.float64)
    t = _timed(rec, "score_s", t)

    results = [
        G.gate_finite(
            calibration=cal_scores,
            holdout=hold_scores,
            reference_ood=ood_scores if ood_scores is not None else np.zeros(0),
        )
    ]
    if results[0].passed:
        results.append(G.gate_false_alarm(hold_scores, threshold, cfg.alpha, cfg.fa_sigmas))
        if split.fresh:
            fresh = G.gate_false_alarm(
                hold_scores[np.array([e.index >= since for e in split.holdout])],
                threshold,
                cfg.alpha,
                cfg.fa_sigmas,
            )
            results.append(
                G.GateResult(
                    "false_alarm_fresh", True, fresh.value, fresh.bound, "informational: " + fresh.detail
                )
            )
        results.append(
            G.gate_reference_shift(ref_scores, cal_scores, old_ref, old_cal, cfg.max_reference_shift)
        )
        results.append(G.gate_auroc(hold_scores, ood_scores, cfg.min_auroc))
    rec.gates = G.as_json(results)
    t = _timed(rec, "gates_s", t)

    work.parent.mkdir(parents=True, exist_ok=True)
    det.save(work)
    if not G.all_passed(results):
        kept = ctx.registry.keep_rejected(work, rec.job_id)
        failed = [f"{r.name} ({r.detail})" for r in results if not r.passed]
        rec.outcome = REJECTED
        rec.message = f"not promoted, failed gate(s): {'; '.join(failed)}; candidate kept at {kept}"
        log.warning("job %s: %s", rec.job_id, rec.message)
        return
    if lock is not None:
        lock.check()
    try:
        entry = ctx.registry.publish(
            work,
            threshold=threshold,
            alpha=cfg.alpha,
            data_sizes=rec.data_sizes,
            gates=rec.gates,
            parent=rec.parent,
            extra={"job_id": rec.job_id, "trigger": rec.trigger, "encoder": ctx.ops.identity()},
            expected=rec.parent,
            move=True,
            calibration=cfg.calibration,
            delta=cfg.delta if cfg.calibration == "pac" else None,
        )
    except PointerConflictError as exc:
        rec.outcome = CONFLICT
        rec.message = f"gates passed but not promoted: {exc}"
        return
    rec.version = entry.version
    rec.outcome = PROMOTED
    rec.message = f"promoted {entry.version} (parent {rec.parent or 'none'}), threshold {threshold:.6g}"
    t = _timed(rec, "publish_s", t)
    log.info("job %s: %s", rec.job_id, rec.message)
    if ctx.on_alert is not None:
        alert = _model_alert(entry.version, rec.parent, f"trainer job {rec.job_id} ({rec.trigger})")
        if alert is not None:
            try:
                ctx.on_alert(alert)
            except Exception as exc:  # the model is live either way; say the alert is missing
                log.error("job %s: model alert not sent: %s", rec.job_id, exc)
    if ctx.add_baseline is not None:
        # Vetted images the new model never fitted on seed its reservoir (calibration + held-out).
        seed = np.concatenate([cal_scores, hold_scores])[-cfg.baseline_max :]
        try:
            ctx.add_baseline(entry.version, seed)
        except Exception as exc:
            log.error("job %s: baseline reservoir not seeded: %s", rec.job_id, exc)
    _timed(rec, "after_publish_s", t)
