"""`dlsr config show`: the effective settings with secrets masked."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

MASK = "**********"
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@/\s]+)(?P<tail>@)", re.I)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="Inspect the effective settings",
        description="Settings come from (highest first): environment variables DLSR_<SECTION>__<FIELD>, a .env "
        "file in the working directory, a TOML file (DLSR_CONFIG_FILE, default ./dlsr.toml), the defaults.",
    )
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser(
        "show",
        help="Print the effective settings (secrets masked)",
        description="Print the effective settings with passwords (and passwords inside URLs) masked.",
    )
    show.add_argument(
        "--format", choices=("json", "env"), default="json", help="json (default) or env (DLSR_... lines)"
    )
    show.set_defaults(handler=_show)


def masked_settings(settings) -> dict[str, Any]:
    """The settings as JSON-able data; SecretStr fields and URL passwords replaced by a mask."""
    # SecretStr dumps as '**********' in JSON mode; a password typed into a URL needs masking by hand.
    return _mask_urls(settings.model_dump(mode="json"))


def _mask_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_urls(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", value)
    return value


def env_lines(data: dict[str, Any], prefix: str = "DLSR_") -> list[str]:
    """`DLSR_SECTION__FIELD=value` lines for a nested settings dict (None values are left out)."""
    lines = []
    for key, value in data.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, dict):
            lines += env_lines(value, name + "__")
        elif value is not None:
            text = json.dumps(value) if isinstance(value, list | bool) else str(value)
            lines.append(f"{name}={text}")
    return lines


def _show(args: argparse.Namespace, settings) -> int:
    data = masked_settings(settings)
    if args.format == "env":
        print("\n".join(env_lines(data)))
    else:
        print(json.dumps(data, indent=2))
    return 0
