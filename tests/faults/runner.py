"""Runs the fault scenarios.

A `Scenario` is one scenario's world: its topics, key prefix, broker, Redis, the published small model, monitors
as real processes, output readers and the accounting it ends with. A `Runner` runs the selected scenarios'
bodies a few at a time on threads, so the time a scenario spends waiting (group joins, session time-outs after a
SIGKILL, pauses, outages) overlaps with the others' instead of adding up; each test then waits for its own
scenario and re-raises whatever the body raised (an assertion, pytest.fail, pytest.xfail).

A body is `fn(s: Scenario) -> None`, registered with `@scenario_body("name")` in the module that defines
`test_<name>`; the body calls `s.prepare(...)` first and ends with `s.finish(...)` and `s.check(...)`.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import TopicNames
from tests.faults import report
from tests.faults.harness import (
    MODE,
    FaultMonitor,
    Msg,
    Outputs,
    RedisServer,
    Tally,
    log_excerpt,
    make_settings,
    publish_model,
    send_all,
    tally,
    wait_covered,
)

BODIES: dict[str, Callable[[Scenario], None]] = {}
#: Scenarios run at once: each mostly waits (joins, time-outs, pauses), so 5 keep 2 cores busy.
WORKERS = max(1, int(os.environ.get("DLSR_FAULTS_WORKERS", "5")))
#: Longest a test waits for its scenario (queueing behind others included).
RESULT_TIMEOUT_S = 900 if MODE == "reduced" else 3000
#: Start order, longest first, so the short ones fill the gaps.
ORDER = ["replicas_join_leave", "sigkill", "hostile_payloads", "memory_burst", "startup_outage", "redis_stop_start",
         "broker_pause", "redis_pause", "poison_model", "poison_headers"]


def scenario_body(name: str) -> Callable[[Callable[[Scenario], None]], Callable[[Scenario], None]]:
    """Register `fn` as the body of scenario `name` (its test is `test_<name>`)."""

    def register(fn: Callable[[Scenario], None]) -> Callable[[Scenario], None]:
        BODIES[name] = fn
        return fn

    return register


class Scenario:
    """One fault scenario's world. `prepare()` first, then `monitor()`, `send()`, ..., `finish()`."""

    def __init__(self, name: str, nodeid: str, tmp_path: Path, topics: Any, prefix: str, small_model: Any,
                 tansu: str, redis_url: str, data_dir: Path) -> None:
        self.name, self.nodeid = name, nodeid
        self.tmp_path, self.topics, self.prefix = tmp_path, topics, prefix
        self.small_model, self.data_dir = small_model, data_dir
        self.shared_bootstrap, self.shared_redis_url = tansu, redis_url
        self.bootstrap = tansu
        self.redis_url = redis_url
        self.redis: RedisServer | None = None
        self.broker: Any = None
        self.monitors: list[FaultMonitor] = []
        self.outputs: Outputs | None = None
        self.settings: Any = None
        self.model: Any = None
        self.t0 = time.monotonic()
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.sent: set[tuple[int, int]] = set()

    # ---- set-up ---------------------------------------------------------------------------------------
    def prepare(self, *, redis: str = "shared", broker: str = "shared", partitions: int = 3,
                publish: bool = True) -> Scenario:
        """redis: 'shared' (the test Redis), 'private' (a redis-server of our own, no persistence) or
        'persistent' (our own, AOF: survives a stop/start). broker: 'shared' (session Tansu) or 'private'."""
        from dlsr_monitor.common.kafka_io import ensure_topics

        if redis != "shared":
            self.redis = RedisServer(self.tmp_path, persist=redis == "persistent").start()
            self.redis_url = self.redis.url
        if broker == "private":
            from dlsr_monitor.demo.embedded import TansuBroker

            self.broker = TansuBroker(log_path=self.tmp_path / "tansu.log").start()
            self.bootstrap = self.broker.bootstrap
        t = self.topics
        ensure_topics(self.bootstrap, [t.input, t.scores, t.alerts, t.dlq], partitions=partitions)
        self.settings = make_settings(bootstrap=self.bootstrap, redis_url=self.redis_url, prefix=self.prefix,
                                      topics=t, store=self.tmp_path / "artifacts")
        if publish:
            sm = self.small_model
            self.model = publish_model(self.redis_url, self.prefix, self.tmp_path / "artifacts", sm.path,
                                       sm.threshold, sm.alpha)
        self.outputs = Outputs(self.bootstrap, t)
        return self

    def monitor(self, instance: str | None = None, **env: Any) -> FaultMonitor:
        """Start a monitor process; `env`: DLSR_* variables (strings) beyond the integration-test defaults."""
        m = FaultMonitor(self.settings, self.tmp_path, instance or f"{self.name}-{len(self.monitors)}",
                         {k: str(v) for k, v in env.items()})
        self.monitors.append(m)
        return m

    def send(self, msgs: list[Msg]) -> list[tuple[int, int]]:
        """Produce (every ack awaited); the (partition, offset) of each, also added to `self.sent`."""
        where = send_all(self.bootstrap, self.topics.input, msgs)
        self.sent.update(where)
        return where

    # ---- the end ------------------------------------------------------------------------------------
    def finish(self, *, timeout_s: float, alive: list[FaultMonitor] | None, settle_s: float = 1.5,
               inputs: set[tuple[int, int]] | None = None) -> tuple[report.Row, Tally]:
        """Wait until every input is covered, stop the running monitors (SIGTERM, exit 0 expected), count.

        `alive`: the monitors that must have survived the whole scenario (None: a kill scenario)."""
        assert self.outputs is not None
        inputs = set(self.sent) if inputs is None else inputs
        complete = wait_covered(self.outputs, inputs, timeout_s, give_up_if_dead=tuple(alive or ()))
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            self.outputs.poll(0.3)
        still = [m for m in self.monitors if m.alive()]
        was_alive = all(m.alive() for m in alive) if alive is not None else None
        rcs = {m.instance: m.terminate(90) for m in still}
        self.outputs.poll(1.0)
        t = tally(self.outputs, inputs, self.redis_url, self.prefix)
        if alive is not None:
            was_alive = bool(was_alive) and all(rcs.get(m.instance) == 0 for m in alive)
        if not complete:
            dead = [f"{m.instance} (rc {m.returncode})" for m in (alive or ()) if m.returncode not in (None, 0)]
            self.notes.append(f"monitor died: {dead}; {t.lost} inputs uncovered" if dead else
                              f"timed out after {timeout_s:.0f} s with {t.lost} inputs uncovered")
        if rcs and any(rc != 0 for rc in rcs.values()):
            if alive is not None:
                self.notes.append(f"exit codes on SIGTERM: {rcs}")
            else:  # a kill scenario: its last monitor may still be starting (no handler yet: -15)
                self.extra["final_sigterm_rc"] = rcs
        if t.extra_outputs:
            self.notes.append(f"outputs for unknown inputs: {t.extra_outputs}")
        if t.redis_exact is False:
            self.notes.append(f"redis images={t.redis_images} dead={t.redis_dead} vs scored={t.scored} "
                              f"dead={t.dead}")
        row = report.Row(
            scenario=self.name, mode=MODE, inputs=t.inputs, scored=t.scored, dead=t.dead, lost=t.lost,
            duplicates=t.duplicates, dup_identical=t.dup_identical, redis_exact=t.redis_exact, alive=was_alive,
            seconds=round(time.monotonic() - self.t0, 1), notes="; ".join(self.notes), extra=self.extra,
            nodeid=self.nodeid,
        )
        report.record(row)
        return row, t

    def check(self, row: report.Row, t: Tally) -> None:
        """The assertions every scenario makes: nothing lost, Redis exact, repeats identical, alive."""
        logs = log_excerpt(self.monitors)
        assert t.lost == 0, f"{t.lost} inputs lost (no score, no dead letter), e.g. {t.lost_keys}\n{logs}"
        assert not t.extra_outputs, f"outputs for inputs that do not exist: {t.extra_outputs}"
        assert t.dup_identical in (None, True), f"duplicates differ: {t.mismatched}\n{logs}"
        assert t.redis_exact, (
            f"Redis window totals images={t.redis_images} dead={t.redis_dead} != scored={t.scored} "
            f"dead={t.dead} (inputs {t.inputs})\n{logs}"
        )
        if row.alive is not None:
            assert row.alive, f"a monitor that had to survive did not (or did not exit 0 on SIGTERM)\n{logs}"

    def close(self) -> None:
        for m in self.monitors:
            if m.alive():
                m.proc.kill()
                m.wait(30)
        if self.outputs is not None:
            self.outputs.close()
        if self.redis is not None:
            self.redis.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.redis is None:  # the shared Redis: delete this scenario's keys
            import redis

            client = redis.Redis.from_url(self.shared_redis_url)
            try:
                for name in client.scan_iter(f"{self.prefix}*", count=1000):
                    client.delete(name)
            finally:
                client.close()


class Runner:
    """Starts every selected scenario on a pool of WORKERS threads at the first request; `result(name)` waits
    for one and re-raises what its body raised."""

    def __init__(self, *, selected: dict[str, str], tmp_factory: Any, small_model: Any, tansu: str,
                 redis_url: str, data_dir: Path) -> None:
        self.selected = selected  # scenario name -> test nodeid
        self.tmp_factory = tmp_factory
        self.small_model, self.tansu, self.redis_url, self.data_dir = small_model, tansu, redis_url, data_dir
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _start(self) -> None:
        with self._lock:
            if self._pool is not None:
                return
            self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fault")
            names = sorted(self.selected, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
            for name in names:
                self._futures[name] = self._pool.submit(self._run, name)

    def _run(self, name: str) -> None:
        tag = uuid.uuid4().hex[:10]
        topics = TopicNames(input=f"images-{tag}", scores=f"scores-{tag}", alerts=f"alerts-{tag}",
                            dlq=f"dlq-{tag}", vetted=f"vetted-{tag}")
        s = Scenario(name, self.selected[name], self.tmp_factory.mktemp(name), topics, f"dlsr-fault-{tag}",
                     self.small_model, self.tansu, self.redis_url, self.data_dir)
        try:
            BODIES[name](s)
        finally:
            s.close()

    def result(self, name: str, timeout_s: float) -> None:
        self._start()
        fut = self._futures.get(name)
        assert fut is not None, f"scenario {name} was not selected"
        fut.result(timeout=timeout_s)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
