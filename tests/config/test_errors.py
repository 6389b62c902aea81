"""A bad setting is one line naming the field, the env var, the value given and what is allowed."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from dlsr_monitor.config import Settings, settings_error_lines


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("DLSR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _lines(monkeypatch, **env: str) -> list[str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as info:
        Settings()
    return settings_error_lines(info.value, Settings)


def test_literal_choice_names_field_env_and_allowed_values(monkeypatch):
    (line,) = _lines(monkeypatch, DLSR_KAFKA__SECURITY_PROTOCOL="TLS")
    assert line.startswith("invalid setting kafka.security_protocol (env DLSR_KAFKA__SECURITY_PROTOCOL)")
    assert "'TLS'" in line
    for allowed in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        assert allowed in line


def test_optional_literal_drops_pydantic_union_tags(monkeypatch):
    (line,) = _lines(monkeypatch, DLSR_KAFKA__SASL_MECHANISM="MD5")
    assert "kafka.sasl_mechanism (env DLSR_KAFKA__SASL_MECHANISM)" in line
    assert "literal" not in line.split(":")[0].lower()
    assert "SCRAM-SHA-256" in line


def test_numeric_bound_in_another_section(monkeypatch):
    (line,) = _lines(monkeypatch, DLSR_MODEL__ALPHA="1.5")
    assert "model.alpha (env DLSR_MODEL__ALPHA)" in line and "'1.5'" in line and "less than 1" in line


def test_every_bad_field_gets_its_own_single_line(monkeypatch):
    lines = _lines(monkeypatch, DLSR_MODEL__ALPHA="x", DLSR_REDIS__URL="http://h", DLSR_KAFKA__TOPIC_PARTITIONS="0")
    assert len(lines) == 3
    assert all("\n" not in line for line in lines)
    joined = " ".join(lines)
    for env in ("DLSR_MODEL__ALPHA", "DLSR_REDIS__URL", "DLSR_KAFKA__TOPIC_PARTITIONS"):
        assert env in joined


def test_unknown_key_lists_the_known_ones(monkeypatch):
    (line,) = _lines(monkeypatch, DLSR_MODEL__ALHPA="0.1")
    assert "model.alhpa (env DLSR_MODEL__ALHPA)" in line
    assert "unknown setting" in line and "alpha" in line


def test_secret_values_are_not_echoed():
    from pydantic import BaseModel

    class M(BaseModel):
        password: int

    with pytest.raises(ValidationError) as info:
        M(password="hunter2")
    (line,) = settings_error_lines(info.value, M)
    assert "hunter2" not in line and "password" in line
