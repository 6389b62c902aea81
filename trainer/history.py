"""Job history in Redis: one hash per job plus a sorted set by start time (what `dlsr jobs` shows)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.keys import Keys

if TYPE_CHECKING:
    import redis

RUNNING = "running"
PROMOTED = "promoted"
REJECTED = "rejected"  # a gate failed; candidate kept for inspection
FAILED = "failed"  # an error stopped the job
SKIPPED = "skipped"  # nothing to do (no new data, lock held elsewhere)
CONFLICT = "conflict"  # gates passed but the pointer moved meanwhile
ABANDONED = "abandoned"  # the trainer died mid-job; found by the next lock holder


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class JobRecord:
    """One trainer job as stored in Redis."""

    job_id: str
    trigger: str
    start: float
    outcome: str = RUNNING
    duration_s: float | None = None
    data_sizes: dict[str, int] = field(default_factory=dict)
    gates: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    parent: str | None = None
    message: str = ""
    owner: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_hash(self) -> dict[str, str]:
        return {
            "job_id": self.job_id,
            "trigger": self.trigger,
            "start": repr(self.start),
            "outcome": self.outcome,
            "duration_s": "" if self.duration_s is None else repr(self.duration_s),
            "data_sizes": json.dumps(self.data_sizes, sort_keys=True),
            "gates": json.dumps(self.gates, sort_keys=True, default=str),
            "version": self.version or "",
            "parent": self.parent or "",
            "message": self.message,
            "owner": self.owner,
            "timings": json.dumps(self.timings, sort_keys=True),
        }

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> JobRecord:
        h = {_s(k): _s(v) for k, v in raw.items()}
        return cls(
            job_id=h["job_id"],
            trigger=h.get("trigger", ""),
            start=float(h.get("start") or 0),
            outcome=h.get("outcome", ""),
            duration_s=float(h["duration_s"]) if h.get("duration_s") else None,
            data_sizes=json.loads(h.get("data_sizes") or "{}"),
            gates=json.loads(h.get("gates") or "{}"),
            version=h.get("version") or None,
            parent=h.get("parent") or None,
            message=h.get("message", ""),
            owner=h.get("owner", ""),
            timings=json.loads(h.get("timings") or "{}"),
        )

    def failed_gates(self) -> list[str]:
        """Names of the gates that did not pass."""
        return [name for name, g in self.gates.items() if isinstance(g, dict) and not g.get("passed", True)]


class JobHistory:
    """Reads and writes job records; keeps the newest `keep` jobs."""

    def __init__(self, redis: redis.Redis, keys: Keys, keep: int = 500) -> None:
        self.redis = redis
        self.keys = keys
        self.keep = keep

    def new_id(self) -> str:
        """A readable, sortable job id: UTC time plus a short random suffix."""
        import uuid

        return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    def save(self, rec: JobRecord) -> None:
        """Create or update one job (hash + index), trimming the oldest beyond `keep`."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.trainer_job(rec.job_id), mapping=rec.to_hash())
        pipe.zadd(self.keys.trainer_jobs(), {rec.job_id: rec.start})
        pipe.execute()
        extra = self.redis.zcard(self.keys.trainer_jobs()) - self.keep
        if extra > 0:
            old = [_s(j) for j in self.redis.zrange(self.keys.trainer_jobs(), 0, extra - 1)]
            pipe = self.redis.pipeline(transaction=True)
            for j in old:
                pipe.delete(self.keys.trainer_job(j))
            pipe.zrem(self.keys.trainer_jobs(), *old)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.keys.trainer_job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def recent(self, limit: int = 20) -> list[JobRecord]:
        """Newest first."""
        ids = [_s(j) for j in self.redis.zrevrange(self.keys.trainer_jobs(), 0, max(0, limit - 1))]
        pipe = self.redis.pipeline(transaction=False)
        for j in ids:
            pipe.hgetall(self.keys.trainer_job(j))
        return [JobRecord.from_hash(raw) for raw in pipe.execute() if raw]

    def close_abandoned(self, by: str) -> list[str]:
        """Mark jobs still 'running' as abandoned. Call only while holding the job lock: then no job runs, so a
        'running' record belongs to a trainer that died (its lock expired). Returns their ids."""
        closed = []
        for rec in self.recent(50):
            if rec.outcome == RUNNING:
                rec.outcome = ABANDONED
                rec.message = (
                    f"the trainer ({rec.owner or 'unknown'}) stopped mid-job; its lock expired; found by {by}"
                )
                self.save(rec)
                closed.append(rec.job_id)
        return closed

    def last_start(self, outcomes: tuple[str, ...] | None = None) -> float | None:
        """Start time of the newest job (optionally only with one of `outcomes`)."""
        for rec in self.recent(50):
            if outcomes is None or rec.outcome in outcomes:
                return rec.start
        return None
