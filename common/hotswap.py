"""Hot model swap: watch the registry pointer, load and verify new versions off the hot path, swap atomically.

The monitor loop calls `current()` once per batch; the reference it gets is immutable, so a swap lands between
batches and every record of a batch names the version that scored it. A version that fails to load or verify
leaves the old model in place, logs one line and reports a "load_failed" event (the monitor raises a `model`
alert from it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlsr_monitor.common.keys import Keys
from dlsr_monitor.common.model_checks import ModelRefusedError, entry_problems
from dlsr_monitor.common.registry import ModelEntry, Registry, RegistryError, VersionNotFoundError

if TYPE_CHECKING:
    import redis

    from dlsr.base import BaseDetector

log = logging.getLogger(__name__)

LOADED = "loaded"
LOAD_FAILED = "load_failed"


@dataclass(frozen=True)
class ModelHandle:
    """One loaded, verified model version (immutable: swaps replace the handle, never mutate it)."""

    version: str
    detector: BaseDetector
    threshold: float
    alpha: float
    entry: ModelEntry


@dataclass(frozen=True)
class ModelEvent:
    """What the watcher tells the service: a version loaded, or a version refused (with why)."""

    kind: str  # LOADED or LOAD_FAILED
    version: str
    message: str
    active_version: str | None  # the version serving after this event
    load_s: float = 0.0
    at: float = field(default_factory=time.time)


class ModelWatcher:
    """Polls the current-version pointer and keeps the matching model loaded.

    Args:
        redis: a `redis.Redis` client.
        keys: the deployment's key layout.
        store_root: the artifact store directory.
        load_fn: `load_fn(path) -> detector`, e.g. `functools.partial(load_detector, encoder=enc)`; it must raise
            on a checksum mismatch (dlsr's loader raises ArtifactError).
        on_event: called with a `ModelEvent` after each load or refusal (from the watcher thread).
        poll_s: seconds between pointer reads (one cheap GET each).
        retry_s: first wait before retrying a version that failed to load (doubles, capped at 300 s); the event is
            reported once per version, not on every retry.
    """

    def __init__(
        self,
        redis: redis.Redis,
        keys: Keys,
        store_root: str | Path,
        load_fn: Callable[[Path], Any],
        on_event: Callable[[ModelEvent], None] | None = None,
        poll_s: float = 1.0,
        retry_s: float = 5.0,
    ) -> None:
        self.registry = Registry(redis, keys, store_root)
        self.keys = keys
        self.load_fn = load_fn
        self.on_event = on_event
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._handle: ModelHandle | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()  # one load at a time (poll_once may also be called directly)
        self._thread: threading.Thread | None = None
        self._failed: dict[str, tuple[float, float]] = {}  # version -> (next retry time, current backoff)
        self.last_error: str | None = None

    # ---- the hot path -----------------------------------------------------------------------------
    def current(self) -> ModelHandle | None:
        """The model to score the next batch with (None until the first version is loaded)."""
        return self._handle

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> ModelWatcher:
        """Start the background poller (does one poll at once in that thread)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dlsr-model-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the poller; the current handle stays usable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a model is loaded; False on timeout (see `last_error` for why)."""
        return self._ready.wait(timeout)

    def __enter__(self) -> ModelWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # Redis hiccup: keep serving the old model, try again next poll
                msg = f"model watcher: cannot read the registry ({type(exc).__name__}: {exc}); retrying"
                if msg != self.last_error:
                    log.warning(msg)
                self.last_error = msg
            self._stop.wait(self.poll_s)

    # ---- one poll ---------------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """Read the pointer; load, verify and swap if it moved. True when a new version was swapped in."""
        with self._poll_lock:
            version = self.registry.current_version()
            active = self._handle.version if self._handle else None
            if version is None:
                self.last_error = "no model published yet: run 'dlsr trainer fit --data PATH'"
                return False
            if version == active:
                return False
            failed = self._failed.get(version)
            if failed is not None and time.monotonic() < failed[0]:
                return False
            t0 = time.perf_counter()
            try:
                entry = self.registry.entry(version)
                problems = entry_problems(entry)
                if problems:  # e.g. alpha 1.5: never serve it, keep the model we have
                    raise ModelRefusedError(f"registry entry {version}", problems)
                path = self.registry.verify(entry)
                detector = self.load_fn(path)
            except Exception as exc:
                self._refuse(version, active, exc, time.perf_counter() - t0)
                return False
            load_s = time.perf_counter() - t0
            self._handle = ModelHandle(
                version=version, detector=detector, threshold=entry.threshold, alpha=entry.alpha, entry=entry
            )
            self._failed.pop(version, None)
            self.last_error = None
            self._ready.set()
            log.info("model %s loaded in %.2f s (was %s)", version, load_s, active or "none")
            self._emit(
                ModelEvent(
                    LOADED, version, f"model {version} loaded (was {active or 'none'})", version, load_s
                )
            )
            return True

    def _refuse(self, version: str, active: str | None, exc: Exception, load_s: float) -> None:
        previous = self._failed.get(version)
        backoff = min(previous[1] * 2, 300.0) if previous else self.retry_s
        self._failed[version] = (time.monotonic() + backoff, backoff)
        reason = (
            str(exc)
            if isinstance(exc, (RegistryError, VersionNotFoundError, ModelRefusedError))
            else f"{type(exc).__name__}: {exc}"
        )
        keep = f"keeping {active}" if active else "no model is serving"
        msg = f"model {version} refused, {keep}: {reason}"
        self.last_error = msg
        if previous is None:  # one line and one event per bad version, not one per retry
            log.error(msg)
            self._emit(ModelEvent(LOAD_FAILED, version, msg, active, load_s))

    def _emit(self, event: ModelEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # the callback must never kill the watcher
            log.exception("model watcher: on_event callback failed for %s", event)
