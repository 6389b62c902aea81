"""The batching policy of the monitor loop: how long to wait and how much to take per batch."""

from __future__ import annotations

import time
from collections.abc import Callable

from dlsr_monitor.common.streams import Message


def collect_batch(
    poll: Callable[[int, float], list[Message]],
    *,
    batch_max: int,
    wait_s: float,
    idle_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> list[Message]:
    """Fill one batch: up to `batch_max` messages, waiting at most `wait_s` after the first one arrived.

    With nothing to read it returns an empty list after `idle_s`, so the caller can check for shutdown.
    Memory is bounded by `batch_max` (the poll never asks for more than the room left).
    """
    batch: list[Message] = []
    deadline: float | None = None
    while len(batch) < batch_max:
        if deadline is None:
            timeout = idle_s
        else:
            timeout = deadline - clock()
            if timeout <= 0:
                break
        got = poll(batch_max - len(batch), max(0.0, timeout))
        if got:
            batch.extend(got)
            if deadline is None:
                deadline = clock() + wait_s
        elif deadline is None:
            break
    return batch
