"""deploy/grafana: the dashboard is valid JSON whose PromQL names only the services' metrics, and the
provisioning that docker-compose.yml mounts loads it with a datasource that reaches compose's Prometheus.

The metric names are the services' interface (common/observability.py; README "Run it in production"): a panel
asking for a name nobody exports would stay empty without any error, so the expressions are parsed here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dlsr.json"

# family -> (type, labels). Counters are exposed as <family>_total, histograms as _bucket/_sum/_count (label le),
# the Info metric `dlsr_model` as dlsr_model_info.
METRICS: dict[str, tuple[str, set[str]]] = {
    "dlsr_images": ("counter", {"source"}),
    "dlsr_dead_letters": ("counter", {"reason"}),
    "dlsr_ood": ("counter", {"source"}),
    "dlsr_drift_raised": ("gauge", {"source"}),
    "dlsr_batch_size": ("histogram", set()),
    "dlsr_score_seconds": ("histogram", set()),
    "dlsr_end_to_end_latency_seconds": ("histogram", set()),
    "dlsr_consumer_lag": ("gauge", {"partition"}),
    "dlsr_model": ("info", {"version"}),
    "dlsr_alpha": ("gauge", set()),
    "dlsr_ready": ("gauge", set()),
    "dlsr_trainer_jobs": ("counter", {"outcome"}),
    "dlsr_trainer_job_duration_seconds": ("histogram", set()),
    "dlsr_trainer_gate_results": ("counter", {"gate", "result"}),
    "dlsr_notify_posts": ("counter", {"outcome"}),
}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series


def _samples() -> dict[str, set[str]]:
    """Exposed sample name -> the labels it carries."""
    out: dict[str, set[str]] = {}
    for family, (kind, labels) in METRICS.items():
        names = {
            "counter": [f"{family}_total"],
            "gauge": [family],
            "info": [f"{family}_info"],
            "histogram": [f"{family}_bucket", f"{family}_sum", f"{family}_count"],
        }[kind]
        for name in names:
            out[name] = labels | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
    return out


SAMPLES = _samples()
FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "rate", "irate", "increase", "delta",
    "histogram_quantile", "vector", "scalar", "clamp_min", "clamp_max", "abs", "time", "timestamp",
    "max_over_time", "min_over_time", "avg_over_time", "last_over_time", "absent", "label_replace",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"


def parse_promql(expr: str) -> tuple[list[str], list[str], set[str]]:
    """(metric names, functions called, labels named in selectors and groupings) of one PromQL expression."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = set()
    for selector in re.findall(r"\{([^}]*)\}", s):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", selector))
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, $__range included
    for group in re.findall(GROUPING, s):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    s = re.sub(GROUPING, " ", s)
    names, calls = [], []
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if call:
            calls.append(word)
        elif word not in KEYWORDS:
            names.append(word)
    return names, calls, labels


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return [p for p in out if p["type"] != "row"]


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_dashboard_is_valid_json_with_unique_ids_and_no_overlaps():
    dash = _dashboard()  # raises on invalid JSON
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_promql_expression_names_only_the_services_metrics():
    dash = _dashboard()
    exprs = [(p["title"], e) for p in _panels(dash) for e in _exprs(p)]
    assert len(exprs) >= 15
    used = set()
    for title, expr in exprs:
        names, calls, labels = parse_promql(expr)
        assert names, f"{title}: {expr!r} names no metric"
        unknown = [n for n in names if n not in SAMPLES]
        assert not unknown, f"{title}: {expr!r}: {unknown} are not metrics the services export"
        assert set(calls) <= FUNCTIONS, f"{title}: {expr!r}: unknown functions {set(calls) - FUNCTIONS}"
        allowed = set().union(*(SAMPLES[n] for n in names))
        assert labels <= allowed, f"{title}: {expr!r}: labels {labels - allowed} are not on {names}"
        used |= set(names)
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
            assert label in SAMPLES[metric] - TARGET_LABELS, query
    families = {re.sub(r"_(total|bucket|sum|count|info)$", "", n) for n in used}
    assert families == set(METRICS), f"metrics with no panel: {set(METRICS) - families}"


def test_parser_is_not_a_rubber_stamp():
    names, calls, labels = parse_promql(
        'histogram_quantile(0.99, sum by (le) (rate(dlsr_score_seconds_bucket{source=~"$source"}[5m]))) or vector(0)'
    )
    assert names == ["dlsr_score_seconds_bucket"] and calls == ["histogram_quantile", "sum", "rate", "vector"]
    assert labels == {"le", "source"}
    names, _, _ = parse_promql("sum(rate(dlsr_image_total[5m])) / 1e3")
    assert names == ["dlsr_image_total"] and "dlsr_image_total" not in SAMPLES  # a typo is caught


def _panel_with(dash: dict, *needles: str) -> dict:
    for panel in _panels(dash):
        joined = " ".join(_exprs(panel))
        if all(n in joined for n in needles):
            return panel
    pytest.fail(f"no panel whose queries contain all of {needles}")


def test_the_panels_operators_need_are_there():
    dash = _dashboard()
    drift = _panel_with(dash, "dlsr_drift_raised", "by (source)")
    assert drift["type"] in ("state-timeline", "status-history", "stat", "table")
    ood = _panel_with(dash, "rate(dlsr_ood_total", "rate(dlsr_images_total", "by (source)", "dlsr_alpha")
    assert ood["fieldConfig"]["defaults"]["unit"] == "percentunit"
    _panel_with(dash, "rate(dlsr_images_total", "sum by (reason) (rate(dlsr_dead_letters_total")
    _panel_with(dash, "dlsr_consumer_lag", "by (partition)")
    for metric in ("dlsr_score_seconds_bucket", "dlsr_end_to_end_latency_seconds_bucket"):
        _panel_with(dash, f"histogram_quantile(0.5, sum by (le) (rate({metric}",
                    f"histogram_quantile(0.99, sum by (le) (rate({metric}")
    model = _panel_with(dash, "dlsr_model_info", "by (version)")
    assert model["targets"][0]["legendFormat"] == "{{version}}"
    _panel_with(dash, "dlsr_trainer_jobs_total", "by (outcome)")
    _panel_with(dash, "dlsr_notify_posts_total", "by (outcome)")


def test_panels_use_the_datasource_variable():
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dash):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    used = " ".join(e for p in _panels(dash) for e in _exprs(p))
    for name in re.findall(r"\$(\w+)", used):
        assert name.startswith("__") or name in variables, f"${name} is not a dashboard variable"


def test_compose_provisions_the_datasource_and_the_dashboard():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    grafana = services["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{source} is missing"
            mounts[target] = (ROOT / source).resolve()
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (GRAFANA / "provisioning").resolve()
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlparse(datasource["url"])
    assert datasource["type"] == "prometheus" and url.hostname in services
    published = [p.rsplit(":", 1)[-1] for p in services[url.hostname]["ports"]]
    assert str(url.port) in published
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dlsr.yml").read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
