"""Read-only views of the monitor's state in Redis, for the dashboard and the operator commands.

Everything here returns plain data and writes nothing (except dropping expired heartbeats from their index).
The writing half lives with the services: `monitor.state` (windows, drift, heartbeats) and `common.baseline`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.baseline import BaselineReservoir
from dlsr_monitor.common.recent_alerts import RecentAlerts
from dlsr_monitor.common.redisdata import as_float, as_int, as_str

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.config.settings import MonitorSettings


@dataclass(frozen=True)
class WindowBucket:
    """Counters of one source in one time bucket."""

    start: float
    images: int
    ood: int
    score_sum: float
    dead: int

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.images if self.images else float("nan")


@dataclass(frozen=True)
class SourceSummary:
    """A source as the dashboard lists it."""

    source: str
    last_ts: float
    drift_state: str
    window: dict[str, Any] = field(default_factory=dict)


class StateView:
    """Reads of one deployment's state (`keys.prefix`).

    Args:
        redis: a `redis.Redis` client.
        keys: the key layout.
        bucket_s: width of a window bucket in seconds (the monitor's setting).
        window_ttl_s: bucket expiry (bounds `window_totals`).
    """

    def __init__(self, redis: redis.Redis, keys: Keys, *, bucket_s: int = 60, window_ttl_s: int = 86400) -> None:
        self.redis, self.keys = redis, keys
        self.bucket_s, self.window_ttl_s = int(bucket_s), int(window_ttl_s)

    @classmethod
    def from_settings(cls, redis: redis.Redis, keys: Keys, monitor: MonitorSettings) -> StateView:
        return cls(redis, keys, bucket_s=monitor.bucket_s, window_ttl_s=monitor.window_ttl_s)

    def bucket_of(self, ts: float) -> int:
        return int(math.floor(ts / self.bucket_s))

    def read_sources(self) -> list[SourceSummary]:
        """Every source seen, most recent first, with its drift state and last window statistics."""
        rows = self.redis.zrevrange(self.keys.sources(), 0, -1, withscores=True)
        out = []
        for name, score in rows:
            source = as_str(name) or ""
            d = self.read_drift(source)
            out.append(SourceSummary(source, float(score), d.get("state", "ok"), d))
        return out

    def read_window(self, source: str, since: float, until: float | None = None) -> list[WindowBucket]:
        """Buckets of `source` from `since` to `until` (default now), oldest first; empty buckets included."""
        until = time.time() if until is None else until
        first, last = self.bucket_of(since), self.bucket_of(until)
        if last - first > 10_000:
            first = last - 10_000
        pipe = self.redis.pipeline()
        for b in range(first, last + 1):
            pipe.hgetall(self.keys.window_bucket(source, b))
        out = []
        for b, raw in zip(range(first, last + 1), pipe.execute(), strict=True):
            h = {as_str(k): v for k, v in raw.items()}
            out.append(
                WindowBucket(
                    float(b * self.bucket_s),
                    as_int(h.get("images")),
                    as_int(h.get("ood")),
                    as_float(h.get("score_sum")),
                    as_int(h.get("dead")),
                )
            )
        return out

    def window_totals(self, source: str, since: float = 0.0, until: float | None = None) -> dict[str, float]:
        """Sums of a source's counters over [since, until] (tests and `dlsr` status use it)."""
        if until is None:
            last = self.redis.zscore(self.keys.sources(), source)
            until = float(last) if last is not None else time.time()
        if since <= 0.0:
            since = until - self.window_ttl_s
        buckets = self.read_window(source, since, until)
        return {
            "images": sum(b.images for b in buckets),
            "ood": sum(b.ood for b in buckets),
            "dead": sum(b.dead for b in buckets),
            "score_sum": sum(b.score_sum for b in buckets),
        }

    def read_drift(self, source: str) -> dict[str, Any]:
        """Drift hash of one source: state, images, ood, rate, p_value, null_rate, since, seq, evaluated."""
        raw = {as_str(k): as_str(v) for k, v in self.redis.hgetall(self.keys.drift(source)).items()}
        out: dict[str, Any] = {"state": raw.get("state") or "ok"}
        for k in ("images", "ood", "seq", "ver"):
            out[k] = as_int(raw.get(k))
        for k in ("rate", "p_value", "null_rate", "since", "evaluated"):
            if raw.get(k):
                out[k] = as_float(raw.get(k))
        return out

    def read_heartbeats(self) -> list[dict[str, Any]]:
        """Live monitor instances (expired ones are dropped from the index)."""
        out = []
        for name in self.redis.zrange(self.keys.heartbeats(), 0, -1):
            instance = as_str(name) or ""
            raw = self.redis.hgetall(self.keys.heartbeat(instance))
            if not raw:
                self.redis.zrem(self.keys.heartbeats(), instance)
                continue
            h = {as_str(k): as_str(v) for k, v in raw.items()}
            out.append(
                {
                    "instance": instance,
                    "model_version": h.get("model_version") or None,
                    "rate": as_float(h.get("rate")),
                    "lag": as_int(h.get("lag")) if h.get("lag") not in (None, "") else None,
                    "ts": as_float(h.get("ts")),
                    **{k: v for k, v in h.items() if k not in ("instance", "model_version", "rate", "lag", "ts")},
                }
            )
        return out

    def read_recent_alerts(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, as dicts (each has `kind`: ood / drift / model)."""
        return RecentAlerts(self.redis, self.keys).read(limit)

    def read_model(self) -> dict[str, Any]:
        """Current version, its registry entry and its baseline (threshold in force, reservoir size)."""
        version = as_str(self.redis.get(self.keys.model_current()))
        if version is None:
            return {"version": None}
        entry = {as_str(k): as_str(v) for k, v in self.redis.hgetall(self.keys.model_entry(version)).items()}
        alpha = as_float(entry.get("alpha"), float("nan"))
        return {
            "version": version,
            "entry": entry,
            "registry_threshold": as_float(entry.get("threshold"), float("nan")),
            "alpha": alpha,
            "baseline": self.read_baseline(version),
        }

    def read_baseline(self, version: str) -> dict[str, Any]:
        """Reservoir size, scores seen, and its conformal threshold (if computed)."""
        return BaselineReservoir(self.redis, self.keys).read(version)

    def read_watermark(self, group: str, topic: str, partition: int) -> int:
        """Highest applied input offset of a partition (-1 when none)."""
        raw = self.redis.get(self.keys.watermark(group, topic, partition))
        return as_int(raw, -1) if raw is not None else -1
