"""`dlsr config show`: effective settings, secrets masked."""

from __future__ import annotations

import json
import os

import pytest

from dlsr_monitor.cli.main import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_show_prints_effective_settings_with_secrets_masked(monkeypatch, capsys):
    monkeypatch.setenv("DLSR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("DLSR_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("DLSR_KAFKA__SASL_PASSWORD", "kafka-secret")
    monkeypatch.setenv("DLSR_REDIS__PASSWORD", "redis-secret")
    monkeypatch.setenv("DLSR_REDIS__URL", "redis://user:url-secret@cache:6379/0")
    monkeypatch.setenv("DLSR_MODEL__ALPHA", "0.03")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    for secret in ("kafka-secret", "redis-secret", "url-secret"):
        assert secret not in out
    data = json.loads(out)
    assert data["model"]["alpha"] == 0.03
    assert data["kafka"]["sasl_password"] == "**********"
    assert data["redis"]["url"] == "redis://user:**********@cache:6379/0"
    assert set(data) >= {"kafka", "redis", "model", "monitor", "trainer", "dashboard", "demo"}


def test_env_format_round_trips_through_the_settings(monkeypatch, capsys):
    monkeypatch.setenv("DLSR_REDIS__PREFIX", "roundtrip")
    assert main(["config", "show", "--format", "env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "DLSR_REDIS__PREFIX=roundtrip" in lines
    # Every line it prints is a valid setting: feeding them back builds the same settings.
    for line in lines:
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, value)
    assert main(["config", "show", "--format", "env"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
