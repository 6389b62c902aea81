"""Metrics, label caps and the health endpoints served over real HTTP."""

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from dlsr_monitor.common.observability import OTHER, Health, MetricsServer, MonitorMetrics, SourceLabels


def test_source_labels_are_capped():
    label = SourceLabels(2)
    assert [label(s) for s in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_health_turns_unhealthy_after_a_stall_and_back():
    now = [100.0]
    h = Health(stall_s=5, clock=lambda: now[0])
    assert h.live()[0]
    now[0] += 6
    assert not h.live()[0]
    h.progressed()
    assert h.live()[0]
    assert not h.ready()[0]  # nothing checked yet is not ready
    h.set("model", True)
    h.set("redis", True)
    assert h.ready()[0]
    h.set("redis", False)
    assert h.ready() == (False, {"checks": {"model": True, "redis": False}})


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_endpoints_serve_metrics_and_health():
    metrics, health = MonitorMetrics(max_sources=1), Health(stall_s=60)
    metrics.batch_done(scored=[("cam1", True), ("cam1", False), ("cam2", False)], dead_reasons=["not_an_image"],
                       batch_size=4, score_s=0.2, latencies_s=[0.5, 0.7, -1.0])
    metrics.model_live("v3", 0.01)
    server = MetricsServer("127.0.0.1", 0, metrics.registry, health).start()
    try:
        status, text = _get(server.port, "/metrics")
        assert status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("dlsr_images_total", (("source", "cam1"),))] == 2
        assert samples[("dlsr_images_total", (("source", OTHER),))] == 1  # the cap at work
        assert samples[("dlsr_ood_total", (("source", "cam1"),))] == 1
        assert samples[("dlsr_dead_letters_total", (("reason", "not_an_image"),))] == 1
        assert samples[("dlsr_end_to_end_latency_seconds_count", ())] == 2  # a negative latency is not observed
        assert samples[("dlsr_model_info", (("version", "v3"),))] == 1
        assert _get(server.port, "/healthz")[0] == 200
        status, body = _get(server.port, "/readyz")
        assert status == 503 and json.loads(body)["ok"] is False
        health.set("model", True)
        assert _get(server.port, "/readyz")[0] == 200
    finally:
        server.stop()
