"""Every Redis key DLSR Monitor writes, in one place, all under a configurable prefix.

Monitor and trainer both import this module, so the layout cannot drift between them.

Redis Cluster: every Lua script and MULTI/EXEC here touches several keys (a partition's watermark with the
window buckets and drift hashes of the sources in a batch, the registry pointer with its entries ...), and
Cluster runs a script only when all its keys share one hash slot. With `cluster=True` the prefix becomes a hash
tag (`{dlsr}:...`), so a deployment's keys live in one slot: the state runs on a Cluster unchanged and several
deployments (prefixes) spread over its shards. One deployment's state is then served by one shard, which is
ample for its key rate (one script per partition per batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import RedisSettings


@dataclass(frozen=True)
class Keys:
    """Key builder for one deployment (`prefix`, e.g. "dlsr" or a per-test namespace)."""

    prefix: str = "dlsr"
    cluster: bool = False  # hash-tag the prefix: every key of the deployment in one Cluster slot

    @classmethod
    def of(cls, redis_settings: RedisSettings) -> Keys:
        """The key layout the settings ask for (`redis.prefix`, `redis.cluster`)."""
        return cls(redis_settings.prefix, cluster=redis_settings.cluster)

    @property
    def head(self) -> str:
        """What every key starts with: the prefix, as a hash tag on a Cluster."""
        return f"{{{self.prefix}}}" if self.cluster else self.prefix

    def _k(self, *parts: object) -> str:
        return ":".join([self.head, *(str(p) for p in parts)])

    # --- model registry (common/registry.py) ----------------------------------------------------
    def model_current(self) -> str:
        """String: the live model version (moved by compare-and-set)."""
        return self._k("model", "current")

    def model_previous(self) -> str:
        """List: earlier live versions, newest first (what `rollback` returns to)."""
        return self._k("model", "previous")

    def model_versions(self) -> str:
        """Sorted set: every registered version, scored by creation time."""
        return self._k("model", "versions")

    def model_entry(self, version: str) -> str:
        """Hash: artifact URI, sha256, threshold, alpha, data sizes, gates, parent, created time."""
        return self._k("model", "v", version)

    # --- baseline reservoir and thresholds (common/baseline.py) ----------------------------------
    def baseline(self, version: str) -> str:
        """Capped reservoir of vetted-ID scores for one model version."""
        return self._k("baseline", version)

    def baseline_meta(self, version: str) -> str:
        """Hash: reservoir size seen, current conformal threshold, alpha."""
        return self._k("baseline", version, "meta")

    # --- per-source windows and drift (monitor/state.py) ----------------------------------------
    def sources(self) -> str:
        """Sorted set: every source seen, scored by last-seen time."""
        return self._k("sources")

    def window_bucket(self, source: str, bucket: int) -> str:
        """Hash: images, ood, score_sum for one source in one time bucket (with TTL)."""
        return self._k("win", source, bucket)

    def drift(self, source: str) -> str:
        """Hash: drift state of one source (state, statistic, since, window counts)."""
        return self._k("drift", source)

    def window_layout(self) -> str:
        """Hash: bucket_s, window_buckets, instance, ts: the window layout the monitor writes with (each monitor
        writes it at start), so a dashboard with other local settings reads the right buckets."""
        return self._k("monitor", "layout")

    def drift_ack(self, source: str) -> str:
        """Hash: seq (the drift transition it acknowledges), by, note, at; written by `dlsr alerts ack`
        (console/ack.py). Shown only while `seq` is the source's current raised drift."""
        return self._k("ack", "drift", source)

    def watermark(self, group: str, topic: str, partition: int) -> str:
        """String: highest input offset whose Redis effects are applied (idempotent replays)."""
        return self._k("wm", group, topic, partition)

    # --- liveness and alerts -------------------------------------------------------------------
    def heartbeat(self, instance_id: str) -> str:
        """Hash with TTL: instance, model version, rate, consumer lag, last beat."""
        return self._k("hb", instance_id)

    def heartbeats(self) -> str:
        """Sorted set: monitor instances by last heartbeat time."""
        return self._k("hb", "index")

    def recent_alerts(self) -> str:
        """Capped list of the latest alerts (JSON), for the dashboard."""
        return self._k("alerts", "recent")

    # --- trainer (trainer/) --------------------------------------------------------------------
    def trainer_lock(self) -> str:
        """String with expiry: holder of the one-job-at-a-time lock."""
        return self._k("trainer", "lock")

    def trainer_trigger(self) -> str:
        """String: a pending manual trigger (set by `dlsr trainer trigger`)."""
        return self._k("trainer", "trigger")

    def trainer_jobs(self) -> str:
        """Sorted set: job ids by start time."""
        return self._k("trainer", "jobs")

    def trainer_job(self, job_id: str) -> str:
        """Hash: one job's trigger, start, duration, data sizes, gate results, outcome."""
        return self._k("trainer", "job", job_id)

    def trainer_heartbeat(self, owner: str) -> str:
        """String with TTL: JSON {owner, ts, poll_s} of one running `dlsr trainer run` (trainer/schedule.py)."""
        return self._k("trainer", "hb", owner)

    def trainer_heartbeats(self) -> str:
        """Sorted set: trainer owners by last heartbeat time (expired ones are dropped by readers)."""
        return self._k("trainer", "hb-index")

    def vetted_new(self) -> str:
        """Integer: vetted images arrived since the last refit."""
        return self._k("vetted", "new")

    # --- operator decisions (console/vet.py) ---------------------------------------------------------
    def vet_decision(self, sha256: str) -> str:
        """Hash: the decision on one image, by the sha256 of its bytes (decision accept|reject, by, at, note,
        origin, image_id, source, alert_id): vetting the same image twice adds nothing."""
        return self._k("vet", "d", sha256)

    def vet_index(self) -> str:
        """Sorted set: sha256 of every decided image, scored by decision time (`dlsr vet list`)."""
        return self._k("vet", "index")

    # --- notifier (console/notify.py) ------------------------------------------------------------
    def notify_posted(self, webhook_id: str) -> str:
        """Sorted set: alert ids already posted to one webhook (`webhook_id`, a hash of its URL), scored by
        post time; entries older than `notify.dedupe_ttl_s` are trimmed and the key expires with them."""
        return self._k("notify", "posted", webhook_id)

    def epoch(self) -> str:
        """String: a random id set once when this deployment's state is first written; its absence later means
        Redis lost the state (restarted without persistence, flushed)."""
        return self._k("epoch")

    def all_pattern(self) -> str:
        """Glob for every key under this prefix (tests use it to clean up)."""
        return f"{self.head}:*"
