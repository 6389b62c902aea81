"""One trainer job at a time across every trainer process: a Redis lock with expiry, renewal and token checks.

The holder renews the expiry from a background thread while its job runs; a trainer that dies stops renewing,
so the lock expires after `ttl_s` and the next trainer can take it. Release and renewal only act when the
caller's token still holds the lock, so an expired holder can never delete a successor's lock.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

# KEYS[1] lock; ARGV[1] token, ARGV[2] ttl ms. 1 when renewed, 0 when the token no longer holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockLostError(RuntimeError):
    """The lock expired or was taken by another trainer while this one still worked."""


class JobLock:
    """A token-checked Redis lock with expiry.

    Args:
        redis: a `redis.Redis` client.
        key: the lock key (`Keys.trainer_lock()`).
        ttl_s: expiry; the holder renews it every `ttl_s / 3` seconds while held.
        owner: a readable label stored in the token (host, pid, job id), shown by `dlsr jobs`.
    """

    def __init__(self, redis: redis.Redis, key: str, ttl_s: float = 60.0, owner: str = "trainer") -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = f"{owner}:{uuid.uuid4().hex[:12]}"
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def acquire(self) -> bool:
        """Take the lock if free; False when another trainer holds it (never blocks)."""
        ok = bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))
        if ok:
            self.lost.clear()
            self._stop.clear()
            self._thread = threading.Thread(target=self._keepalive, name="dlsr-trainer-lock", daemon=True)
            self._thread.start()
        return ok

    def renew(self) -> bool:
        """Extend the expiry; False (and `lost` set) when this token no longer holds the lock."""
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if not ok:
            self.lost.set()
        return ok

    def release(self) -> bool:
        """Stop renewing and delete the lock if this token still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        return bool(self._release(keys=[self.key], args=[self.token]))

    def holder(self) -> str | None:
        """Token of whoever holds the lock now (None when free)."""
        value = self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def check(self) -> None:
        """Raise LockLostError if renewal failed (called between job steps, before publishing)."""
        if self.lost.is_set():
            raise LockLostError(
                f"trainer lock {self.key} was lost (expired after {self.ttl_ms / 1000:.0f} s without renewal?); "
                "this job stops without publishing"
            )

    def _keepalive(self) -> None:
        interval = self.ttl_ms / 3000.0
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    log.error("trainer lock %s lost: another trainer may run now", self.key)
                    return
            except Exception as exc:  # Redis hiccup: try again next interval; expiry protects others
                log.warning("trainer lock renewal failed (%s); retrying", exc)

    def __enter__(self) -> JobLock:
        if not self.acquire():
            raise LockLostError(f"trainer lock {self.key} is held by {self.holder()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
