"""`dlsr alerts ack SOURCE`: record who acknowledged a source's raised drift, and when.

The one thing it writes is its own key, `Keys.drift_ack(source)`: the drift `seq` it acknowledges (the number of
the transition that raised it), `by`, `note` and `at`. The dashboard shows the acknowledgement only while that
`seq` is still the source's current raised drift: a drift that clears and is raised again has a new `seq`, so an
acknowledgement never carries over to a later raise. The drift hash itself (the monitor's) is never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlsr_monitor.common.redisdata import as_float, as_int, as_str
from dlsr_monitor.console.views import DriftAck, StateView

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.common.keys import Keys


class AckError(ValueError):
    """Nothing to acknowledge (unknown source, or its drift is not raised); the message is one line."""


@dataclass(frozen=True)
class AckResult:
    """What `acknowledge` recorded, and the acknowledgement of the same raise it replaced (if any)."""

    source: str
    seq: int
    since: float | None
    ack: DriftAck
    replaced: DriftAck | None = None


def acknowledge(
    redis: redis.Redis, keys: Keys, source: str, *, by: str, note: str = "", now: float | None = None
) -> AckResult:
    """Acknowledge `source`'s raised drift as `by` (with an optional `note`).

    Atomic against the monitor: the drift hash is WATCHed, so a clear (or a new raise) between the read and the
    write makes it re-read instead of acknowledging a transition that is gone.

    Raises:
        AckError: the source is unknown or its drift state is not raised.
    """
    from redis.exceptions import WatchError

    drift_key, ack_key = keys.drift(source), keys.drift_ack(source)
    at = time.time() if now is None else now
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(drift_key, ack_key)
                state, seq, since = (as_str(v) for v in pipe.hmget(drift_key, "state", "seq", "since"))
                if state != "raised":
                    known = pipe.zscore(keys.sources(), source) is not None
                    pipe.unwatch()
                    raise AckError(_nothing_to_ack(redis, keys, source, state, known))
                before = StateView(redis, keys).read_drift_ack(source)
                ack = DriftAck(seq=as_int(seq), by=by, note=note, at=at)
                pipe.multi()
                pipe.delete(ack_key)
                pipe.hset(ack_key, mapping={"seq": ack.seq, "by": by, "note": note, "at": f"{at:.3f}"})
                pipe.execute()
                replaced = before if before is not None and before.seq == ack.seq else None
                return AckResult(source, ack.seq, as_float(since) if since else None, ack, replaced)
            except WatchError:  # the monitor moved the drift state meanwhile: decide again on fresh data
                continue


def _nothing_to_ack(redis: redis.Redis, keys: Keys, source: str, state: str | None, known: bool) -> str:
    if known or state:
        return f"{source} has no raised drift (drift state: {state or 'ok'}); nothing to acknowledge"
    names = [as_str(n) for n in redis.zrevrange(keys.sources(), 0, 4)]
    seen = f"sources seen: {', '.join(n for n in names if n)}" if names else "no source seen yet"
    return f"no source {source!r} under Redis prefix {keys.prefix} ({seen}); check the name and DLSR_REDIS__PREFIX"
