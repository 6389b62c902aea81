"""docker-compose.yml: valid against the Compose Specification schema and consistent with the settings model.

No Docker engine runs here, so the file is checked statically: the vendored schema (scripts/compose-spec/, from
the PyPI package docker-compose 1.29.2, see SOURCE.md there), every DLSR_ variable is a real setting with a valid
value, and the service names match the Kafka bootstrap and Redis URLs.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from dlsr_monitor.config import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "scripts" / "compose-spec" / "compose_spec.json").read_text())
FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _validator() -> jsonschema.Draft201909Validator:
    # The file's "$schema" spells the 2019-09 draft with a non-canonical URI; name the draft explicitly.
    jsonschema.Draft201909Validator.check_schema(SCHEMA)
    return jsonschema.Draft201909Validator(SCHEMA, format_checker=jsonschema.Draft201909Validator.FORMAT_CHECKER)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


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
    assert {"kafka", "redis", "monitor", "trainer", "dashboard", "producer"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["redis"]["image"].startswith("redis:")
    for name in ("kafka", "redis", "monitor"):
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


def test_every_dlsr_variable_is_a_valid_setting(monkeypatch):
    seen = 0
    for name in FILES:
        for svc_name, svc in _load(name)["services"].items():
            env = {k: v for k, v in _env(svc).items() if k.startswith("DLSR_")}
            for key in env:
                section, _, field = key.removeprefix("DLSR_").lower().partition("__")
                assert section in Settings.model_fields, f"{name}:{svc_name}: {key}: no section {section!r}"
                model = Settings.model_fields[section].annotation
                assert field in model.model_fields, f"{name}:{svc_name}: {key}: no field {field!r} in {section}"
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            Settings()  # values parse (raises with the field named otherwise)
            for key in env:
                monkeypatch.delenv(key)
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


def test_monitor_healthcheck_reads_the_real_heartbeat_key():
    from dlsr_monitor.common.keys import Keys

    check = " ".join(_load("docker-compose.yml")["services"]["monitor"]["healthcheck"]["test"])
    assert f"'{Keys(Settings().redis.prefix).heartbeats()}'" in check
