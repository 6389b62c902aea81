"""The dashboard: frame contents from a seeded Redis, and the live view driven in tmux (resize, q, Ctrl-C)."""

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

from dlsr_monitor.common.contract import ModelAlert, OodAlert
from dlsr_monitor.console.dashboard import (
    Snapshot,
    alert_line,
    bin_buckets,
    read_snapshot,
    render,
    run_dashboard,
    severity_of,
    sparkline,
)
from dlsr_monitor.console.views import StateView, WindowBucket
from dlsr_monitor.monitor.drift import DriftTest
from dlsr_monitor.monitor.state import MonitorState, WindowRecord

DLSR = Path(sys.executable).with_name("dlsr")


def test_sparkline_scales_and_leaves_gaps():
    assert sparkline((0.0, 0.5, 1.0, None)) == "▁▅█ "
    assert sparkline((0.0, 0.0)) == "▁▁"
    assert sparkline((None, None)) == "  "
    assert sparkline((0.1,), top=0.2) == "▅"


def test_downsample_keeps_the_newest_bin_last():
    from dlsr_monitor.console.dashboard import downsample

    assert downsample((0.0, 0.2, None, None, 0.4, 0.6), 3) == (0.1, None, 0.5)
    assert downsample((0.1, 0.2), 5) == (0.1, 0.2)


def test_bin_buckets_puts_old_on_the_left():
    now = 3600.0
    buckets = [WindowBucket(60.0, 10, 0, 0.0, 0), WindowBucket(3540.0, 10, 5, 0.0, 0)]
    bins = bin_buckets(buckets, now=now, span_s=3600, bins=6)
    assert bins == (0.0, None, None, None, None, 0.5)


def test_severity_and_alert_lines():
    ood = OodAlert(
        alert_id="ood:x", source="cam", image_id="x", topic="t", partition=0, offset=1, ts=0.0, score=2.5,
        threshold=1.0, p_value=0.001, model_version="v1",
    ).model_dump()
    failed = ModelAlert(alert_id="m", event="load_failed", version="v2", reason="sha256 mismatch", ts=0.0)
    assert severity_of(ood) == "warning"
    assert severity_of(failed.model_dump()) == "critical"
    assert severity_of({"kind": "drift", "state": "raised"}) == "critical"
    assert severity_of({"kind": "drift", "state": "cleared"}) == "info"
    line = alert_line(ood)
    assert "cam" in line and "score 2.5 > 1" in line and "\n" not in line
    assert "sha256 mismatch" in alert_line(failed.model_dump())


def seed(redis_client, keys, now: float | None = None) -> StateView:
    """A model, two sources (one drifting), a live monitor and some alerts, written the way the monitor does."""
    now = time.time() if now is None else now
    state = MonitorState(redis_client, keys, bucket_s=60, window_buckets=10)
    redis_client.set(keys.model_current(), "v-demo-1")
    redis_client.hset(keys.model_entry("v-demo-1"), mapping={"threshold": "0.4321", "alpha": "0.01"})
    records, alerts = [], []
    offset = 0
    for i in range(300):  # 5 minutes of traffic, one image a second per source
        ts = now - 300 + i
        records.append(WindowRecord(offset, "cam-ok", ts, True, is_ood=(i % 100 == 0), score=0.1))
        offset += 1
        is_ood = i % 2 == 0
        records.append(WindowRecord(offset, "cam-bad", ts, True, is_ood=is_ood, score=0.9))
        if is_ood and i > 290:
            alert = OodAlert(
                alert_id=f"ood:{offset}", source="cam-bad", image_id=f"img-{offset}", topic="images",
                partition=0, offset=offset, ts=ts, score=0.9, threshold=0.4321, p_value=0.002,
                model_version="v-demo-1",
            )
            alerts.append((offset, alert.model_dump_json()))
        offset += 1
    state.apply_batch("g", "images", 0, records, alerts)
    state.evaluate_drift(["cam-ok", "cam-bad"], DriftTest(alpha=0.01), model_version="v-demo-1")
    state.heartbeat("monitor-a", model_version="v-demo-1", rate=12.5, lag=3)
    return StateView(redis_client, keys, bucket_s=state.bucket_s)


def test_snapshot_reads_what_the_monitor_wrote(redis_client, keys):
    state = seed(redis_client, keys)
    snap = read_snapshot(state, alerts_shown=5)
    assert snap.model_version == "v-demo-1"
    assert snap.threshold == pytest.approx(0.4321) and snap.alpha == pytest.approx(0.01)
    by = {s.source: s for s in snap.sources}
    assert by["cam-bad"].drift == "raised" and by["cam-ok"].drift == "ok"
    assert by["cam-bad"].ood_rate == pytest.approx(0.5, abs=0.05)
    assert by["cam-ok"].total_images == 300
    assert 0.5 < by["cam-ok"].rate_img_s < 1.5
    assert [m.instance for m in snap.monitors] == ["monitor-a"] and snap.monitors[0].lag == 3
    assert snap.alerts and snap.alerts[0]["kind"] in ("drift", "ood")


def test_once_prints_one_frame(redis_client, keys, test_settings):
    seed(redis_client, keys)
    console = Console(record=True, width=120, force_terminal=False)
    assert run_dashboard(test_settings, once=True, console=console, redis_client=redis_client) == 0
    text = console.export_text()
    for expected in ("v-demo-1", "0.4321", "cam-bad", "RAISED", "cam-ok", "monitor-a", "12.5", "Last alerts"):
        assert expected in text, expected


def test_narrow_and_wide_frames_keep_every_row_on_one_line():
    snap = Snapshot(
        taken_at=time.time(), redis_url="redis://x", model_version="v1", threshold=1.0, alpha=0.01,
    )
    for width in (60, 200):
        console = Console(record=True, width=width)
        console.print(render(snap, width))
        lines = console.export_text().splitlines()
        assert all(len(line) <= width for line in lines)


# A private tmux server (own socket, no user config), so the test neither sees nor disturbs anyone's sessions.
SOCKET = f"dlsr-test-{uuid.uuid4().hex[:8]}"


def _tmux(*args: str, **kw) -> str:
    cmd = ["tmux", "-L", SOCKET, "-f", "/dev/null", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw).stdout


def _wait_for(predicate, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def _screen(session: str) -> str:
    try:
        return _tmux("capture-pane", "-p", "-t", session)
    except subprocess.CalledProcessError:
        return ""


@pytest.mark.integration
@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_live_dashboard_in_tmux(redis_client, keys, redis_url, prefix, quit_key, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing: `make install` installs it (apt-get install -y tmux)", pytrace=False)
    seed(redis_client, keys)
    session = f"dlsr-dash-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    env.update(DLSR_REDIS__URL=redis_url, DLSR_REDIS__PREFIX=prefix, DLSR_DASHBOARD__REFRESH_S="0.5", TERM="xterm")
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith("DLSR_"))
    cmd = f"cd {tmp_path} && env {assigns} {DLSR} dashboard; echo EXITED $? > {tmp_path / 'rc'}"
    _tmux("new-session", "-d", "-s", session, "-x", "130", "-y", "40", cmd, env=env)
    try:
        assert _wait_for(lambda: "monitor-a" in _screen(session)), _screen(session)
        screen = _screen(session)
        for expected in ("DLSR Monitor", "v-demo-1", "cam-bad", "RAISED", "cam-ok", "Last alerts", "q or Ctrl-C"):
            assert expected in screen, f"{expected!r} not on screen:\n{screen}"
        # Narrow the window: the next frame is laid out for 70 columns, nothing wraps past the edge.
        _tmux("resize-window", "-t", session, "-x", "70", "-y", "30")
        assert _wait_for(lambda: max(map(len, _screen(session).splitlines() or [""])) <= 70)
        assert _wait_for(lambda: "cam-bad" in _screen(session) and "RAISED" in _screen(session)), _screen(session)
        _tmux("send-keys", "-t", session, quit_key)
        assert _wait_for(lambda: (tmp_path / "rc").exists(), timeout=15), _screen(session)
        assert (tmp_path / "rc").read_text().split() in (["EXITED", "0"], ["EXITED", "130"])
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _tmux("kill-server")
