"""`dlsr` subcommands: dashboard, alerts, demo. Heavy imports (torch, kafka, redis) stay inside handlers so --help is fast."""

from __future__ import annotations

import argparse
from pathlib import Path

SEVERITIES = ("info", "warning", "critical")
ALERT_KINDS = ("ood", "drift", "model")


def register(sub: argparse._SubParsersAction) -> None:
    """Add these subcommands; each sets `handler(args, settings) -> int`."""
    dash = sub.add_parser(
        "dashboard",
        help="Live terminal view of sources, drift, model and monitors (reads Redis only)",
        description="Live terminal view read from Redis only: per source the image rate, OOD rate against alpha, "
        "drift state and an OOD-rate sparkline; the live model version, threshold and alpha; the running "
        "monitors with rate and consumer lag; the last alerts. Press q or Ctrl-C to quit.",
    )
    dash.add_argument("--once", action="store_true", help="Print one frame and exit (for scripts and tests)")
    dash.add_argument(
        "--refresh",
        type=float,
        default=None,
        metavar="S",
        help="Seconds between refreshes (default: settings)",
    )
    dash.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="Quit by itself after S seconds (default: never)",
    )
    dash.set_defaults(handler=_dashboard)

    alerts = sub.add_parser(
        "alerts",
        usage="%(prog)s [--source NAME] [--kind KIND] [--min-severity LEVEL] [--json]\n"
        "                   [--from-beginning | --since WHEN] [--group GROUP] [--max N] [--timeout S]\n"
        "       %(prog)s ack SOURCE [--note NOTE] [--by NAME]",
        help="Follow dlsr.alerts with filters; human lines or --json (`ack SOURCE` acknowledges a drift)",
        description="Follow the alerts topic. Each run joins its own consumer group (a fresh id), so every "
        "subscriber sees every alert. Severity: ood=warning, drift raised=critical, drift cleared=info, "
        "model live=info, model load_failed=critical.",
    )
    add_alert_filters(alerts)
    alerts.add_argument(
        "--json", action="store_true", help="One JSON object per line (with a severity field)"
    )
    start = alerts.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning", action="store_true", help="Replay the topic from its first alert, then follow"
    )
    start.add_argument(
        "--since",
        type=_since,
        default=None,
        metavar="WHEN",
        help="Replay from this time, then follow: a duration back (90s, 15m, 2h, 1d) or an ISO time "
        "(2025-06-01T12:00, UTC unless it has an offset)",
    )
    alerts.add_argument("--group", default=None, help="Consumer group id (default: a fresh one per run)")
    alerts.add_argument("--max", type=int, default=None, metavar="N", help="Exit after printing N alerts")
    alerts.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="Exit after S seconds without an alert that passes the filters",
    )
    alerts.set_defaults(handler=_alerts, _prog=alerts.prog)
    # `dlsr alerts ack SOURCE`: an optional sub-action, so every `dlsr alerts --source ... --json` still works.
    asub = alerts.add_subparsers(dest="alerts_command", required=False, metavar="{ack}", prog=alerts.prog)
    ack = asub.add_parser(
        "ack",
        help="Acknowledge a source's raised drift: who, when, a note (shown on the dashboard)",
        description="Record who acknowledged SOURCE's raised drift and when (Redis). The dashboard's drift panel "
        "shows it beside the raise; once the drift clears the acknowledgement lapses, and a later raise needs a "
        "new one. Fails (exit 1) when SOURCE's drift is not raised.",
    )
    ack.add_argument("source", metavar="SOURCE", help="The source whose raised drift you acknowledge")
    ack.add_argument("--note", default="", help="What you are doing about it (shown on the dashboard)")
    ack.add_argument("--by", default=None, help="Who acknowledges (default: the OS user)")
    ack.set_defaults(handler=_alerts_ack)

    demo = sub.add_parser(
        "demo",
        help="The whole product on an embedded default: broker, Redis, model, monitor, dashboard",
        description="Starts what is not running (a Tansu broker in memory; Redis at the configured URL if "
        "reachable, else an embedded one), fits a quick model on a CIFAR-10 subset, starts a monitor, streams "
        "CIFAR-10 test images from source cam-id, OOD images (Tiny-ImageNet, MNIST) from cam-ood and corrupted "
        "CIFAR-10 images from cam-corrupt, shows the dashboard, prints a summary and stops what it started.",
    )
    demo.add_argument(
        "--id-data",
        type=Path,
        default=None,
        metavar="PATH",
        help="CIFAR-10 folder with train.zip and test.zip (default: ../shared/data/cifar10)",
    )
    demo.add_argument(
        "--ood-data",
        type=Path,
        default=None,
        metavar="PATH",
        help="Folder with OOD sets tiny_imagenet/ and mnist/, or one OOD zip/folder (default: ../shared/data)",
    )
    demo.add_argument(
        "--quick", action="store_true", help="Reduced mode: fewer images, smaller input (for tests)"
    )
    demo.add_argument("--images", type=int, default=None, metavar="N", help="Images streamed per source")
    demo.add_argument("--no-dashboard", action="store_true", help="Do not draw the live dashboard")
    demo.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="Also write the summary as JSON"
    )
    demo.add_argument(
        "--stream-only",
        action="store_true",
        help="Only produce the three sources into the configured input topic (the compose demo producer)",
    )
    demo.set_defaults(handler=_demo)


def _dashboard(args: argparse.Namespace, settings) -> int:
    from dlsr_monitor.console.dashboard import run_dashboard

    return run_dashboard(settings, once=args.once, refresh_s=args.refresh, duration_s=args.duration)


def _alerts(args: argparse.Namespace, settings) -> int:
    from dlsr_monitor.console.subscriber import AlertFilter, follow_alerts

    flt = AlertFilter(
        sources=frozenset(args.source or ()), kinds=frozenset(args.kind or ()), min_severity=args.min_severity
    )
    return follow_alerts(
        settings.kafka,
        flt,
        as_json=args.json,
        from_beginning=args.from_beginning,
        since=args.since,
        group_id=args.group,
        max_alerts=args.max,
        idle_timeout_s=args.timeout,
    )


def _since(text: str) -> float:
    from dlsr_monitor.console.subscriber import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:  # argparse turns it into one line naming the option
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--since {text!r} ")) from None


def _alerts_ack(args: argparse.Namespace, settings) -> int:
    import getpass
    import sys
    from datetime import UTC, datetime

    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.console.ack import AckError, acknowledge

    redis = connect_redis(settings.redis)
    by = args.by or getpass.getuser()
    try:
        res = acknowledge(redis, Keys.of(settings.redis), args.source, by=by, note=args.note)
    except AckError as exc:
        print(f"dlsr: error: {exc}", file=sys.stderr)
        return 1
    since = (
        datetime.fromtimestamp(res.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if res.since else "an unknown time"
    )
    again = f" (replaces {res.replaced.by}'s)" if res.replaced is not None else ""
    print(
        f"acknowledged drift #{res.seq} on {res.source}, raised since {since}, by {by}{again}"
        + (f": {args.note}" if args.note else "")
    )
    return 0


def _demo(args: argparse.Namespace, settings) -> int:
    from dlsr_monitor.demo.run import DemoOptions, run_demo

    opts = DemoOptions.from_settings(
        settings,
        id_data=args.id_data,
        ood_data=args.ood_data,
        quick=args.quick,
        images=args.images,
        dashboard=not args.no_dashboard,
        json_path=args.json,
        stream_only=args.stream_only,
    )
    return run_demo(settings, opts)


def add_alert_filters(p: argparse.ArgumentParser) -> None:
    """--source / --kind / --min-severity: the alert filters `dlsr alerts` and `dlsr notify` share."""
    p.add_argument(
        "--source", action="append", default=None, metavar="NAME", help="Only this source (repeatable)"
    )
    p.add_argument(
        "--kind", action="append", choices=ALERT_KINDS, default=None, help="Only this kind (repeatable)"
    )
    p.add_argument(
        "--min-severity",
        choices=SEVERITIES,
        default="info",
        help="Drop alerts below this severity (default: info)",
    )
