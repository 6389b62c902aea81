"""A real Redis Cluster on loopback ports for the tests: three masters made with `redis-server --cluster-enabled
yes` and joined with `redis-cli --cluster create`. The test command runs the stream, crash and replica tests a
second time against it (`DLSR_TEST_REDIS_CLUSTER=1`, see scripts/run_tests.sh)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

MASTERS = 3


def _free_port() -> int:
    # Cluster nodes also listen on port + 10000 (the bus): pick ports whose bus port is free too.
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """Start / stop the nodes; `url` names one of them (clients discover the rest)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout_s: float = 60.0) -> RedisCluster:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (apt-get install redis-server)")
        for i in range(MASTERS):
            port = _free_port()
            node = self.workdir / f"node-{port}"
            node.mkdir(parents=True)
            self.procs.append(
                subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", str(node / "nodes.conf"), "--cluster-node-timeout", "5000",
                     "--save", "", "--appendonly", "no", "--dir", str(node)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                )
            )
            self.ports.append(port)
            del i
        deadline = time.monotonic() + timeout_s
        for port in self.ports:
            while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node on {port} did not start")
                time.sleep(0.1)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        res = subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {res.stdout[-500:]} {res.stderr[-500:]}")
        while "cluster_state:ok" not in subprocess.run(
            ["redis-cli", "-p", str(self.ports[0]), "cluster", "info"], capture_output=True, text=True
        ).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
