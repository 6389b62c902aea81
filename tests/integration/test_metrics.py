"""`/metrics`, `/healthz`, `/readyz` of a real monitor process during a real stream: the counters equal the score
records and dead letters produced; /healthz turns unhealthy while the broker is frozen (SIGSTOP) mid-stream and
healthy again after SIGCONT."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Item, corrupt_payloads, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _sum(text: str, name: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def _broker_pid(bootstrap: str) -> int:
    port = bootstrap.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "tansu" in cmd and f"tcp://127.0.0.1:{port} " in cmd + " ":
                return int(proc.name)
    raise AssertionError(f"no Tansu process listening on {bootstrap}")


def test_metrics_match_the_stream_and_healthz_follows_a_frozen_broker(
    published_model, data_dir, tansu, topics, monitors, readers
):
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(tansu, [topics.input, topics.scores, topics.alerts, topics.dlq], partitions=3)
    port = _free_port()
    cifar = load_images(data_dir, "cifar10", "test", 160, seed=5)
    first = [Item(v, f"cam{i % 3}", "id") for i, v in enumerate(cifar[:80])]
    first += [Item(v, "camX", "corrupt") for v in corrupt_payloads(10, cifar[0])]
    scores, dlq = readers(topics.scores), readers(topics.dlq)
    mon = monitors("metrics", **{
        "DLSR_METRICS__PORT": port, "DLSR_METRICS__STALL_S": 4, "produce_timeout_s": 3,
        "DLSR_KAFKA__RETRY_BACKOFF_S": 0.3,
    })
    wait_until(lambda: _get(port, "/healthz")[0] == 200, 120, "the metrics endpoint", (mon,))
    produce(tansu, topics.input, first)
    wait_until(lambda: len(scores.poll()) >= 80 and len(dlq.poll()) >= 10, 300, "80 scores + 10 DLQ", (mon,))
    wait_until(lambda: _sum(_get(port, "/metrics")[1], "dlsr_images_total") >= 80, 30, "counters", (mon,))
    status, text = _get(port, "/metrics")
    assert status == 200
    assert _sum(text, "dlsr_images_total") == len({(r.partition, r.offset) for r in scores.records}) == 80
    assert _sum(text, "dlsr_dead_letters_total") == len(dlq.records) == 10
    assert _sum(text, "dlsr_batch_size_count") >= 1 and _sum(text, "dlsr_model_info") == 1
    assert _get(port, "/readyz")[0] == 200 and _get(port, "/healthz")[0] == 200

    # Freeze the broker while a batch is being produced: the loop cannot finish it, /healthz says so.
    produce(tansu, topics.input, [Item(v, "cam0", "id") for v in cifar[80:]])
    pid = _broker_pid(tansu)
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline, seen_unhealthy, bodies = time.monotonic() + 60, False, []
        while time.monotonic() < deadline and not seen_unhealthy:
            status, body = _get(port, "/healthz")
            seen_unhealthy, _ = status == 503, bodies.append(body)
            time.sleep(0.5)
        mon.check_alive()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert seen_unhealthy, f"healthz stayed healthy while frozen: {bodies[-3:]}\n{mon.log()[-3000:]}"
    wait_until(lambda: _get(port, "/healthz")[0] == 200, 90, "healthy again after SIGCONT", (mon,))
    wait_until(lambda: len({(r.partition, r.offset) for r in scores.poll()}) >= 160, 300, "all 160 scored", (mon,))
    assert mon.terminate() == 0, mon.log()[-2000:]
