"""A real Prometheus (Debian's `prometheus`, started here) scrapes a real monitor during a real stream, and PromQL
answers the OOD rate of a source: the same fraction as the score records the monitor produced."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import Item, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SCRAPE_S = 1
#: The OOD rate of each source: flagged over scored, from the monitor's counters.
OOD_RATE = 'sum by (source) (dlsr_ood_total) / sum by (source) (dlsr_images_total)'
#: What an operator would chart: the same over the last minutes (rates of the counters).
OOD_RATE_5M = 'sum by (source) (increase(dlsr_ood_total[5m])) / sum by (source) (increase(dlsr_images_total[5m]))'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """One prometheus server on a free loopback port, scraping `target` every second, storage in `workdir`."""

    def __init__(self, workdir: Path, target: str) -> None:
        exe = shutil.which("prometheus")
        if exe is None:  # the test command installs it (Makefile system-deps); a missing server is a failure
            pytest.fail("prometheus is not installed: apt-get install prometheus (make test does it as root)")
        self.port = _free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n"
            f"scrape_configs:\n  - job_name: dlsr-monitor\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [exe, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def query(self, promql: str) -> dict[str, float]:
        """Instant query -> {source label: value}."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return {r["metric"].get("source", ""): float(r["value"][1]) for r in body["data"]["result"]}

    def up(self) -> bool:
        try:
            return self.query("up") != {}
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_promql_answers_the_ood_rate_of_a_source(published_model, data_dir, tansu, topics, monitors, readers,
                                                 tmp_path):
    from dlsr_monitor.common.contract import parse_score
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(tansu, [topics.input, topics.scores, topics.alerts, topics.dlq], partitions=3)
    port = _free_port()
    items = [Item(v, "cam-id", "id") for v in load_images(data_dir, "cifar10", "test", 60, seed=21)]
    items += [Item(v, "cam-ood", "ood") for v in load_images(data_dir, "mnist", "test", 40, seed=21)]
    scores = readers(topics.scores)
    mon = monitors("prom", DLSR_METRICS__PORT=port)
    prom = Prometheus(tmp_path, f"127.0.0.1:{port}")
    first = [it for it in items if it.source == "cam-id"] + [it for it in items if it.source == "cam-ood"][:10]
    rest = [it for it in items if it not in first]
    try:
        wait_until(prom.up, 60, "prometheus answering", (mon,))
        # Two waves with a scrape between them, so every series has two samples in the 5-minute window.
        produce(tansu, topics.input, first)
        wait_until(lambda: sum(prom.query("dlsr_images_total").values()) >= len(first), 300, "a scrape of wave 1",
                   (mon,))
        produce(tansu, topics.input, rest)
        wait_until(lambda: len(scores.poll()) >= len(items), 300, "every image scored", (mon,))
        recs = [parse_score(r.value) for r in scores.records]
        expected = {src: sum(r.is_ood for r in recs if r.source == src) / sum(r.source == src for r in recs)
                    for src in ("cam-id", "cam-ood")}
        wait_until(lambda: sum(prom.query("dlsr_images_total").values()) >= len(items), 60, "a full scrape",
                   (mon,))
        got = prom.query(OOD_RATE)
        assert got == pytest.approx(expected, abs=1e-12), (got, expected)
        assert got["cam-ood"] > 0.5 > got["cam-id"], got
        # cam-ood grew between scrapes (wave 2 is all cam-ood), so its windowed rate is defined: 30 flags-or-not
        # of 30 new images.
        windowed = prom.query(OOD_RATE_5M)
        assert windowed["cam-ood"] > 0.5, windowed
        assert mon.terminate() == 0, mon.log()[-2000:]
    finally:
        prom.stop()
        mon.terminate()
