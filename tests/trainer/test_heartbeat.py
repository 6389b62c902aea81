"""The trainer service's heartbeat, and what `dlsr trainer trigger` says with and without a live trainer."""

from __future__ import annotations

import os
import threading
import time

from dlsr_monitor.cli.main import main
from dlsr_monitor.cli.trainer_cmd import trigger_outcome
from dlsr_monitor.console.views import StateView
from dlsr_monitor.trainer.schedule import HEARTBEAT_TTL_S, TrainerService


def _service(ctx, owner: str = "trainer-a") -> TrainerService:
    return TrainerService(
        ctx=ctx, interval_s=3600.0, min_new_vetted=100, lock_ttl_s=5.0, progress=False, owner=owner,
        heartbeat_s=0.2, heartbeat_ttl_s=2,
    )  # fmt: skip


def test_serve_beats_while_it_runs_and_forgets_the_beat_when_it_stops(ctx):
    svc = _service(ctx)
    view = StateView(ctx.redis, ctx.keys)
    assert view.read_trainer_heartbeats() == []
    stop = threading.Event()
    thread = threading.Thread(target=svc.serve, args=(stop, 0.2))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not view.read_trainer_heartbeats() and time.monotonic() < deadline:
            time.sleep(0.1)
        (beat,) = view.read_trainer_heartbeats()
        assert beat["owner"] == "trainer-a" and beat["poll_s"] == 0.2 and time.time() - beat["ts"] < 5
        assert 0 < ctx.redis.ttl(ctx.keys.trainer_heartbeat("trainer-a")) <= 2
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert view.read_trainer_heartbeats() == []  # a clean stop: nobody is told a trainer is alive


def test_a_trainer_that_died_expires_and_leaves_the_index(ctx):
    svc = _service(ctx, owner="trainer-dead")
    svc.beat(1.0)
    view = StateView(ctx.redis, ctx.keys)
    assert [b["owner"] for b in view.read_trainer_heartbeats()] == ["trainer-dead"]
    ctx.redis.delete(ctx.keys.trainer_heartbeat("trainer-dead"))  # what the TTL does when it stops beating
    assert view.read_trainer_heartbeats() == []
    assert ctx.redis.zcard(ctx.keys.trainer_heartbeats()) == 0


def test_trigger_outcome_lines():
    none = trigger_outcome([], None, 30)
    assert none == (
        "job requested, but no trainer is alive (no heartbeat in the last 30 s): the request waits in Redis until "
        "`dlsr trainer run` starts"
    )
    assert "a job holds the lock now: fit-1" in trigger_outcome([], "fit-1", 30)
    alive = [{"owner": "t1", "ts": time.time(), "poll_s": 1.0}]
    assert (
        trigger_outcome(alive, None, 30)
        == "job requested: trainer t1 is alive and starts it within 1 s (see `dlsr jobs`)"
    )
    assert "a job is running now (t1:abc)" in trigger_outcome(alive, "t1:abc", 30)


def test_cli_trigger_says_whether_a_trainer_is_alive(ctx, redis_url, monkeypatch, tmp_path, capsys):
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLSR_REDIS__URL", redis_url)
    monkeypatch.setenv("DLSR_REDIS__PREFIX", ctx.keys.prefix)
    assert main(["trainer", "trigger"]) == 0
    out = capsys.readouterr().out
    assert f"no trainer is alive (no heartbeat in the last {HEARTBEAT_TTL_S} s)" in out
    assert "waits in Redis until `dlsr trainer run` starts" in out
    assert ctx.redis.exists(ctx.keys.trainer_trigger())  # the request is left for a trainer that starts later
    _service(ctx).beat(1.0)
    assert main(["trainer", "trigger"]) == 0
    assert capsys.readouterr().out.startswith(
        "job requested: trainer trainer-a is alive and starts it within 1 s"
    )
