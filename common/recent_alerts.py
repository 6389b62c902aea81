"""The dashboard's list of recent alerts in Redis: both services write it, the console reads it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.common.keys import Keys


class RecentAlerts:
    """Newest-first capped list of alert JSON documents (`keys.recent_alerts()`)."""

    def __init__(self, redis: redis.Redis, keys: Keys, *, max_len: int = 500) -> None:
        self.redis, self.keys, self.max_len = redis, keys, int(max_len)

    def push(self, alert_json: str) -> None:
        """Add an alert (model alerts; OOD and drift alerts go through the monitor's Lua scripts)."""
        pipe = self.redis.pipeline()
        pipe.lpush(self.keys.recent_alerts(), alert_json)
        pipe.ltrim(self.keys.recent_alerts(), 0, self.max_len - 1)
        pipe.execute()

    def read(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, as dicts (each has `kind`: ood / drift / model); unparsable entries are skipped."""
        out = []
        for raw in self.redis.lrange(self.keys.recent_alerts(), 0, max(0, limit - 1)):
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out
