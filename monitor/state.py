"""Every Redis effect of the monitor's hot path. Keys come from `common.keys`.

Exactly-once effects: `apply_batch` runs one Lua script per (batch, partition) that compares each record's
offset with the partition's applied-offset watermark, applies only newer ones (window counters, sources,
recent alerts) and advances the watermark in the same atomic step. A replayed batch (after a crash before the
Kafka commit, or a rebalance) is a no-op, so the counters equal the number of distinct messages.

Windows are bucketed by *event* time (the message's `ts`), not by which replica processed it or when, so any
number of replicas produce the same counters. Drift is decided from those shared counters (`evaluate_drift`):
a consistent snapshot (MULTI/EXEC) of a source's window, then a compare-and-set on the source's drift hash that
only succeeds if no record of that source was applied meanwhile (a per-source version counter bumped by the
apply script). A transition gets a sequence number; its alert id is `drift:<source>:<seq>` and it is re-emitted
until `mark_drift_emitted` confirms the broker acknowledged it (at-least-once, same id).

The baseline reservoir (written by the trainer, read here for the threshold in force) is
`common.baseline.BaselineReservoir`, available as `MonitorState.baseline`; the read-only views for the dashboard
and operator commands are in `console.views`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.baseline import BaselineReservoir
from dlsr_monitor.common.contract import DriftAlert, WindowStats
from dlsr_monitor.common.keys import Keys
from dlsr_monitor.common.recent_alerts import RecentAlerts
from dlsr_monitor.common.redisdata import as_int, as_str
from dlsr_monitor.monitor.drift import DriftTest

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.config.settings import MonitorSettings

# KEYS: 1 watermark, 2 sources zset, 3 recent alerts list, 4.. bucket hashes then drift hashes
# ARGV: 1 JSON {r: [[offset, bucket_key_idx, drift_key_idx, scored, ood, score, source, ts, unit], ...],
#              a: [[offset, alert_json], ...], ttl, recent_max}
_APPLY = """
local wm = tonumber(redis.call('GET', KEYS[1]) or '-1')
local p = cjson.decode(ARGV[1])
local applied, skipped, top = 0, 0, wm
for _, r in ipairs(p.r) do
  local off = r[1]
  if off > wm then
    local key = KEYS[r[2]]
    if r[4] == 1 then
      redis.call('HINCRBY', key, 'images', 1)
      if r[5] == 1 then redis.call('HINCRBY', key, 'ood', 1) end
      redis.call('HINCRBYFLOAT', key, 'score_sum', r[6])
      if r[9] == 1 then
        redis.call('HINCRBY', key, 'units', 1)
        if r[5] == 1 then redis.call('HINCRBY', key, 'unit_ood', 1) end
      else
        redis.call('HINCRBY', key, 'units', 0)
      end
    else
      redis.call('HINCRBY', key, 'dead', 1)
    end
    redis.call('EXPIRE', key, p.ttl)
    redis.call('HINCRBY', KEYS[r[3]], 'ver', 1)
    redis.call('ZADD', KEYS[2], 'GT', r[8], r[7])
    applied = applied + 1
    if off > top then top = off end
  else
    skipped = skipped + 1
  end
end
local pushed = 0
for _, a in ipairs(p.a) do
  if a[1] > wm then
    redis.call('LPUSH', KEYS[3], a[2])
    pushed = pushed + 1
  end
end
if pushed > 0 then redis.call('LTRIM', KEYS[3], 0, p.recent_max - 1) end
if top > wm then redis.call('SET', KEYS[1], top) end
return {applied, skipped}
"""

# Compare-and-set of a source's drift hash. KEYS: 1 drift hash, 2 recent alerts list.
# ARGV: 1 expected ver, 2 expected seq, 3 JSON {fields: {...}, alert: json-or-empty, recent_max}
# Returns 1 when written, 0 when the snapshot was stale (the caller re-reads and decides again).
_DRIFT_CAS = """
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if ver ~= tonumber(ARGV[1]) or seq ~= tonumber(ARGV[2]) then return 0 end
local p = cjson.decode(ARGV[3])
for k, v in pairs(p.fields) do redis.call('HSET', KEYS[1], k, v) end
if p.alert ~= '' then
  redis.call('HSET', KEYS[1], 'seq', seq + 1, 'alert', p.alert)
  redis.call('LPUSH', KEYS[2], p.alert)
  redis.call('LTRIM', KEYS[2], 0, p.recent_max - 1)
end
return 1
"""

_MARK_EMITTED = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'emitted') or '0')
if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'emitted', ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class WindowRecord:
    """One input message's effect on its source's window (a scored image or a dead letter)."""

    offset: int
    source: str
    ts: float
    scored: bool
    is_ood: bool = False
    score: float = 0.0
    unit: bool = True  # opens a new drift evidence unit (monitor.scenes); every image does without de-duplication


@dataclass(frozen=True)
class ApplyResult:
    applied: int
    skipped: int


class MonitorState:
    """All monitor state in Redis for one deployment (`keys.prefix`).

    Args:
        redis: a `redis.Redis` client.
        keys: the key layout.
        bucket_s: width of a window bucket in seconds (event time).
        window_buckets: buckets in the drift window.
        window_ttl_s: bucket expiry.
        recent_alerts_max: length cap of the dashboard's alert list.
        baseline_max: reservoir cap (most recent vetted-ID scores per model version).
        baseline_min: reservoir size from which its conformal threshold replaces the registry's.
        heartbeat_ttl_s: heartbeat expiry.
    """

    def __init__(
        self,
        redis: redis.Redis,
        keys: Keys,
        *,
        bucket_s: int = 60,
        window_buckets: int = 10,
        window_ttl_s: int = 86400,
        recent_alerts_max: int = 500,
        baseline_max: int = 5000,
        baseline_min: int = 500,
        heartbeat_ttl_s: int = 30,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.bucket_s = int(bucket_s)
        self.window_buckets = int(window_buckets)
        self.window_ttl_s = int(window_ttl_s)
        self.recent_alerts_max = int(recent_alerts_max)
        self.heartbeat_ttl_s = int(heartbeat_ttl_s)
        self.baseline = BaselineReservoir(redis, keys, max_size=baseline_max, min_size=baseline_min)
        self.recent_alerts = RecentAlerts(redis, keys, max_len=recent_alerts_max)
        self._apply = redis.register_script(_APPLY)
        self._drift_cas = redis.register_script(_DRIFT_CAS)
        self._mark_emitted = redis.register_script(_MARK_EMITTED)

    @classmethod
    def from_settings(cls, redis: redis.Redis, keys: Keys, monitor: MonitorSettings) -> MonitorState:
        """Build from a `config.settings.MonitorSettings`."""
        return cls(
            redis,
            keys,
            bucket_s=monitor.bucket_s,
            window_buckets=monitor.window_buckets,
            window_ttl_s=monitor.window_ttl_s,
            recent_alerts_max=monitor.recent_alerts_max,
            baseline_max=monitor.baseline_max,
            baseline_min=monitor.baseline_min,
            heartbeat_ttl_s=monitor.heartbeat_ttl_s,
        )

    def bucket_of(self, ts: float) -> int:
        return int(math.floor(ts / self.bucket_s))

    # ---- the hot path ---------------------------------------------------------------------------
    def apply_batch(
        self,
        group: str,
        topic: str,
        partition: int,
        records: Sequence[WindowRecord],
        alerts: Sequence[tuple[int, str]] = (),
    ) -> ApplyResult:
        """Apply one partition's slice of a batch exactly once (records at or below the watermark are skipped).

        `alerts` are (offset, JSON) pairs pushed to the recent-alerts list under the same watermark check.
        """
        if not records:
            return ApplyResult(0, 0)
        keys = [self.keys.watermark(group, topic, partition), self.keys.sources(), self.keys.recent_alerts()]
        index: dict[str, int] = {}

        def idx(key: str) -> int:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)  # Lua is 1-based
            return index[key]

        rows = []
        for r in records:
            b = idx(self.keys.window_bucket(r.source, self.bucket_of(r.ts)))
            d = idx(self.keys.drift(r.source))
            score = float(r.score) if math.isfinite(r.score) else 0.0
            rows.append([int(r.offset), b, d, int(r.scored), int(r.is_ood), score, r.source, float(r.ts), int(r.unit)])
        payload = {
            "r": rows,
            "a": [[int(o), a] for o, a in alerts],
            "ttl": self.window_ttl_s,
            "recent_max": self.recent_alerts_max,
        }
        applied, skipped = self._apply(keys=keys, args=[json.dumps(payload)])
        return ApplyResult(int(applied), int(skipped))

    def evaluate_drift(
        self,
        sources: Iterable[str],
        test: DriftTest,
        *,
        model_version: str | None = None,
        retries: int = 5,
        evidence: str = "frames",
    ) -> list[DriftAlert]:
        """Decide drift for each source from the shared window; return the alerts to produce.

        `evidence`: "frames" tests every image's flag; "scenes" tests the flags of evidence units
        (`monitor.scenes`: one per new scene), so correlated frames of one scene count once. Returns transitions
        made now plus earlier ones not yet confirmed emitted (call `mark_drift_emitted` once the broker
        acknowledged them).
        """
        if evidence not in ("frames", "scenes"):
            raise ValueError(f"evidence must be 'frames' or 'scenes', got {evidence!r}")
        out: list[DriftAlert] = []
        for source in sorted(set(sources)):
            for _ in range(retries):
                snap = self._drift_snapshot(source)
                if evidence == "scenes":
                    decision = test.evaluate(snap["state"], snap["units"], snap["unit_ood"])
                else:
                    decision = test.evaluate(snap["state"], snap["images"], snap["ood"])
                window = WindowStats(
                    images=snap["images"],
                    ood=snap["ood"],
                    units=snap["units"],
                    unit_ood=snap["unit_ood"],
                    rate=decision.rate,
                    null_rate=decision.null_rate,
                    p_value=decision.p_value,
                    window_s=float(self.bucket_s * self.window_buckets),
                    since=snap["since"],
                    until=snap["until"],
                )
                fields = {
                    "state": decision.state,
                    "images": snap["images"],
                    "ood": snap["ood"],
                    "units": snap["units"],
                    "unit_ood": snap["unit_ood"],
                    "rate": decision.rate,
                    "p_value": decision.p_value,
                    "null_rate": decision.null_rate,
                    "evaluated": time.time(),
                }
                alert = ""
                if decision.changed:
                    seq = snap["seq"] + 1
                    fields["since"] = snap["until"]
                    alert_obj = DriftAlert(
                        alert_id=f"drift:{source}:{seq}",
                        source=source,
                        state="raised" if decision.state == "raised" else "cleared",
                        seq=seq,
                        ts=snap["until"],
                        window=window,
                        model_version=model_version,
                    )
                    alert = alert_obj.model_dump_json()
                ok = self._drift_cas(
                    keys=[self.keys.drift(source), self.keys.recent_alerts()],
                    args=[
                        snap["ver"],
                        snap["seq"],
                        json.dumps({"fields": fields, "alert": alert, "recent_max": self.recent_alerts_max}),
                    ],
                )
                if int(ok) == 1:
                    if alert:
                        out.append(alert_obj)
                    elif snap["seq"] > snap["emitted"] and snap["alert"]:
                        out.append(DriftAlert.model_validate_json(snap["alert"]))
                    break
        return out

    def mark_drift_emitted(self, alerts: Iterable[DriftAlert]) -> None:
        """Record that these drift alerts reached the broker (stops their re-emission)."""
        for a in alerts:
            self._mark_emitted(keys=[self.keys.drift(a.source)], args=[a.seq])

    def _drift_snapshot(self, source: str) -> dict[str, Any]:
        last_ts = self.redis.zscore(self.keys.sources(), source)
        last_ts = float(last_ts) if last_ts is not None else time.time()
        top = self.bucket_of(last_ts)
        buckets = list(range(top - self.window_buckets + 1, top + 1))
        pipe = self.redis.pipeline(transaction=True)  # MULTI/EXEC: one consistent snapshot
        for b in buckets:
            pipe.hmget(self.keys.window_bucket(source, b), "images", "ood", "units", "unit_ood")
        pipe.hmget(self.keys.drift(source), "state", "ver", "seq", "emitted", "alert")
        pipe.zscore(self.keys.sources(), source)
        res = pipe.execute()
        if res[-1] is not None and self.bucket_of(float(res[-1])) != top:
            return self._drift_snapshot(source)  # the window moved between the two reads
        counts = res[: len(buckets)]
        images = sum(as_int(r[0]) for r in counts)
        ood = sum(as_int(r[1]) for r in counts)
        # A bucket without `units` was written by a monitor older than evidence units: its images count as units.
        units = sum(as_int(r[2] if r[2] is not None else r[0]) for r in counts)
        unit_ood = sum(as_int(r[3] if r[2] is not None else r[1]) for r in counts)
        state, ver, seq, emitted, alert = res[len(buckets)]
        return {
            "state": "raised" if as_str(state) == "raised" else "ok",
            "ver": as_int(ver),
            "seq": as_int(seq),
            "emitted": as_int(emitted),
            "alert": as_str(alert),
            "images": images,
            "ood": ood,
            "units": units,
            "unit_ood": unit_ood,
            "since": float(buckets[0] * self.bucket_s),
            "until": float((top + 1) * self.bucket_s),
        }

    # ---- heartbeats ------------------------------------------------------------------------------
    def heartbeat(
        self,
        instance: str,
        *,
        model_version: str | None,
        rate: float,
        lag: int | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record that `instance` is alive (expires after heartbeat_ttl_s)."""
        now = time.time()
        fields: dict[str, Any] = {
            "instance": instance,
            "model_version": model_version or "",
            "rate": f"{rate:.3f}",
            "lag": "" if lag is None else int(lag),
            "ts": f"{now:.3f}",
        }
        for k, v in (extra or {}).items():
            fields[k] = json.dumps(v) if isinstance(v, dict | list) else v
        key = self.keys.heartbeat(instance)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.heartbeat_ttl_s)
        pipe.zadd(self.keys.heartbeats(), {instance: now})
        pipe.execute()

    def record_layout(self, instance: str) -> dict[str, int] | None:
        """Write the window layout this monitor buckets with (`keys.window_layout()`), for readers with other
        local settings; returns the layout recorded before when it differs (two monitors disagree), else None."""
        key = self.keys.window_layout()
        before = {as_str(k): as_str(v) for k, v in self.redis.hgetall(key).items()}
        self.redis.hset(
            key,
            mapping={
                "bucket_s": self.bucket_s,
                "window_buckets": self.window_buckets,
                "instance": instance,
                "ts": f"{time.time():.3f}",
            },
        )
        old = {k: as_int(before.get(k)) for k in ("bucket_s", "window_buckets") if before.get(k)}
        mine = {"bucket_s": self.bucket_s, "window_buckets": self.window_buckets}
        return old if old and any(old[k] != mine[k] for k in old) else None

    def remove_heartbeat(self, instance: str) -> None:
        """Forget an instance at clean shutdown."""
        self.redis.delete(self.keys.heartbeat(instance))
        self.redis.zrem(self.keys.heartbeats(), instance)

