"""`dlsr` subcommands: dashboard, alerts, demo. Heavy imports (torch, kafka, redis) stay inside handlers so --help is fast."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add these subcommands; each sets `handler(args, settings) -> int`."""
