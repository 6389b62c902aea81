"""docker-compose.yml: valid against the Compose Specification schema and consistent with the settings model.

No Docker engine runs here, so the file is checked statically: the vendored schema (scripts/compose-spec/, from
the PyPI package docker-compose 1.29.2, see SOURCE.md there), every DLSR_ variable is a real setting with a valid
value, the service names match the Kafka bootstrap and Redis URLs, the health checks ask each service's own
/healthz (the check command itself is run against a local stub), and Prometheus scrapes every DLSR service.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from dlsr_monitor.config import Settings
from tests._settings_env import check_settings_env

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "scripts" / "compose-spec" / "compose_spec.json").read_text())
FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _validator() -> jsonschema.Draft201909Validator:
    # The file's "$schema" spells the 2019-09 draft with a non-canonical URI; name the draft explicitly.
    jsonschema.Draft201909Validator.check_schema(SCHEMA)
    return jsonschema.Draft201909Validator(SCHEMA, format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER)


def _interpolate(value: str) -> str:
    # What `docker compose` makes of ${VAR:-default} / ${VAR-default} / ${VAR} with VAR unset: the default.
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _interpolate(str(v)) for k, v in env.items()}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", FILES)
def test_file_is_valid_against_the_compose_schema(name):
    errors = sorted(_validator().iter_errors(_load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_check_is_not_a_rubber_stamp():
    bad = copy.deepcopy(_load("docker-compose.yml"))
    bad["services"]["monitor"]["depends_on"]["kafka"]["condition"] = 42
    bad["services"]["redis"]["helthcheck"] = {}
    assert len(list(_validator().iter_errors(bad))) >= 2


def test_services_and_start_order():
    services = _load("docker-compose.yml")["services"]
    assert {"kafka", "redis", "monitor", "trainer", "notify", "prometheus", "grafana", "dashboard", "producer"} <= set(
        services
    )
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["redis"]["image"].startswith("redis:")
    for name in ("kafka", "redis", "monitor", "trainer", "notify", "prometheus"):
        assert "healthcheck" in services[name], name
    for name in ("monitor", "trainer"):
        deps = services[name]["depends_on"]
        assert deps["kafka"]["condition"] == deps["redis"]["condition"] == "service_healthy"
    assert services["dashboard"]["tty"] is True and services["dashboard"]["stdin_open"] is True
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but it has no check"


def test_artifact_store_is_a_shared_volume():
    doc = _load("docker-compose.yml")
    assert "artifacts" in doc["volumes"]
    for name in ("monitor", "trainer"):
        svc = doc["services"][name]
        store = _env(svc)["DLSR_MODEL__ARTIFACT_STORE"]
        assert f"artifacts:{store}" in svc["volumes"], name


def test_every_dlsr_variable_is_a_valid_setting():
    seen = 0
    base = _load("docker-compose.yml")["services"]
    for name in FILES:
        for svc_name, svc in _load(name)["services"].items():
            env = {k: v for k, v in _env(svc).items() if k.startswith("DLSR_")}
            # An override file's variables are checked on top of the service's own in the main file.
            full = {**_env(base.get(svc_name, {})), **env} if name != "docker-compose.yml" else env
            check_settings_env(full, f"{name}:{svc_name}")  # names are fields, values parse
            seen += len(env)
    assert seen >= 8


def test_service_names_match_bootstrap_and_redis_urls():
    services = _load("docker-compose.yml")["services"]
    for name in ("monitor", "trainer", "dashboard", "producer"):
        env = _env(services[name])
        for server in env.get("DLSR_KAFKA__BOOTSTRAP_SERVERS", "").split(","):
            if server:
                host, _, port = server.partition(":")
                assert host in services, f"{name}: bootstrap host {host} is not a service"
                advertised = services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
                assert f"//{host}:{port}" in advertised, f"{name}: {server} is not what {host} advertises"
        url = env.get("DLSR_REDIS__URL")
        assert url, f"{name} has no DLSR_REDIS__URL"
        assert urlparse(url).hostname in services, f"{name}: Redis host of {url} is not a service"


def test_gpu_variant_reserves_devices():
    gpu = _load("docker-compose.gpu.yml")["services"]
    base = _load("docker-compose.yml")["services"]
    for name in ("monitor", "trainer"):
        assert name in base
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert gpu[name]["environment"]["DLSR_MODEL__DEVICE"].startswith("cuda")


def test_dockerfile_and_env_example_name_only_real_settings(monkeypatch):
    names = set(re.findall(r"\b(DLSR_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text()))
    names |= set(re.findall(r"^#?\s*(DLSR_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert names
    for key in names:
        section, _, field = key.removeprefix("DLSR_").lower().partition("__")
        assert field in Settings.model_fields[section].annotation.model_fields, key


METRICS_SERVICES = ("monitor", "trainer", "notify")


class _Stub(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _run_check(test: list[str], port: int) -> int:
    assert test[:2] == ["CMD", "python"], test  # exec form: the image's python, no shell, no curl
    env = {**os.environ, "DLSR_METRICS__PORT": str(port)}
    return subprocess.run([sys.executable, *test[2:]], env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("name", METRICS_SERVICES)
def test_service_serves_metrics_and_its_healthcheck_asks_its_own_healthz(name):
    svc = _load("docker-compose.yml")["services"][name]
    port = int(_env(svc)["DLSR_METRICS__PORT"])
    test = svc["healthcheck"]["test"]
    joined = " ".join(test)
    assert "/healthz" in joined and "127.0.0.1" in joined, joined  # this container's own endpoint
    assert "redis" not in joined.lower(), "the check must not count other containers' heartbeats in Redis"
    # The command as compose runs it: 0 on 200, non-zero on 503 and when nothing listens.
    server = http.server.HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Stub.status = 200
        assert _run_check(test, server.server_port) == 0
        _Stub.status = 503
        assert _run_check(test, server.server_port) != 0
    finally:
        server.shutdown()
        server.server_close()
        _Stub.status = 200
    assert _run_check(test, server.server_port) != 0  # closed port
    assert 0 < port < 65536


def test_prometheus_scrapes_every_dlsr_service():
    services = _load("docker-compose.yml")["services"]
    prom = services["prometheus"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"] if v.startswith("./")}
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert mounted[config_path] == "./deploy/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in METRICS_SERVICES:
        port = int(_env(services[name])["DLSR_METRICS__PORT"])
        found = [
            sd for job in jobs.values() for sd in job.get("dns_sd_configs", []) if name in sd["names"]
        ]
        assert found, f"no scrape job discovers {name}"
        # Type A: one target per container, so every replica of `--scale monitor=N` is scraped.
        assert all(sd["type"] == "A" and sd["port"] == port for sd in found), (name, found)
        for sd in found:
            for host in sd["names"]:
                assert host in services, f"{host} is not a compose service"
    grafana = services["grafana"]
    assert grafana["depends_on"]["prometheus"]["condition"] in ("service_started", "service_healthy")
