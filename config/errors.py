"""Errors the CLI turns into one line and a non-zero exit (no traceback)."""

from __future__ import annotations

from typing import Any


class StartupError(RuntimeError):
    """A required server (Kafka, Redis) or input is unavailable; the message says which and what to do."""


class ConfigFileError(ValueError):
    """The TOML settings file is missing or malformed; the message names the file and the fix."""


_ENV_PREFIX = "DLSR_"


def _field_path(loc: tuple[Any, ...], model: Any) -> list[str]:
    """Keep the parts of a pydantic error location that are field names (drop union tags, list indexes)."""
    path: list[str] = []
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(part, str) or fields is None or part not in fields:
            continue
        path.append(part)
        model = fields[part].annotation
    return path


def _fields_at(parts: list[str], model: Any) -> list[str]:
    """Field names of the model reached by following `parts` from the root model."""
    for part in parts:
        fields = getattr(model, "model_fields", None) or {}
        model = fields[part].annotation if part in fields else None
    return list(getattr(model, "model_fields", None) or {})


def settings_error_lines(exc: Exception, model: Any = None) -> list[str]:
    """One line per invalid field of a pydantic ValidationError: field, env var, value given, what is allowed.

    Args:
        exc: the ValidationError raised while building the settings.
        model: the root settings class, used to tell field names from pydantic's union/type tags.
    """
    lines = []
    for err in getattr(exc, "errors", lambda: [])():
        loc = tuple(err.get("loc", ()))
        parts = _field_path(loc, model) if model is not None else [str(p) for p in loc if isinstance(p, str)]
        known = ""
        if err.get("type") == "extra_forbidden" and loc:
            known = ", ".join(sorted(_fields_at(parts, model)))
            parts = [*parts, str(loc[-1])]
        field = ".".join(parts) or "settings"
        env = _ENV_PREFIX + "__".join(p.upper() for p in parts) if parts else "DLSR_<SECTION>__<FIELD>"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        given = err.get("input")
        got = ""
        secret = any(w in field for w in ("password", "secret", "token"))
        if (
            not secret
            and err.get("type") not in ("unknown_setting", "extra_forbidden")
            and isinstance(given, str | int | float)
        ):
            got = f" (got {given!r})"
        if err.get("type") == "extra_forbidden":
            msg = (
                f"unknown setting; known here: {known}"
                if known
                else "unknown setting (see `dlsr config show`)"
            )
        lines.append(f"invalid setting {field} (env {env}){got}: {msg}")
    return lines or [f"invalid settings: {exc}"]
