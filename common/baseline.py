"""The baseline reservoir in Redis: vetted in-distribution stream scores per model version and the conformal
threshold they give. The trainer writes it (vetted intake, refits); the monitor reads the threshold in force.
The threshold uses the calibration method (marginal or pac, and delta) of the version's registry entry, so the
guarantee a version was published with still holds when its reservoir takes over.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from dlsr_monitor.common.redisdata import as_dict, as_float, as_int, as_str

#: The delta of an entry that records none (dlsr.calibration.DEFAULT_DELTA; not imported: it would load torch).
DEFAULT_DELTA = 0.1

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.common.keys import Keys


class BaselineReservoir:
    """Capped reservoirs of vetted-ID scores, one per model version.

    Args:
        redis: a `redis.Redis` client.
        keys: the key layout.
        max_size: reservoir cap (most recent vetted-ID scores kept).
        min_size: size from which the reservoir's conformal threshold replaces the registry's.
    """

    def __init__(self, redis: redis.Redis, keys: Keys, *, max_size: int = 5000, min_size: int = 500) -> None:
        self.redis, self.keys = redis, keys
        self.max_size, self.min_size = int(max_size), int(min_size)

    def add(self, version: str, scores: Iterable[float], alpha: float | None = None) -> float | None:
        """Add vetted-ID scores of `version` to its reservoir (capped, most recent kept) and recompute its
        conformal threshold. Only vetted data may be passed here: this is what moves a threshold.

        Returns the new threshold, or None while the reservoir is below `min_size`.
        """
        values = [float(s) for s in scores if math.isfinite(float(s))]
        if values:
            pipe = self.redis.pipeline()
            pipe.lpush(self.keys.baseline(version), *[repr(v) for v in values])
            pipe.ltrim(self.keys.baseline(version), 0, self.max_size - 1)
            pipe.hincrby(self.keys.baseline_meta(version), "seen", len(values))
            pipe.execute()
        if alpha is None:
            alpha = self._entry_alpha(version)
        if alpha is None:
            return None
        return self._recompute_threshold(version, float(alpha))

    def _recompute_threshold(self, version: str, alpha: float) -> float | None:
        scores = self.scores(version)
        method, delta = self.calibration(version)
        if scores.size < self.min_for(alpha, method, delta):
            return None
        # Imported here: `dlsr`'s package import loads torch, which the console commands (dashboard, alerts,
        # notify: they reach this module through console.views) never need.
        from dlsr.calibration import conformal_threshold

        threshold = float(conformal_threshold(scores, alpha, method=method, delta=delta))
        self.redis.hset(
            self.keys.baseline_meta(version),
            mapping={"threshold": repr(threshold), "alpha": repr(alpha), "method": method, "delta": repr(delta),
                     "n": scores.size, "updated": time.time()},
        )
        return threshold

    def min_for(self, alpha: float, method: str = "marginal", delta: float = DEFAULT_DELTA) -> int:
        """Reservoir size needed before its threshold is used."""
        # Below this many scores the conformal rank exceeds n and no finite threshold exists (marginal:
        # ceil(1/alpha) - 1; pac: ceil(log(delta) / log(1 - alpha))).
        if method == "pac":
            need = int(math.ceil(math.log(delta) / math.log1p(-alpha)))
        else:
            need = int(math.ceil(1.0 / alpha))
        return max(self.min_size, need)

    def calibration(self, version: str) -> tuple[str, float]:
        """(method, delta) of the version's registry entry; an entry without them is marginal (delta 0.1)."""
        method, delta = self.redis.hmget(self.keys.model_entry(version), ["calibration", "delta"])
        return as_str(method) or "marginal", as_float(delta, DEFAULT_DELTA)

    def size(self, version: str) -> int:
        return int(self.redis.llen(self.keys.baseline(version)))

    def scores(self, version: str) -> np.ndarray:
        """The reservoir (most recent first)."""
        raw = self.redis.lrange(self.keys.baseline(version), 0, -1)
        return np.array([as_float(v) for v in raw], dtype=np.float64)

    def threshold(self, version: str, alpha: float) -> float | None:
        """Threshold in force for `version`: the reservoir's conformal threshold once it holds enough vetted
        scores, else the registry entry's threshold, else None."""
        meta = as_dict(self.redis.hgetall(self.keys.baseline_meta(version)))
        method, delta = self.calibration(version)
        if (
            meta.get("threshold")
            and meta.get("alpha")
            and abs(float(meta["alpha"]) - alpha) < 1e-12
            and (meta.get("method") or "marginal") == method
            and as_int(meta.get("n")) >= self.min_for(alpha, method, delta)
        ):
            return float(meta["threshold"])
        if self.size(version) >= self.min_for(alpha, method, delta):
            value = self._recompute_threshold(version, alpha)
            if value is not None:
                return value
        raw = self.redis.hget(self.keys.model_entry(version), "threshold")
        return as_float(raw, float("nan")) if raw is not None else None

    def read(self, version: str) -> dict[str, Any]:
        """Reservoir size, scores seen, and its conformal threshold (if computed)."""
        meta = as_dict(self.redis.hgetall(self.keys.baseline_meta(version)))
        return {
            "size": self.size(version),
            "seen": as_int(meta.get("seen")),
            "threshold": as_float(meta.get("threshold"), float("nan")) if meta.get("threshold") else None,
            "alpha": as_float(meta.get("alpha")) if meta.get("alpha") else None,
        }

    def _entry_alpha(self, version: str) -> float | None:
        raw = self.redis.hget(self.keys.model_entry(version), "alpha")
        return as_float(raw) if raw is not None else None
