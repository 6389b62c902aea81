"""Decoding of Redis replies (bytes or str, possibly missing or malformed) into plain values."""

from __future__ import annotations

from typing import Any


def as_str(v: Any) -> str | None:
    """bytes / str / number -> str; None stays None."""
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)


def as_int(v: Any, default: int = 0) -> int:
    """An integer field, `default` when missing or malformed."""
    try:
        return int(float(as_str(v) or default))
    except ValueError:
        return default


def as_float(v: Any, default: float = 0.0) -> float:
    """A float field, `default` when missing or malformed."""
    try:
        return float(as_str(v) or default)
    except ValueError:
        return default


def as_dict(raw: dict[Any, Any]) -> dict[str | None, str | None]:
    """A hash reply with str keys and values."""
    return {as_str(k): as_str(v) for k, v in raw.items()}
