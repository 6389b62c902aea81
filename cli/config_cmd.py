"""`dlsr config show`: the effective settings with secrets masked."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="Inspect the effective settings")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="Print the effective settings (secrets masked) as JSON")
    show.set_defaults(handler=_show)


def _show(args: argparse.Namespace, settings) -> int:
    # SecretStr dumps as '**********' in JSON mode, so secrets never reach the terminal.
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
