"""ModelWatcher against the real local Redis: start-up, swap on publish, refusal of a corrupted artifact."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dlsr_monitor.common.hotswap import LOAD_FAILED, LOADED, ModelEvent, ModelWatcher
from dlsr_monitor.common.registry import Registry
from dlsr_monitor.common.testing import make_artifact


def fake_load(path: Path) -> bytes:
    """Stands in for load_detector: the 'detector' is the weights' bytes."""
    return (path / "weights.safetensors").read_bytes()


class Events:
    def __init__(self) -> None:
        self.items: list[ModelEvent] = []
        self.lock = threading.Lock()

    def __call__(self, ev: ModelEvent) -> None:
        with self.lock:
            self.items.append(ev)

    def kinds(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(e.kind, e.version) for e in self.items]


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture
def setup(rkeys, tmp_path):
    client, keys = rkeys
    store = tmp_path / "store"
    return Registry(client, keys, store), client, keys, store, tmp_path


def test_not_ready_before_first_publish_then_loads(setup):
    reg, client, keys, store, tmp = setup
    events = Events()
    w = ModelWatcher(client, keys, store, fake_load, events, poll_s=0.02).start()
    try:
        assert not w.wait_ready(0.1)
        assert w.current() is None and "no model published" in (w.last_error or "")
        reg.publish(make_artifact(tmp, "a", b"one"), threshold=2.5, alpha=0.05)
        assert w.wait_ready(5)
        h = w.current()
        assert (h.version, h.detector, h.threshold, h.alpha) == ("v1", b"one", 2.5, 0.05)
        assert events.kinds() == [(LOADED, "v1")]
    finally:
        w.stop()


def test_swaps_on_publish_and_follows_rollback(setup):
    reg, client, keys, store, tmp = setup
    reg.publish(make_artifact(tmp, "a", b"one"), threshold=1, alpha=0.01)
    events = Events()
    with ModelWatcher(client, keys, store, fake_load, events, poll_s=0.02) as w:
        assert w.wait_ready(5)
        first = w.current()
        reg.publish(make_artifact(tmp, "b", b"two"), threshold=2, alpha=0.01, expected="v1")
        assert wait_for(lambda: w.current().version == "v2")
        assert w.current().detector == b"two"
        assert first.version == "v1" and first.detector == b"one"  # handles are immutable
        reg.rollback()
        assert wait_for(lambda: w.current().version == "v1")
    assert events.kinds() == [(LOADED, "v1"), (LOADED, "v2"), (LOADED, "v1")]


def test_flipped_byte_keeps_old_model_and_reports_once(setup, caplog):
    reg, client, keys, store, tmp = setup
    reg.publish(make_artifact(tmp, "a", b"one"), threshold=1, alpha=0.01)
    events = Events()
    w = ModelWatcher(client, keys, store, fake_load, events, poll_s=0.02, retry_s=0.05)
    assert w.poll_once() and w.current().version == "v1"
    e2 = reg.register(make_artifact(tmp, "b", b"two"), threshold=2, alpha=0.01)
    wfile = reg.artifact_path(e2) / "weights.safetensors"
    wfile.write_bytes(b"twX")  # flip: same length, different byte
    reg.promote(e2.version)
    with caplog.at_level("ERROR", logger="dlsr_monitor.common.hotswap"):
        w.start()
        assert wait_for(lambda: any(k == LOAD_FAILED for k, _ in events.kinds()))
        time.sleep(0.3)  # several retries happen; still one event and one log line
        w.stop()
    assert w.current().version == "v1" and w.current().detector == b"one"
    assert events.kinds() == [(LOADED, "v1"), (LOAD_FAILED, "v2")]
    ev = events.items[-1]
    assert ev.active_version == "v1" and "checksum" in ev.message and "keeping v1" in ev.message
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    # repaired artifact is picked up on a later retry
    wfile.write_bytes(b"two")
    assert wait_for(lambda: w.poll_once() or w.current().version == "v2", timeout=3)
    assert w.current().detector == b"two"


def test_load_fn_error_is_refused(setup):
    reg, client, keys, store, tmp = setup
    reg.publish(make_artifact(tmp, "a", b"one"), threshold=1, alpha=0.01)
    events = Events()

    def picky(path: Path) -> bytes:
        data = fake_load(path)
        if data == b"bad":
            raise ValueError("artifact checksum mismatch in weights.bin")
        return data

    w = ModelWatcher(client, keys, store, picky, events, poll_s=0.02)
    assert w.poll_once()
    reg.publish(make_artifact(tmp, "b", b"bad"), threshold=1, alpha=0.01)
    assert not w.poll_once()
    assert w.current().version == "v1"
    assert events.items[-1].kind == LOAD_FAILED and "ValueError" in events.items[-1].message


def test_callback_error_does_not_stop_the_watcher(setup):
    reg, client, keys, store, tmp = setup
    reg.publish(make_artifact(tmp, "a", b"one"), threshold=1, alpha=0.01)

    def boom(ev: ModelEvent) -> None:
        raise RuntimeError("callback broke")

    with ModelWatcher(client, keys, store, fake_load, boom, poll_s=0.02) as w:
        assert w.wait_ready(5)
        reg.publish(make_artifact(tmp, "b", b"two"), threshold=1, alpha=0.01)
        assert wait_for(lambda: w.current().version == "v2")


def test_an_impossible_registry_entry_is_refused_and_the_old_model_keeps_serving(setup):
    reg, client, keys, store, tmp = setup
    reg.publish(make_artifact(tmp, "a", b"one"), threshold=1, alpha=0.01)
    events = Events()
    w = ModelWatcher(client, keys, store, fake_load, events, poll_s=0.02)
    assert w.poll_once() and w.current().version == "v1"
    reg.publish(make_artifact(tmp, "b", b"two"), threshold=2, alpha=0.01)
    client.hset(keys.model_entry("v2"), "alpha", "1.5")  # what a hand-edited entry can hold
    assert not w.poll_once()
    assert w.current().version == "v1"
    assert events.kinds() == [(LOADED, "v1"), (LOAD_FAILED, "v2")]
    assert "alpha 1.5 is not in (0, 1)" in events.items[-1].message
