"""Checks that a set of DLSR_ environment variables (a compose service's, a Kubernetes container's) are settings.

Shared by tests/test_compose.py and tests/test_k8s.py: every `DLSR_<SECTION>__<FIELD>` must name a field of
`Settings`, and the values together must parse (the error names the field otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from unittest import mock

from dlsr_monitor.config import Settings
from dlsr_monitor.config.settings import CONFIG_FILE_ENV


def dlsr_vars(env: Mapping[str, str]) -> dict[str, str]:
    """The DLSR_ settings variables of `env` (DLSR_CONFIG_FILE names a file, not a setting)."""
    return {k: str(v) for k, v in env.items() if k.startswith("DLSR_") and k != CONFIG_FILE_ENV}


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """One line per DLSR_ variable of `env` that names no settings field."""
    problems = []
    for key in dlsr_vars(env):
        section, _, field = key.removeprefix("DLSR_").lower().partition("__")
        if section not in Settings.model_fields:
            problems.append(f"{key}: no section {section!r}")
            continue
        model = Settings.model_fields[section].annotation
        if field not in model.model_fields:
            problems.append(f"{key}: no field {field!r} in {section}")
    return problems


def settings_from(env: Mapping[str, str]) -> Settings:
    """Settings built from exactly the DLSR_ variables of `env` (the process's own are hidden meanwhile).

    Reads no `.env` file; a `dlsr.toml` in the working directory would still count, so callers run in a clean
    directory.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DLSR_")}
    with mock.patch.dict(os.environ, {**clean, **dlsr_vars(env)}, clear=True):
        return Settings(_env_file=None)


def check_settings_env(env: Mapping[str, str], where: str) -> Settings:
    """Fails (AssertionError naming `where`) unless every DLSR_ variable is a setting and the values parse."""
    problems = unknown_settings(env)
    assert not problems, f"{where}: " + "; ".join(problems)
    try:
        return settings_from(env)
    except Exception as exc:  # pydantic's ValidationError names the field and the value
        raise AssertionError(f"{where}: the DLSR_ values do not parse: {exc}") from exc
