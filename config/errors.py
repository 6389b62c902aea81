"""Errors the CLI turns into one line and a non-zero exit (no traceback)."""


class StartupError(RuntimeError):
    """A required server (Kafka, Redis) or input is unavailable; the message says which and what to do."""


def settings_error_lines(exc: Exception) -> list[str]:
    """One line per invalid field of a pydantic ValidationError: field, env var, what is allowed."""
    lines = []
    for err in getattr(exc, "errors", lambda: [])():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("",)]
        field = ".".join(loc) or "settings"
        env = "DLSR_" + "__".join(p.upper() for p in loc)
        lines.append(f"invalid setting {field} (env {env}): {err.get('msg', 'invalid value')}")
    return lines or [f"invalid settings: {exc}"]
