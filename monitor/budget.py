"""A memory budget for decoded pixels in flight: decode threads reserve what an image will take before they
decode it and give it back once it is preprocessed, so a burst of huge images slows the monitor instead of
growing it. Pure (threading only)."""

from __future__ import annotations

import threading


class ByteBudget:
    """A counting semaphore measured in bytes.

    `reserve(n)` blocks until `n` bytes fit under `limit`; a request larger than the whole budget is granted
    alone (when nothing else is reserved), so no image waits forever.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"budget must be positive, got {limit}")
        self.limit = int(limit)
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    def reserve(self, n: int) -> int:
        """Block until `n` bytes (clipped to the limit) are available; returns what was reserved."""
        n = min(max(0, int(n)), self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + n <= self.limit)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.in_use = max(0, self.in_use - int(n))
            self._cond.notify_all()
