"""Helpers for the monitor's integration tests: producers (kafka-python and librdkafka), an output reader,
and the monitor as a real OS process (`python -m monitor`) that can be SIGTERMed or SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Item:
    """One input message to produce."""

    value: bytes
    source: str
    kind: str  # "id", "ood", "corrupt"
    image_id: str | None = None


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 100-byte PNG that claims 10 gigapixels (a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def corrupt_payloads(n: int, real_jpeg: bytes) -> list[bytes]:
    """n bad values of several kinds: truncated JPEG, random bytes, empty, text, a pixel bomb."""
    rng = __import__("random").Random(0)
    kinds = [
        lambda: real_jpeg[: len(real_jpeg) // 3],
        lambda: bytes(rng.getrandbits(8) for _ in range(200)),
        lambda: b"",
        lambda: b"this is not an image",
        png_bomb,
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


def load_images(data_dir: Path, dataset: str, split: str, n: int, seed: int) -> list[bytes]:
    from dlsr.readers import open_images

    return [item.data for item in open_images(data_dir / dataset / f"{split}.zip", limit=n, seed=seed)]


def produce(bootstrap: str, topic: str, items: list[Item], client: str = "kafka-python") -> None:
    """Produce items (key = source, headers source and, when set, image_id) and wait for every ack."""

    def headers(it: Item) -> list[tuple[str, bytes]]:
        h = [("source", it.source.encode())]
        if it.image_id:
            h.append(("image_id", it.image_id.encode()))
        return h

    if client == "confluent":
        from confluent_kafka import Producer

        errors: list[str] = []
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
        for it in items:
            p.produce(
                topic,
                value=it.value,
                key=it.source.encode(),
                headers=headers(it),
                on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
            )
            p.poll(0)
        left = p.flush(30)
        assert left == 0 and not errors, f"confluent-kafka producer: {left} unsent, errors {errors[:3]}"
        return
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [p.send(topic, value=it.value, key=it.source.encode(), headers=headers(it)) for it in items]
    p.flush(30)
    for f in futures:
        f.get(timeout=30)
    p.close()


@dataclass
class OutputReader:
    """Reads a topic from the beginning (no consumer group), accumulating everything seen."""

    bootstrap: str
    topic: str
    records: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from kafka import KafkaConsumer

        self._consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False
        )
        self._assigned = False

    def _assign(self) -> None:
        from kafka.structs import TopicPartition

        parts = self._consumer.partitions_for_topic(self.topic)
        if parts:
            self._consumer.assign([TopicPartition(self.topic, p) for p in parts])
            self._consumer.seek_to_beginning()
            self._assigned = True

    def poll(self, timeout_s: float = 0.5) -> list:
        if not self._assigned:
            self._assign()
            if not self._assigned:
                time.sleep(timeout_s)
                return self.records
        for recs in self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=5000).values():
            self.records.extend(recs)
        return self.records

    def wait_for(self, n: int, timeout_s: float, proc: MonitorProcess | None = None) -> list:
        deadline = time.monotonic() + timeout_s
        while len(self.poll()) < n and time.monotonic() < deadline:
            if proc is not None:
                proc.check_alive()
        return self.records

    def json(self) -> list[dict]:
        return [json.loads(r.value) for r in self.records]

    def close(self) -> None:
        self._consumer.close()


class MonitorProcess:
    """`python -m monitor` as a child process, configured through DLSR_* environment variables only."""

    def __init__(self, settings, workdir: Path, instance: str, **monitor_env: object) -> None:
        self.instance = instance
        self.log_path = workdir / f"monitor-{instance}-{uuid.uuid4().hex[:6]}.log"
        k, r, m = settings.kafka, settings.redis, settings.model
        env = {key: val for key, val in os.environ.items() if not key.startswith("DLSR_")}
        env.update(
            {
                "DLSR_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
                "DLSR_KAFKA__INPUT_TOPIC": k.input_topic,
                "DLSR_KAFKA__SCORES_TOPIC": k.scores_topic,
                "DLSR_KAFKA__ALERTS_TOPIC": k.alerts_topic,
                "DLSR_KAFKA__DLQ_TOPIC": k.dlq_topic,
                "DLSR_KAFKA__GROUP_ID": k.group_id,
                "DLSR_KAFKA__TOPIC_PARTITIONS": str(k.topic_partitions),
                "DLSR_REDIS__URL": r.url,
                "DLSR_REDIS__PREFIX": r.prefix,
                "DLSR_REDIS__CLUSTER": str(r.cluster).lower(),
                "DLSR_MODEL__ARTIFACT_STORE": str(m.artifact_store),
                "DLSR_MODEL__DEVICE": "cpu",
                "DLSR_MONITOR__INSTANCE_ID": instance,
                "DLSR_MONITOR__BATCH_MAX": "16",
                "DLSR_MONITOR__BATCH_WAIT_MS": "100",
                "DLSR_MONITOR__HEARTBEAT_S": "1",
                "DLSR_MONITOR__DRIFT_MIN_IMAGES": "30",
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": "1",  # several monitors share 2 cores in these tests
            }
        )
        # Keys spelled DLSR_... are passed as they are (any section); the rest are monitor settings.
        env.update(
            {(k if k.startswith("DLSR_") else f"DLSR_MONITOR__{k.upper()}"): str(v) for k, v in monitor_env.items()}
        )
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlsr_monitor.monitor", "--log-level", "INFO"],
            cwd=workdir,  # away from the repository's .env / dlsr.toml
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"monitor {self.instance} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL: no chance to finish, commit or clean up."""
        self.proc.kill()
        self.wait(30)

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(30)
            pytest.fail(f"monitor {self.instance} did not stop within {timeout_s} s:\n{self.log()[-3000:]}")
        finally:
            self._log.close()
        return rc


@pytest.fixture
def monitors(test_settings, tmp_path):
    """Factory of monitor processes; any still running at the end are killed."""
    started: list[MonitorProcess] = []

    def start(instance: str | None = None, settings=None, **monitor_env: object) -> MonitorProcess:
        proc = MonitorProcess(settings or test_settings, tmp_path, instance or f"m{len(started)}", **monitor_env)
        started.append(proc)
        return proc

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(30)


@pytest.fixture
def readers(tansu):
    """Factory of OutputReaders, closed at the end."""
    made: list[OutputReader] = []

    def make(topic: str) -> OutputReader:
        r = OutputReader(tansu, topic)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def wait_until(cond, timeout_s: float, what: str, procs: tuple = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        for p in procs:
            p.check_alive()
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
