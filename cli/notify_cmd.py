"""`dlsr notify`: alerts to Slack-compatible or generic JSON webhooks. Heavy imports stay inside the handler."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlsplit

from dlsr_monitor.cli.logs import LEVELS
from dlsr_monitor.cli.ops_cmd import add_alert_filters


def register(sub: argparse._SubParsersAction) -> None:
    """Add `notify`; it sets `handler(args, settings) -> int`."""
    p = sub.add_parser(
        "notify",
        help="Post alerts from dlsr.alerts to webhooks (Slack-compatible or JSON), with retries and de-duplication",
        description="Follow the alerts topic in the notifier's consumer group (DLSR_NOTIFY__GROUP_ID) and post "
        "every alert that passes the filters to each webhook: Slack-compatible (text + blocks) or generic JSON "
        "(the alert plus severity; a cleared drift says which raised alert it resolves). 5xx, 429 and network "
        "errors are retried with capped exponential backoff; a post given up on is dead-lettered to the DLQ "
        "topic. Posted alert ids are kept in Redis, so a replay after a crash posts nothing twice. SIGTERM / "
        "Ctrl-C finishes the alert in hand, commits and exits 0. Settings: DLSR_NOTIFY__*.",
    )
    p.add_argument(
        "--webhook",
        action="append",
        default=None,
        metavar="URL",
        help="Post here (repeatable; replaces DLSR_NOTIFY__WEBHOOKS)",
    )
    p.add_argument(
        "--payload", choices=("slack", "json"), default=None, help="Payload style (default: settings)"
    )
    add_alert_filters(p)
    p.add_argument("--log-level", default="INFO", choices=LEVELS)
    p.set_defaults(handler=_notify)


def _bad_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in ("http", "https") or not parts.netloc


def _notify(args: argparse.Namespace, settings) -> int:
    urls = args.webhook or settings.notify.webhooks
    if not urls:
        print(
            "dlsr notify: error: no webhook: pass --webhook URL or set DLSR_NOTIFY__WEBHOOKS", file=sys.stderr
        )
        return 2
    bad = [u for u in urls if _bad_url(u)]
    if bad:
        print(f"dlsr notify: error: not an http(s) URL: {bad[0]!r}", file=sys.stderr)
        return 2

    import threading

    from kafka.errors import KafkaError
    from redis.exceptions import RedisError

    from dlsr_monitor.cli.logs import configure_logging
    from dlsr_monitor.common.connections import install_signal_handlers
    from dlsr_monitor.common.streams import SinkError
    from dlsr_monitor.console.notify import run_notify
    from dlsr_monitor.console.subscriber import AlertFilter

    configure_logging(settings, args.log_level)
    flt = AlertFilter(
        sources=frozenset(args.source or ()), kinds=frozenset(args.kind or ()), min_severity=args.min_severity
    )
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        run_notify(settings, webhooks=urls, flt=flt, payload=args.payload, stop=stop)
    except (SinkError, KafkaError, RedisError) as exc:
        # An outage longer than its budget: the alert in hand is uncommitted and replayed on restart.
        print(f"dlsr notify: stopped: {type(exc).__name__}: {exc} (uncommitted alerts are replayed on restart)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0
