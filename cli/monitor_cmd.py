"""`dlsr` subcommands: monitor. Heavy imports (torch, kafka, redis) stay inside handlers so --help is fast."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add these subcommands; each sets `handler(args, settings) -> int`."""
    p = sub.add_parser(
        "monitor",
        help="Run the streaming monitor (images in from Kafka; scores, alerts, dead letters out)",
        description="Consume encoded images from the input topic, score them in batches with the live DLSR "
        "model from the registry, keep per-source windows, drift state and heartbeats in Redis, and produce one "
        "score record per image, OOD / drift / model alerts and dead letters. Run several in one consumer group "
        "to scale out. SIGTERM / Ctrl-C finishes the batch in flight, commits and exits 0. Every knob is a "
        "setting: DLSR_MONITOR__*, DLSR_KAFKA__*, DLSR_REDIS__*, DLSR_MODEL__* (see `dlsr config show`).",
    )
    p.add_argument("--instance-id", default=None, help="Name in heartbeats (default: host-pid)")
    p.add_argument("--batch-max", type=int, default=None, help="Most images per scoring batch")
    p.add_argument("--batch-wait-ms", type=int, default=None, help="Longest wait to fill a batch")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(handler=_monitor)


def _monitor(args: argparse.Namespace, settings) -> int:
    from dlsr_monitor.cli.logs import configure_logging

    configure_logging(settings, args.log_level, instance=args.instance_id or settings.monitor.instance_id)
    updates = {
        k: v
        for k, v in {
            "instance_id": args.instance_id,
            "batch_max": args.batch_max,
            "batch_wait_ms": args.batch_wait_ms,
        }.items()
        if v is not None
    }
    if updates:
        settings = settings.model_copy(update={"monitor": settings.monitor.model_copy(update=updates)})
    import sys

    from redis.exceptions import RedisError

    from dlsr_monitor.common.streams import SinkError
    from dlsr_monitor.monitor.service import run_monitor

    try:
        run_monitor(settings)
    except (SinkError, RedisError) as exc:
        # Infrastructure lost mid-run: nothing uncommitted is lost (it is replayed on restart); say so in one line.
        print(f"dlsr monitor: stopped: {type(exc).__name__}: {exc} (uncommitted input is replayed on restart)",
              file=sys.stderr)
        return 1
    return 0
