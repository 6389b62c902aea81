"""Infrastructure outages mid-stream: the broker frozen (SIGSTOP), a private Redis stopped and restarted (AOF,
state survives) or frozen longer than the socket timeout. The monitor waits each out, stays alive, finishes the
stream; nothing lost, Redis exact."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.faults.harness import heartbeats, image_msgs, pick, wait_next, wait_progress
from tests.faults.runner import RESULT_TIMEOUT_S, Scenario, scenario_body
from tests.integration.conftest import load_images

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(RESULT_TIMEOUT_S + 60)]


def _stream(data_dir, n: int, seed: int):
    images = load_images(data_dir, "cifar10", "test", n, seed=seed)
    return image_msgs(images, ["camA", "camB", "camC"])


class _ReadyWatch:
    """Samples the heartbeats (`ready`) in the background while an outage lasts."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url, self.prefix = redis_url, prefix
        self.seen: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                for h in heartbeats(self.redis_url, self.prefix):
                    self.seen.append((time.time(), h.get("ready")))
            except Exception:  # Redis itself may be the thing that is down
                self.seen.append((time.time(), "unreadable"))

    def __enter__(self) -> _ReadyWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)

    def summary(self) -> str:
        values = [v for _, v in self.seen]
        return ",".join(sorted({str(v) for v in values})) or "none"


@scenario_body("broker_pause")
def scenario_broker_pause(s: Scenario) -> None:
    s.prepare(broker="private", partitions=3)
    pause_s = pick(5, 20)
    mon = s.monitor("bpause")
    s.send(_stream(s.data_dir, pick(90, 480), seed=61))
    wait_progress(s.outputs, s.sent, len(s.sent) // 3, 120, alive=(mon,))
    pid = s.broker.proc.pid
    with _ReadyWatch(s.redis_url, s.prefix) as watch:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause_s)
            mon.check_alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        s.extra["resumed_after_s"] = wait_next(s.outputs, s.sent, 90, alive=(mon,))
    s.notes.append(f"Tansu SIGSTOPped {pause_s} s at 1/3; first new outcome {s.extra['resumed_after_s']} s after "
                   f"SIGCONT; heartbeat ready values seen: {watch.summary()}")
    row, t = s.finish(timeout_s=pick(120, 300), alive=[mon])
    s.check(row, t)


@scenario_body("redis_stop_start")
def scenario_redis_stop_start(s: Scenario) -> None:
    s.prepare(redis="persistent", partitions=3)
    down_s = pick(5, 20)
    mon = s.monitor("rstop")
    s.send(_stream(s.data_dir, pick(90, 480), seed=62))
    wait_progress(s.outputs, s.sent, len(s.sent) // 3, 120, alive=(mon,))
    s.redis.stop()  # SIGTERM: a clean shutdown, AOF (fsync always) on disk
    stopped = time.monotonic()
    during = len(s.sent & s.outputs.poll().covered())
    time.sleep(down_s)
    mon.check_alive()
    s.outputs.poll()
    progressed = len(s.sent & s.outputs.covered()) - during
    s.redis.start()  # same port, same dir: the AOF is replayed
    t_back = time.monotonic()
    resumed = wait_next(s.outputs, s.sent, 90, alive=(mon,))
    hb = heartbeats(s.redis_url, s.prefix)
    s.extra.update({"down_s": round(t_back - stopped, 1), "outcomes_while_down": progressed,
                    "resumed_after_s": resumed, "ready_after": [h.get("ready") for h in hb]})
    s.notes.append(f"redis-server stopped {down_s} s at 1/3 ({progressed} outcomes while down); first new outcome "
                   f"{resumed} s after restart")
    row, t = s.finish(timeout_s=pick(120, 300), alive=[mon])
    s.check(row, t)


@scenario_body("redis_pause")
def scenario_redis_pause(s: Scenario) -> None:
    s.prepare(redis="private", partitions=3)
    # Longer than the socket timeout, so client calls time out while the server holds their commands.
    socket_timeout, pause_s = pick(2.0, 10.0), pick(5, 20)
    env = {"DLSR_REDIS__SOCKET_TIMEOUT_S": socket_timeout} if socket_timeout != 10.0 else {}
    mon = s.monitor("rpause", **env)
    s.send(_stream(s.data_dir, pick(90, 480), seed=63))
    wait_progress(s.outputs, s.sent, len(s.sent) // 3, 120, alive=(mon,))
    s.redis.pause()
    try:
        time.sleep(pause_s)
        mon.check_alive()
    finally:
        s.redis.resume()
    resumed = wait_next(s.outputs, s.sent, 90, alive=(mon,))
    s.notes.append(f"redis-server SIGSTOPped {pause_s} s (socket timeout {socket_timeout:g} s); first new outcome "
                   f"{resumed} s after SIGCONT")
    row, t = s.finish(timeout_s=pick(120, 300), alive=[mon])
    s.check(row, t)


def test_broker_pause(fault_runner):
    fault_runner.result("broker_pause", RESULT_TIMEOUT_S)


def test_redis_stop_start(fault_runner):
    fault_runner.result("redis_stop_start", RESULT_TIMEOUT_S)


def test_redis_pause(fault_runner):
    fault_runner.result("redis_pause", RESULT_TIMEOUT_S)


@scenario_body("startup_outage")
def scenario_startup_outage(s: Scenario) -> None:
    """Neither Redis nor the broker is there when the monitor starts: it waits (outage budget 0 = forever),
    Redis comes up, then the broker (a fresh, empty one on the same port), and the stream is processed."""
    from dlsr_monitor.common.kafka_io import ensure_topics
    from tests.faults.harness import Outputs

    s.prepare(redis="persistent", broker="private", partitions=3)  # model published into the persistent Redis
    s.outputs.close()
    s.redis.stop()
    s.broker.stop()
    down_s = pick(4, 15)
    mon = s.monitor("startup")
    time.sleep(down_s)
    mon.check_alive()
    s.redis.start()
    time.sleep(down_s)
    mon.check_alive()
    s.broker.start()  # in-memory broker: a new, empty one on the same port
    t = s.topics
    ensure_topics(s.bootstrap, [t.input, t.scores, t.alerts, t.dlq], partitions=3)
    s.outputs = Outputs(s.bootstrap, t)
    s.send(_stream(s.data_dir, pick(40, 240), seed=64))
    first = wait_next(s.outputs, s.sent, 120, alive=(mon,))
    s.notes.append(f"monitor started with Redis and Tansu down; Redis up after {down_s} s, Tansu after "
                   f"{2 * down_s} s; first outcome {first} s after producing")
    row, tl = s.finish(timeout_s=pick(120, 300), alive=[mon])
    s.check(row, tl)


def test_startup_outage(fault_runner):
    fault_runner.result("startup_outage", RESULT_TIMEOUT_S)
