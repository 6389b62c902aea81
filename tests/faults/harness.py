"""Machinery of the fault suite: private servers (redis-server, Tansu), the monitor as a real process with any
DLSR_* setting, a producer with explicit partitions / keys / raw headers, and the accounting every scenario
ends with (inputs -> score records + dead letters, duplicates, Redis window totals).

Inputs are identified by the (partition, offset) the broker acknowledged for each produced message, so "lost"
is exact: an acknowledged input with neither a score record nor a dead letter whose `origin` names it. (Tansu's
ListOffsets answer is not usable for this: it reports end offsets far below what it acknowledged.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: "reduced" (what `make test` runs) or "full" (`make faults`, DLSR_FAULTS=full).
MODE = "full" if os.environ.get("DLSR_FAULTS", "").strip().lower() in ("full", "1", "long") else "reduced"


def pick(reduced: Any, full: Any) -> Any:
    """The reduced or the full value of a scenario parameter."""
    return full if MODE == "full" else reduced


# ---- private servers ----------------------------------------------------------------------------------
def free_port() -> int:
    from dlsr_monitor.demo.embedded import free_port as _free_port

    return _free_port()


class RedisServer:
    """A private `redis-server` on a free port, for scenarios that stop or pause it (never the shared one).

    `persist=True` keeps state across a stop/start (AOF, fsync always, in `workdir`); else no persistence.
    """

    def __init__(self, workdir: Path, *, persist: bool = False) -> None:
        self.binary = shutil.which("redis-server") or str(ROOT / ".venv" / "bin" / "redis-server")
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
                "--daemonize", "no", "--logfile", str(self.log_path)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.log_tail()}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not answer within {timeout_s} s: {self.log_tail()}")

    def ping(self) -> bool:
        import redis

        try:
            c = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                return bool(c.ping())
            finally:
                c.close()
        except (redis.RedisError, OSError):
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a clean shutdown: the AOF is flushed) and wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a paused server cannot shut down
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


# ---- settings, model -------------------------------------------------------------------------------------
def make_settings(*, bootstrap: str, redis_url: str, prefix: str, topics: Any, store: Path):
    """A full Settings like the `test_settings` fixture, on the given broker and Redis."""
    from dlsr_monitor.config import Settings

    return Settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "input_topic": topics.input,
            "scores_topic": topics.scores,
            "alerts_topic": topics.alerts,
            "dlq_topic": topics.dlq,
            "vetted_topic": topics.vetted,
            "group_id": f"group-{prefix}",
            "connect_retries": 2,
            "retry_backoff_s": 0.2,
        },
        redis={"url": redis_url, "prefix": prefix, "connect_retries": 2, "retry_backoff_s": 0.2},
        model={"artifact_store": store, "input_size": 128, "device": "cpu"},
    )


def publish_model(redis_url: str, prefix: str, store: Path, model_path: Path, threshold: float, alpha: float):
    """Publish a saved detector as the live version in `prefix`'s registry on `redis_url`."""
    import redis

    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.common.registry import Registry

    client = redis.Redis.from_url(redis_url)
    try:
        return Registry(client, Keys(prefix), store).publish(model_path, threshold=threshold, alpha=alpha,
                                                             expected=None)
    finally:
        client.close()


# ---- the monitor process ---------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / VmPeak of a live process, bytes."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "VmPeak", "Threads"):
                parts = rest.split()
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


class FaultMonitor:
    """`python -m dlsr_monitor.monitor` as a child process, configured by DLSR_* environment variables only
    (the monitor settings of the integration tests plus `env`, any DLSR_* variable)."""

    def __init__(self, settings: Any, workdir: Path, instance: str, env: dict[str, str] | None = None) -> None:
        self.instance = instance
        self.log_path = workdir / f"monitor-{instance}-{uuid.uuid4().hex[:6]}.log"
        k, r, m = settings.kafka, settings.redis, settings.model
        full = {key: val for key, val in os.environ.items() if not key.startswith("DLSR_")}
        full.update(
            {
                "DLSR_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
                "DLSR_KAFKA__INPUT_TOPIC": k.input_topic,
                "DLSR_KAFKA__SCORES_TOPIC": k.scores_topic,
                "DLSR_KAFKA__ALERTS_TOPIC": k.alerts_topic,
                "DLSR_KAFKA__DLQ_TOPIC": k.dlq_topic,
                "DLSR_KAFKA__GROUP_ID": k.group_id,
                "DLSR_KAFKA__TOPIC_PARTITIONS": str(k.topic_partitions),
                "DLSR_KAFKA__RETRY_BACKOFF_S": "0.5",
                "DLSR_REDIS__URL": r.url,
                "DLSR_REDIS__PREFIX": r.prefix,
                "DLSR_REDIS__RETRY_BACKOFF_S": "0.5",
                "DLSR_MODEL__ARTIFACT_STORE": str(m.artifact_store),
                "DLSR_MODEL__DEVICE": "cpu",
                "DLSR_MONITOR__INSTANCE_ID": instance,
                "DLSR_MONITOR__BATCH_MAX": "16",
                "DLSR_MONITOR__BATCH_WAIT_MS": "100",
                "DLSR_MONITOR__HEARTBEAT_S": "1",
                "DLSR_MONITOR__DRIFT_MIN_IMAGES": "30",
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",
            }
        )
        full.update({key: str(val) for key, val in (env or {}).items()})
        self.env = full
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlsr_monitor.monitor", "--log-level", "INFO"],
            cwd=workdir,
            env=full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"monitor {self.instance} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def status(self) -> dict[str, int]:
        return proc_status(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no chance to finish, commit or clean up."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(30)
            pytest.fail(f"monitor {self.instance} did not stop within {timeout_s} s:\n{self.log()[-3000:]}")
        finally:
            if not self._log.closed:
                self._log.close()
        return rc


# ---- producing -------------------------------------------------------------------------------------------
@dataclass
class Msg:
    """One input message: raw value, key and headers (bytes, anything), optional explicit partition."""

    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None
    kind: str = "image"


def send_all(bootstrap: str, topic: str, msgs: list[Msg]) -> list[tuple[int, int]]:
    """Produce and wait for every ack; the (partition, offset) of each message, in order."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=16 * 1024 * 1024,
                      buffer_memory=128 * 1024 * 1024, request_timeout_ms=60000)
    try:
        futures = [
            p.send(topic, value=m.value, key=m.key, headers=list(m.headers), partition=m.partition) for m in msgs
        ]
        p.flush(60)
        metas = [f.get(timeout=60) for f in futures]
    finally:
        p.close(timeout=10)
    return [(md.partition, md.offset) for md in metas]


def image_msgs(values: list[bytes], sources: list[str], *, partition: int | None = None, kind: str = "image",
               ids: list[str] | None = None) -> list[Msg]:
    """Clean messages: key = source, headers `source` (and `image_id` when given)."""
    out = []
    for i, v in enumerate(values):
        src = sources[i % len(sources)]
        headers = [("source", src.encode())]
        if ids is not None:
            headers.append(("image_id", ids[i].encode()))
        out.append(Msg(v, src.encode(), headers, partition, kind))
    return out


# ---- outputs and accounting ------------------------------------------------------------------------------
class TopicReader:
    """Reads a topic from the beginning (no consumer group), accumulating every record. Like the integration
    tests' OutputReader, with frames up to 64 MiB (dead letters carry original values of several MB; kafka-python's
    default limit is 1 MB)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer

        self.topic = topic
        self.records: list[Any] = []
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
            receive_message_max_bytes=64 << 20, fetch_max_bytes=64 << 20, max_partition_fetch_bytes=32 << 20,
        )
        self._assigned = False

    def poll(self, timeout_s: float = 0.5) -> list[Any]:
        from kafka.structs import TopicPartition

        if not self._assigned:
            parts = self._consumer.partitions_for_topic(self.topic)
            if not parts:
                time.sleep(timeout_s)
                return self.records
            self._consumer.assign([TopicPartition(self.topic, p) for p in parts])
            self._consumer.seek_to_beginning()
            self._assigned = True
        for recs in self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=5000).values():
            self.records.extend(recs)
        return self.records

    def close(self) -> None:
        self._consumer.close()


class Outputs:
    """Score records and dead letters read from the beginning of their topics, indexed by input
    (partition, offset)."""

    def __init__(self, bootstrap: str, topics: Any) -> None:
        self.input_topic = topics.input
        self.scores = TopicReader(bootstrap, topics.scores)
        self.dlq = TopicReader(bootstrap, topics.dlq)
        self._ns = self._nd = 0
        self.score_recs: list[Any] = []
        self.dead_recs: list[dict[str, Any]] = []
        self.outcomes: dict[tuple[int, int], list[tuple]] = defaultdict(list)
        self.foreign: list[str] = []  # outputs naming another topic (must stay empty)

    def poll(self, timeout_s: float = 0.3) -> Outputs:
        from dlsr_monitor.common.contract import DLQ_ERROR, DLQ_ERROR_DETAIL, DLQ_ORIGIN, parse_score

        self.scores.poll(timeout_s)
        self.dlq.poll(min(timeout_s, 0.2))
        for r in self.scores.records[self._ns:]:
            rec = parse_score(r.value)
            self.score_recs.append(rec)
            if rec.topic != self.input_topic:
                self.foreign.append(f"score {rec.topic}:{rec.partition}:{rec.offset}")
            self.outcomes[(rec.partition, rec.offset)].append(("score", rec.image_id, round(rec.score, 9)))
        self._ns = len(self.scores.records)
        for r in self.dlq.records[self._nd:]:
            h = {k: v for k, v in (r.headers or [])}
            origin = (h.get(DLQ_ORIGIN) or b"?:-1:-1").decode(errors="replace")
            topic, part, off = origin.rsplit(":", 2)
            reason = (h.get(DLQ_ERROR) or b"").decode(errors="replace")
            detail = (h.get(DLQ_ERROR_DETAIL) or b"").decode(errors="replace")
            if topic != self.input_topic:
                self.foreign.append(f"dead letter {origin}")
            self.dead_recs.append({"origin": origin, "reason": reason, "detail": detail, "value": r.value,
                                   "key": r.key})
            self.outcomes[(int(part), int(off))].append(("dlq", reason))
        self._nd = len(self.dlq.records)
        return self

    def covered(self) -> set[tuple[int, int]]:
        return set(self.outcomes)

    def close(self) -> None:
        self.scores.close()
        self.dlq.close()


def wait_covered(outputs: Outputs, inputs: set[tuple[int, int]], timeout_s: float, *,
                 alive: tuple[FaultMonitor, ...] = (), give_up_if_dead: tuple[FaultMonitor, ...] = ()) -> bool:
    """Poll until every input has an outcome (True) or the timeout (False). Fails when a monitor in `alive`
    exits meanwhile; returns False at once when one in `give_up_if_dead` has (the caller reports it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        outputs.poll(0.3)
        if inputs <= outputs.covered():
            return True
        if time.monotonic() > deadline or any(not m.alive() for m in give_up_if_dead):
            return False
        for m in alive:
            m.check_alive()


def wait_progress(outputs: Outputs, inputs: set[tuple[int, int]], n: int, timeout_s: float, *,
                  alive: tuple[FaultMonitor, ...] = ()) -> int:
    """Poll until at least `n` inputs have an outcome; returns how many have one."""
    deadline = time.monotonic() + timeout_s
    while True:
        outputs.poll(0.3)
        done = len(inputs & outputs.covered())
        if done >= n or time.monotonic() > deadline:
            return done
        for m in alive:
            m.check_alive()


def wait_next(outputs: Outputs, inputs: set[tuple[int, int]], timeout_s: float, *,
              alive: tuple[FaultMonitor, ...] = ()) -> float | None:
    """Seconds until one more input has an outcome (None when all already have one, or on timeout)."""
    start = len(inputs & outputs.poll().covered())
    if start >= len(inputs):
        return None
    t0 = time.monotonic()
    done = wait_progress(outputs, inputs, start + 1, timeout_s, alive=alive)
    return round(time.monotonic() - t0, 1) if done > start else None


@dataclass
class Tally:
    inputs: int
    scored: int
    dead: int
    lost: int
    lost_keys: list[tuple[int, int]]
    duplicates: int
    dup_identical: bool | None
    mismatched: list[tuple[tuple[int, int], list[tuple]]]
    extra_outputs: list[str]
    redis_images: int | None
    redis_dead: int | None
    redis_exact: bool | None


def tally(outputs: Outputs, inputs: set[tuple[int, int]], redis_url: str | None, prefix: str) -> Tally:
    """Outcomes per input; duplicates and whether they repeat the same outcome; Redis window totals."""
    outputs.poll(0.5)
    oc = outputs.outcomes
    scored = {k for k, v in oc.items() if k in inputs and any(x[0] == "score" for x in v)}
    dead = {k for k, v in oc.items() if k in inputs and all(x[0] == "dlq" for x in v)}
    lost = sorted(inputs - set(oc))
    dups = sum(len(v) - 1 for v in oc.values())
    mismatched = [(k, v) for k, v in oc.items() if len(set(v)) > 1]
    extra = [f"{k}" for k in oc if k not in inputs] + outputs.foreign
    r_images = r_dead = None
    exact = None
    if redis_url is not None:
        r_images, r_dead = redis_window_totals(redis_url, prefix)
        exact = r_images == len(scored) and r_dead == len(dead) and r_images + r_dead == len(inputs)
    return Tally(
        inputs=len(inputs), scored=len(scored), dead=len(dead), lost=len(lost), lost_keys=lost[:20],
        duplicates=dups, dup_identical=(not mismatched) if dups else None, mismatched=mismatched[:10],
        extra_outputs=extra[:10], redis_images=r_images, redis_dead=r_dead, redis_exact=exact,
    )


def redis_window_totals(redis_url: str, prefix: str) -> tuple[int, int]:
    """(images, dead) summed over every source's window buckets."""
    import redis

    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.console.views import StateView

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        view = StateView(client, Keys(prefix))
        images = dead = 0
        for s in view.read_sources():
            t = view.window_totals(s.source)
            images += int(t["images"])
            dead += int(t["dead"])
        return images, dead
    finally:
        client.close()


def heartbeats(redis_url: str, prefix: str) -> list[dict[str, Any]]:
    import redis

    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.console.views import StateView

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return StateView(client, Keys(prefix)).read_heartbeats()
    finally:
        client.close()


def log_excerpt(monitors: list[FaultMonitor], pattern: tuple[str, ...] = ("WARNING", "ERROR", "Traceback"),
                n: int = 25) -> str:
    """The warning / error lines of every monitor's log (last `n` each), for failure messages and notes."""
    out = []
    for m in monitors:
        lines = [ln for ln in m.log().splitlines() if any(p in ln for p in pattern)]
        out.append(f"--- {m.instance} (rc={m.returncode if not m.alive() else 'running'}) ---")
        out.extend(lines[-n:])
    return "\n".join(out)
