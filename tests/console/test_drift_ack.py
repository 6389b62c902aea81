"""Raised drift on the dashboard: `dlsr alerts ack`, the drift panel that OOD alerts cannot scroll away (tmux),
acknowledgements that lapse with the raise they were for, and the window layout the monitor records."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from dlsr_monitor.cli.main import main
from dlsr_monitor.common.contract import OodAlert
from dlsr_monitor.console.ack import AckError, acknowledge
from dlsr_monitor.console.dashboard import read_snapshot, run_dashboard
from dlsr_monitor.console.views import StateView
from dlsr_monitor.monitor.drift import DriftTest
from dlsr_monitor.monitor.state import MonitorState, WindowRecord

DLSR = Path(sys.executable).with_name("dlsr")


class Stream:
    """Writes windows and alerts the way the monitor does (apply_batch, then evaluate_drift)."""

    def __init__(self, redis_client, keys, *, bucket_s: int = 60) -> None:
        self.state = MonitorState(redis_client, keys, bucket_s=bucket_s, window_buckets=10)
        self.offset = 0

    def send(self, source: str, start: float, n: int, *, ood_every: int, alerts: bool = False) -> None:
        records, pushed = [], []
        for i in range(n):
            ts = start + i
            is_ood = ood_every > 0 and i % ood_every == 0
            records.append(
                WindowRecord(self.offset, source, ts, True, is_ood=is_ood, score=0.9 if is_ood else 0.1)
            )
            if alerts and is_ood:
                alert = OodAlert(
                    alert_id=f"ood:{self.offset}",
                    source=source,
                    image_id=f"img-{self.offset}",
                    topic="images",
                    partition=0,
                    offset=self.offset,
                    ts=ts,
                    score=0.9,
                    threshold=0.4321,
                    p_value=0.002,
                    model_version="v-demo-1",
                )
                pushed.append((self.offset, alert.model_dump_json()))
            self.offset += 1
        self.state.apply_batch("g", "images", 0, records, pushed)

    def evaluate(self, *sources: str) -> list:
        return self.state.evaluate_drift(sources, DriftTest(alpha=0.01), model_version="v-demo-1")


def _raised(redis_client, keys, now: float) -> Stream:
    redis_client.set(keys.model_current(), "v-demo-1")
    redis_client.hset(keys.model_entry("v-demo-1"), mapping={"threshold": "0.4321", "alpha": "0.01"})
    stream = Stream(redis_client, keys)
    stream.send("cam-ok", now - 300, 300, ood_every=100)
    stream.send("cam-bad", now - 300, 300, ood_every=2, alerts=True)
    (alert,) = stream.evaluate("cam-ok", "cam-bad")
    assert alert.source == "cam-bad" and alert.state == "raised" and alert.seq == 1
    stream.state.heartbeat("monitor-a", model_version="v-demo-1", rate=12.5, lag=3)
    return stream


def test_ack_records_who_and_which_raise(redis_client, keys):
    now = time.time()
    _raised(redis_client, keys, now)
    res = acknowledge(redis_client, keys, "cam-bad", by="ana", note="camera 7 lens cleaned", now=now)
    assert res.seq == 1 and res.since is not None and res.replaced is None
    (drift,) = StateView(redis_client, keys).read_raised_drifts()
    assert drift.source == "cam-bad" and drift.seq == 1 and drift.since == res.since
    assert drift.ack is not None and drift.ack.by == "ana" and drift.ack.note == "camera 7 lens cleaned"
    again = acknowledge(redis_client, keys, "cam-bad", by="bo", now=now + 5)
    assert again.replaced is not None and again.replaced.by == "ana"
    assert StateView(redis_client, keys).read_raised_drifts()[0].ack.by == "bo"


def test_nothing_to_ack_is_one_line(redis_client, keys):
    _raised(redis_client, keys, time.time())
    with pytest.raises(AckError, match="cam-ok has no raised drift \\(drift state: ok\\)"):
        acknowledge(redis_client, keys, "cam-ok", by="ana")
    with pytest.raises(AckError, match="no source 'cam-nope' under Redis prefix .*sources seen: .*cam-bad"):
        acknowledge(redis_client, keys, "cam-nope", by="ana")
    assert redis_client.exists(keys.drift_ack("cam-ok"), keys.drift_ack("cam-nope")) == 0


def test_an_ack_does_not_carry_over_to_a_later_raise(redis_client, keys):
    now = time.time()
    stream = _raised(redis_client, keys, now)
    acknowledge(redis_client, keys, "cam-bad", by="ana", now=now)
    # The camera recovers: a clean window (event time moves past the bad one) clears the drift ...
    stream.send("cam-bad", now + 700, 300, ood_every=0)
    (cleared,) = stream.evaluate("cam-bad")
    assert cleared.state == "cleared" and cleared.seq == 2
    view = StateView(redis_client, keys)
    assert view.read_raised_drifts() == []  # the panel lists only raised sources
    # ... and it breaks again: a new raise, seq 3, that nobody has acknowledged yet.
    stream.send("cam-bad", now + 1400, 300, ood_every=2)
    (raised,) = stream.evaluate("cam-bad")
    assert raised.state == "raised" and raised.seq == 3
    (drift,) = view.read_raised_drifts()
    assert drift.seq == 3 and drift.ack is None
    assert view.read_drift_ack("cam-bad").seq == 1  # the old ack is still stored, just not shown


def test_cli_ack(redis_url, redis_client, keys, monkeypatch, tmp_path, capsys):
    _raised(redis_client, keys, time.time())
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLSR_REDIS__URL", redis_url)
    monkeypatch.setenv("DLSR_REDIS__PREFIX", keys.prefix)
    assert main(["alerts", "ack", "cam-bad", "--note", "on it", "--by", "ana"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("acknowledged drift #1 on cam-bad, raised since ") and out.rstrip().endswith(
        "by ana: on it"
    )
    assert main(["alerts", "ack", "cam-ok"]) == 1
    err = capsys.readouterr().err
    assert err == "dlsr: error: cam-ok has no raised drift (drift state: ok); nothing to acknowledge\n"


def test_once_frame_has_the_drift_panel_the_prefix_and_the_bucket_width(redis_client, keys, test_settings):
    now = time.time()
    _raised(redis_client, keys, now)
    acknowledge(redis_client, keys, "cam-bad", by="ana", note="lens cleaned", now=now)
    console = Console(record=True, width=140, force_terminal=False)
    assert run_dashboard(test_settings, once=True, console=console, redis_client=redis_client) == 0
    text = console.export_text()
    panel = text[text.index("Raised drift") : text.index("Sources")]
    for expected in ("all acknowledged", "cam-bad", "raised since", "ack ana", "lens cleaned", "150/300 OOD"):
        assert expected in panel, f"{expected!r} not in the drift panel:\n{panel}"
    assert "cam-ok" not in panel
    assert f"prefix {keys.prefix}" in text and "buckets 60s (local setting)" in text


def test_unacknowledged_drift_says_how_to_ack():
    from dlsr_monitor.console.dashboard import Snapshot, render
    from dlsr_monitor.console.views import RaisedDrift

    drift = RaisedDrift("cam-9", seq=3, since=time.time() - 125, images=90, ood=40, rate=0.44, null_rate=0.02,
                        p_value=1e-9)  # fmt: skip
    snap = Snapshot(time.time(), "redis://x", "v1", 1.0, 0.01, drifts=(drift,), prefix="dlsr")
    console = Console(record=True, width=150)
    console.print(render(snap, 150))
    text = console.export_text()
    assert "Raised drift: 1, 1 not acknowledged" in text
    assert (
        "raised since" in text and "(2m ago)" in text and "not acknowledged (dlsr alerts ack cam-9)" in text
    )


def test_recorded_bucket_width_is_what_readers_use(redis_client, keys):
    # The demo's monitor writes 5-second buckets; a dashboard in a second terminal has the default 60.
    now = time.time()
    stream = Stream(redis_client, keys, bucket_s=5)
    assert stream.state.record_layout("demo-monitor") is None
    stream.send("cam-id", now - 120, 120, ood_every=10)
    local = StateView(redis_client, keys, bucket_s=60)
    assert local.bucket_s == 5 and local.bucket_recorded
    assert local.window_totals("cam-id", since=now - 200, until=now)["images"] == 120
    snap = read_snapshot(local, now=now)
    (src,) = snap.sources
    assert (
        src.total_images == 120 and src.total_ood == 12 and src.rate_img_s > 0.5
    )  # not the zeros of the demo
    assert snap.bucket_s == 5 and snap.bucket_recorded
    # No record: the local setting.
    redis_client.delete(keys.window_layout())
    fresh = StateView(redis_client, keys, bucket_s=60)
    assert fresh.bucket_s == 60 and not fresh.bucket_recorded
    # A second monitor with other windows is told (run_monitor logs it).
    other = MonitorState(redis_client, keys, bucket_s=60, window_buckets=10)
    assert other.record_layout("m1") is None
    assert MonitorState(redis_client, keys, bucket_s=5, window_buckets=10).record_layout("m2") == {
        "bucket_s": 60,
        "window_buckets": 10,
    }


@pytest.mark.integration
def test_the_monitor_records_its_window_layout_at_start(test_settings, redis_client, keys):
    import threading

    from dlsr_monitor.monitor.service import run_monitor

    mon = test_settings.monitor.model_copy(
        update={"bucket_s": 7, "window_buckets": 4, "instance_id": "m-layout"}
    )
    settings = test_settings.model_copy(update={"monitor": mon})
    stop = threading.Event()
    thread = threading.Thread(target=run_monitor, args=(settings, stop), kwargs={"handle_signals": False})
    thread.start()
    try:  # written before the monitor waits for its first model
        assert _wait_for(lambda: redis_client.hget(keys.window_layout(), "bucket_s") == b"7", timeout=60)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    layout = StateView(redis_client, keys, bucket_s=60).read_layout()
    assert layout == {"bucket_s": 7, "window_buckets": 4}
    assert redis_client.hget(keys.window_layout(), "instance") == b"m-layout"


# ---- the live view in tmux -------------------------------------------------------------------------
SOCKET = f"dlsr-test-{uuid.uuid4().hex[:8]}"


def _tmux(*args: str, **kw) -> str:
    cmd = ["tmux", "-L", SOCKET, "-f", "/dev/null", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw).stdout


def _screen(session: str) -> str:
    try:
        return _tmux("capture-pane", "-p", "-t", session)
    except subprocess.CalledProcessError:
        return ""


def _wait_for(predicate, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def _panel(screen: str) -> str:
    start = screen.find("Raised drift")
    return screen[start : screen.find("Sources", start)] if start >= 0 else ""


@pytest.mark.integration
def test_raised_drift_stays_on_screen_while_1000_ood_alerts_arrive(
    redis_client, keys, redis_url, prefix, tmp_path
):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: `make install` installs it (apt-get install -y tmux)", pytrace=False)
    now = time.time()
    stream = _raised(redis_client, keys, now)
    acknowledge(redis_client, keys, "cam-bad", by="ana", note="lens cleaned", now=now)
    session = f"dlsr-drift-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    env.update(
        DLSR_REDIS__URL=redis_url, DLSR_REDIS__PREFIX=prefix, DLSR_DASHBOARD__REFRESH_S="0.5", TERM="xterm"
    )
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith("DLSR_"))
    cmd = f"cd {tmp_path} && env {assigns} {DLSR} dashboard; echo EXITED $? > {tmp_path / 'rc'}"
    _tmux("new-session", "-d", "-s", session, "-x", "130", "-y", "40", cmd, env=env)
    try:
        assert _wait_for(lambda: "monitor-a" in _screen(session)), _screen(session)
        screen = _screen(session)
        assert "drift raised" in screen  # the drift alert is the newest in "Last alerts" for now
        for expected in ("cam-bad", "raised since", "ack ana", "lens cleaned"):
            assert expected in _panel(screen), f"{expected!r} not in the drift panel:\n{screen}"
        assert f"prefix {prefix}" in screen

        # 1,000 OOD alerts, written as the monitor writes them (apply_batch: windows and the recent-alerts list).
        for batch in range(10):
            stream.send("cam-bad", now + batch * 100, 200, ood_every=2, alerts=True)
        newest = f"img-{stream.offset - 2}"
        assert redis_client.llen(keys.recent_alerts()) >= 500  # the list is full of OOD alerts now

        assert _wait_for(lambda: newest in _screen(session)), _screen(session)
        screen = _screen(session)
        assert "drift raised" not in screen, screen  # the drift alert scrolled out of "Last alerts" ...
        panel = _panel(screen)
        for expected in ("cam-bad", "raised since", "ack ana", "lens cleaned"):  # ... the panel did not
            assert expected in panel, f"{expected!r} not in the drift panel after 1,000 OOD alerts:\n{screen}"
        _tmux("send-keys", "-t", session, "q")
        assert _wait_for(lambda: (tmp_path / "rc").exists(), timeout=15), _screen(session)
        assert (tmp_path / "rc").read_text().split() == ["EXITED", "0"]
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _tmux("kill-server")
