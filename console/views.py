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


@dataclass(frozen=True)
class DriftAck:
    """Who acknowledged a source's raised drift (`dlsr alerts ack`), and which transition (`seq`)."""

    seq: int
    by: str
    note: str
    at: float


@dataclass(frozen=True)
class RaisedDrift:
    """A source whose drift state is raised, with its acknowledgement when it is for this very raise."""

    source: str
    seq: int
    since: float | None  # when it was raised (the window end of the raising evaluation)
    images: int
    ood: int
    rate: float | None
    null_rate: float | None
    p_value: float | None
    ack: DriftAck | None = None


class StateView:
    """Reads of one deployment's state (`keys.prefix`).

    Args:
        redis: a `redis.Redis` client.
        keys: the key layout.
        bucket_s: width of a window bucket in seconds, used when no monitor recorded the one it writes with
            (`Keys.window_layout`); a recorded width wins, so a reader with other settings reads the right buckets.
        window_ttl_s: bucket expiry (bounds `window_totals`).
    """

    #: Seconds a read of the recorded window layout is reused.
    LAYOUT_REFRESH_S = 5.0

    def __init__(self, redis: redis.Redis, keys: Keys, *, bucket_s: int = 60, window_ttl_s: int = 86400) -> None:
        self.redis, self.keys = redis, keys
        self.local_bucket_s, self.window_ttl_s = int(bucket_s), int(window_ttl_s)
        self._layout: dict[str, int] = {}
        self._layout_read = -math.inf

    @classmethod
    def from_settings(cls, redis: redis.Redis, keys: Keys, monitor: MonitorSettings) -> StateView:
        return cls(redis, keys, bucket_s=monitor.bucket_s, window_ttl_s=monitor.window_ttl_s)

    def read_layout(self) -> dict[str, int]:
        """The window layout the monitors recorded (bucket_s, window_buckets); empty when none did."""
        now = time.monotonic()
        if now - self._layout_read >= self.LAYOUT_REFRESH_S:
            raw = {as_str(k): v for k, v in self.redis.hgetall(self.keys.window_layout()).items()}
            self._layout = {k: as_int(raw.get(k)) for k in ("bucket_s", "window_buckets") if as_int(raw.get(k)) > 0}
            self._layout_read = now
        return self._layout

    @property
    def bucket_s(self) -> int:
        """The bucket width the monitors write with (recorded in Redis), else the local setting."""
        return self.read_layout().get("bucket_s") or self.local_bucket_s

    @property
    def bucket_recorded(self) -> bool:
        """True when `bucket_s` comes from a monitor's record rather than the local setting."""
        return "bucket_s" in self.read_layout()

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
        width = self.bucket_s
        first, last = int(math.floor(since / width)), int(math.floor(until / width))
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
                    float(b * width),
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
        """Drift hash of one source: state, images, ood, (units, unit_ood,) rate, p_value, null_rate, since, seq,
        evaluated."""
        raw = {as_str(k): as_str(v) for k, v in self.redis.hgetall(self.keys.drift(source)).items()}
        out: dict[str, Any] = {"state": raw.get("state") or "ok"}
        for k in ("images", "ood", "seq", "ver"):
            out[k] = as_int(raw.get(k))
        for k in ("units", "unit_ood"):  # evidence units (monitor.scenes), written by newer monitors
            if raw.get(k):
                out[k] = as_int(raw.get(k))
        for k in ("rate", "p_value", "null_rate", "since", "evaluated"):
            if raw.get(k):
                out[k] = as_float(raw.get(k))
        return out

    def read_drift_ack(self, source: str) -> DriftAck | None:
        """The last acknowledgement of `source`'s drift, whatever transition it was for (None when none)."""
        return _ack_of({as_str(k): as_str(v) for k, v in self.redis.hgetall(self.keys.drift_ack(source)).items()})

    def read_raised_drifts(self, sources: list[SourceSummary] | None = None) -> list[RaisedDrift]:
        """Every source whose drift state is raised (however long ago it last sent), oldest raise first, each
        with its acknowledgement only when that acknowledged this raise (same drift `seq`): an ack of an earlier
        raise that cleared meanwhile does not carry over."""
        raised = [s for s in (self.read_sources() if sources is None else sources) if s.drift_state == "raised"]
        if not raised:
            return []
        pipe = self.redis.pipeline()
        for s in raised:
            pipe.hgetall(self.keys.drift_ack(s.source))
        out = []
        for s, raw in zip(raised, pipe.execute(), strict=True):
            d = s.window
            ack = _ack_of({as_str(k): as_str(v) for k, v in raw.items()})
            out.append(
                RaisedDrift(
                    source=s.source,
                    seq=int(d.get("seq") or 0),
                    since=d.get("since"),
                    images=int(d.get("images") or 0),
                    ood=int(d.get("ood") or 0),
                    rate=d.get("rate"),
                    null_rate=d.get("null_rate"),
                    p_value=d.get("p_value"),
                    ack=ack if ack is not None and ack.seq == int(d.get("seq") or 0) else None,
                )
            )
        out.sort(key=lambda r: (r.since if r.since is not None else math.inf, r.source))
        return out

    def read_trainer_heartbeats(self) -> list[dict[str, Any]]:
        """Running trainer services (`dlsr trainer run`) whose heartbeat has not expired; expired ones are
        dropped from the index."""
        import json

        out = []
        for name in self.redis.zrange(self.keys.trainer_heartbeats(), 0, -1):
            owner = as_str(name) or ""
            raw = self.redis.get(self.keys.trainer_heartbeat(owner))
            if raw is None:
                self.redis.zrem(self.keys.trainer_heartbeats(), owner)
                continue
            try:
                beat = json.loads(raw)
            except ValueError:
                continue
            if isinstance(beat, dict):
                out.append({**beat, "owner": owner})
        return out

    def read_trainer_lock(self) -> str | None:
        """Who holds the trainer's job lock (a job runs now), None when free."""
        return as_str(self.redis.get(self.keys.trainer_lock()))

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


def _ack_of(h: dict[str | None, str | None]) -> DriftAck | None:
    if not h.get("seq"):
        return None
    return DriftAck(seq=as_int(h.get("seq")), by=h.get("by") or "?", note=h.get("note") or "", at=as_float(h.get("at")))
