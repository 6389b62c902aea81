"""Errors the CLI turns into one line and a non-zero exit (no traceback)."""

from __future__ import annotations

import re
from typing import Any


class StartupError(RuntimeError):
    """A required server (Kafka, Redis) or input is unavailable; the message says which and what to do."""


class ConfigFileError(ValueError):
    """The TOML settings file is missing or malformed (or a value no settings source can read); the message
    names the file or the setting and the fix."""


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
        if err.get("type") in _JSON_KINDS and isinstance(given, str):
            msg = _json_hint(given, _JSON_KINDS[err["type"]])
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
        origin = getattr(model, "setting_origin", None)
        source = origin(parts) if callable(origin) else None
        if source:  # the value came from the TOML file: name the file and the key, not an env var
            lines.append(f"{source}: {field}{got}: {msg}")
        else:
            lines.append(f"invalid setting {field} (env {env}){got}: {msg}")
    return lines or [f"invalid settings: {exc}"]


# pydantic error types of values that must be JSON in an env var -> what kind of JSON
_JSON_KINDS = {"list_type": "list", "tuple_type": "list", "set_type": "list", "frozen_set_type": "list",
               "dict_type": "object", "model_type": "object", "model_attributes_type": "object"}  # fmt: skip


def _json_hint(given: str, kind: str) -> str:
    """'not a JSON list; write it as [1, 2]': the value the user meant, as JSON, when it can be guessed."""
    import json

    items = [x.strip() for x in given.strip().strip("[]{}()").split(",") if x.strip()]

    def scalar(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return text.strip("'\"")

    example: Any
    if kind == "list":
        example = [scalar(x) for x in items] or [1, 2]
    else:
        pairs = [re.split(r"\s*[=:]\s*", x, maxsplit=1) for x in items]
        example = {p[0].strip("'\""): scalar(p[1]) for p in pairs if len(p) == 2} or {"key": 1}
    return f"not a JSON {kind}; write it as '{json.dumps(example)}'"
