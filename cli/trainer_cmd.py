"""`dlsr` subcommands: trainer, model, jobs. Heavy imports (torch, kafka, redis) stay inside handlers so --help is fast."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    """Add these subcommands; each sets `handler(args, settings) -> int`."""
    tr = sub.add_parser(
        "trainer",
        help="Refit service: vetted intake, gated refits, publishing (run | fit | trigger)",
        description="The trainer turns vetted in-distribution images into new model versions: fit (warm-started "
        "from the live model), calibrate, gate (finite scores, held-out false-alarm rate, reference score shift, "
        "optional AUROC), publish to the artifact store and registry, move the live pointer. Settings: "
        "DLSR_TRAINER__*, DLSR_MODEL__* (see `dlsr config show`).",
    )
    tsub = tr.add_subparsers(dest="trainer_command", required=True, metavar="ACTION")
    run = tsub.add_parser(
        "run",
        help="Run the service: take in dlsr.vetted, refit on schedule / after N new images / on trigger",
        description="Consume the vetted topic into the vetted store, feed the live model's baseline reservoir, "
        "and run a job every trainer.interval_s, after trainer.min_new_vetted new images, or on "
        "`dlsr trainer trigger`. Several trainers may run: a Redis lock lets one job run at a time.",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(handler=_run)

    fit = tsub.add_parser(
        "fit",
        help="Ingest a folder/zip of vetted images and run one job now (the first model, or a back-fill)",
        description="Copy the images of PATH (ImageFolder tree, flat folder or zip) into the vetted store, then "
        "fit, calibrate, gate and publish a model, waiting for the lock if another job runs.",
    )
    fit.add_argument(
        "--data", required=True, action="append", help="Folder or zip of vetted images (repeatable)"
    )
    fit.add_argument("--limit", type=int, default=None, help="Take at most this many images from each PATH")
    fit.add_argument("--no-alert", action="store_true", help="Do not send the `model` alert to Kafka")
    fit.add_argument(
        "--wait", type=float, default=600.0, help="Seconds to wait for a busy lock (default 600)"
    )
    fit.add_argument("--quiet", action="store_true", help="No progress bars")
    fit.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    fit.set_defaults(handler=_fit)

    trig = tsub.add_parser("trigger", help="Ask the running trainer service for a job now")
    trig.set_defaults(handler=_trigger)

    model = sub.add_parser("model", help="Model registry: list versions, promote one, roll back")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    ls = msub.add_parser("list", help="Every registered version, the live one marked")
    ls.add_argument("--json", action="store_true", help="One JSON document instead of a table")
    ls.set_defaults(handler=_model_list)
    pr = msub.add_parser("promote", help="Make VERSION live (monitors follow between batches)")
    pr.add_argument("version")
    pr.add_argument("--expect", default=None, help="Only if the live version is this one (compare-and-set)")
    pr.add_argument("--force", action="store_true", help=_FORCE_HELP)
    pr.add_argument("--by", default=None, help="Who forces it (recorded; default the OS user)")
    pr.set_defaults(handler=_model_promote)
    rb = msub.add_parser("rollback", help="Return to the previous live version")
    rb.add_argument("--expect", default=None, help="Only if the live version is this one (compare-and-set)")
    rb.add_argument("--force", action="store_true", help=_FORCE_HELP)
    rb.add_argument("--by", default=None, help="Who forces it (recorded; default the OS user)")
    rb.set_defaults(handler=_model_rollback)

    jobs = sub.add_parser("jobs", help="Trainer job history: trigger, start, duration, data, gates, outcome")
    jobs.add_argument("--limit", type=int, default=20, help="Newest N jobs (default 20)")
    jobs.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    jobs.add_argument("--id", default=None, help="Show one job in full")
    jobs.set_defaults(handler=_jobs)


def _err(msg: str) -> int:
    print(f"dlsr: error: {msg}", file=sys.stderr)
    return 1


def _logging(level: str, settings: Settings) -> None:
    from dlsr_monitor.cli.logs import configure_logging

    configure_logging(settings, level)


def _registry(settings: Settings) -> Any:
    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.common.registry import Registry

    redis = connect_redis(settings.redis)
    return Registry(redis, Keys.of(settings.redis), settings.model.artifact_store)


# ---- trainer ----------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, settings: Settings) -> int:
    _logging(args.log_level, settings)
    import threading

    from dlsr_monitor.common.connections import install_signal_handlers
    from dlsr_monitor.trainer.schedule import build_service

    stop = threading.Event()
    install_signal_handlers(stop)
    from dlsr_monitor.common.observability import serve

    service = build_service(settings, intake=True, progress=sys.stderr.isatty(), wait=True)
    service.health.set("redis", True)
    service.metrics.ready.set(1)
    server = serve(settings.metrics, service.metrics.registry, service.health)
    try:
        service.serve(stop, poll_s=settings.trainer.poll_s)
    finally:
        if server is not None:
            server.stop()
        if service.intake is not None:
            service.intake.close()
    return 0


def _fit(args: argparse.Namespace, settings: Settings) -> int:
    _logging(args.log_level, settings)
    from pathlib import Path

    from dlsr_monitor.trainer.intake import ingest_path
    from dlsr_monitor.trainer.schedule import build_service

    for path in args.data:
        if not Path(path).exists():
            return _err(f"{path} not found: pass a folder or zip of images with --data")
    def say(line: str) -> None:  # the fit-time estimate, printed before the wait it announces
        print(f"dlsr: {line}", file=sys.stderr, flush=True)

    if args.no_alert:
        service = build_service(settings, intake=False, progress=not args.quiet, announce=say)
    else:
        try:
            quick = settings.model_copy(
                update={"kafka": settings.kafka.model_copy(update={"connect_retries": 1})}
            )
            service = build_service(quick, intake=False, alerts=True, progress=not args.quiet, announce=say)
        except Exception as exc:  # no broker: publish anyway, say the alert is not sent
            if type(exc).__name__ != "StartupError" or "Redis" in str(exc):
                raise
            print(f"dlsr: warning: no `model` alert will be sent ({exc})", file=sys.stderr)
            service = build_service(settings, intake=False, progress=not args.quiet, announce=say)
    for path in args.data:
        out = ingest_path(service.ctx.store, path, limit=args.limit)
        print(
            f"{path}: {out['added']} new vetted images, {out['duplicates']} already stored, "
            f"{len(out['bad'])} unreadable" + (f" (e.g. {out['bad'][0]})" if out["bad"] else "")
        )
    deadline = time.monotonic() + args.wait
    while True:
        rec = service.run_once("fit")
        if rec is not None:
            break
        if time.monotonic() > deadline:
            return _err(f"another trainer held the job lock for {args.wait:.0f} s; try again later")
        time.sleep(2.0)
    if service.intake is not None:
        service.intake.close()
    print(_job_line(rec))
    if rec.outcome == "promoted":
        return 0
    for name, g in rec.gates.items():
        if not g.get("passed", True):
            print(f"  gate {name} failed: {g.get('detail')}", file=sys.stderr)
    return _err(rec.message) if rec.outcome == "failed" else 3


def _trigger(args: argparse.Namespace, settings: Settings) -> int:
    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.console.views import StateView
    from dlsr_monitor.trainer.schedule import HEARTBEAT_TTL_S, request_run

    redis = connect_redis(settings.redis)
    keys = Keys.of(settings.redis)
    request_run(redis, keys, by="cli")
    view = StateView(redis, keys)
    alive = sorted(view.read_trainer_heartbeats(), key=lambda b: str(b.get("owner")))
    print(trigger_outcome(alive, view.read_trainer_lock(), HEARTBEAT_TTL_S))
    return 0


def trigger_outcome(alive: list[dict], holder: str | None, ttl_s: float) -> str:
    """What `dlsr trainer trigger` tells the operator will happen to the request it left in Redis."""
    if not alive:
        line = (
            f"job requested, but no trainer is alive (no heartbeat in the last {ttl_s:g} s): the request waits in "
            "Redis until `dlsr trainer run` starts"
        )
        if holder:
            line += f" (a job holds the lock now: {holder}, e.g. `dlsr trainer fit`; it does not take requests)"
        return line
    names = ", ".join(str(b.get("owner")) for b in alive)
    if holder:
        return (
            f"job requested: a job is running now ({holder}); trainer {names} starts the requested one when it "
            "ends (see `dlsr jobs`)"
        )
    polls = [float(b["poll_s"]) for b in alive if isinstance(b.get("poll_s"), int | float)]
    within = f"within {min(polls):g} s" if polls else "at its next check"
    return f"job requested: trainer {names} is alive and starts it {within} (see `dlsr jobs`)"


# ---- model -----------------------------------------------------------------------------------------
def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _model_list(args: argparse.Namespace, settings: Settings) -> int:
    reg = _registry(settings)
    current = reg.current_version()
    entries = reg.list_versions()
    if args.json:
        print(json.dumps({"current": current, "versions": [e.as_dict() for e in entries]}, indent=2))
        return 0
    if not entries:
        print("no model versions yet: run `dlsr trainer fit --data PATH`")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"model versions (live: {current or 'none'})")
    for col in (
        "",
        "version",
        "created",
        "threshold",
        "alpha",
        "fit",
        "cal",
        "held-out",
        "gates",
        "parent",
        "sha256",
    ):
        table.add_column(col)
    for e in entries:
        failed = [k for k, g in e.gates.items() if isinstance(g, dict) and not g.get("passed", True)]
        table.add_row(
            "*" if e.version == current else "",
            e.version,
            _fmt_time(e.created),
            f"{e.threshold:.6g}",
            f"{e.alpha:g}",
            str(e.data_sizes.get("fit", "-")),
            str(e.data_sizes.get("calibration", "-")),
            str(e.data_sizes.get("holdout", "-")),
            "pass" if not failed else "FAIL " + ",".join(failed),
            e.parent or "-",
            e.sha256[:12],
        )
    Console().print(table)
    return 0


_FORCE_HELP = "Make it live even if the model checks refuse it (recorded on the entry, with who and why)"


def _check_before_live(reg: Any, version: str, args: argparse.Namespace, settings: Settings, action: str) -> int:
    """The checks the monitor's watcher applies, run before the pointer moves; 0 to go on."""
    import getpass

    from dlsr_monitor.common.model_checks import ModelRefusedError, entry_problems, load_checked
    from dlsr_monitor.common.registry import RegistryError

    try:
        entry = reg.entry(version)
        problems = entry_problems(entry)
        if not problems:
            load_checked(reg.verify(entry), device=settings.model.device)
    except ModelRefusedError as exc:
        problems = exc.problems
    except RegistryError as exc:
        problems = [str(exc)]
    if not problems:
        return 0
    if not args.force:
        return _err(f"model {version} refused: {'; '.join(problems)} (--force makes it live anyway, recorded)")
    by = args.by or getpass.getuser()
    reg.record_forced(version, by=by, action=action, problems=problems)
    print(f"warning: {action} of {version} forced by {by} past: {'; '.join(problems)}", file=sys.stderr)
    return 0


def _model_promote(args: argparse.Namespace, settings: Settings) -> int:
    from dlsr_monitor.common.registry import ANY, RegistryError

    reg = _registry(settings)
    before = reg.current_version()
    try:
        if rc := _check_before_live(reg, args.version, args, settings, "promote"):
            return rc
        entry = reg.promote(args.version, expected=args.expect if args.expect is not None else ANY)
    except RegistryError as exc:
        return _err(str(exc))
    print(f"live model: {entry.version} (was {before or 'none'}); monitors swap between batches")
    return 0


def _model_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from dlsr_monitor.common.registry import ANY, RegistryError

    reg = _registry(settings)
    before = reg.current_version()
    previous = reg.previous_versions()
    try:
        if previous and (rc := _check_before_live(reg, previous[0], args, settings, "rollback")):
            return rc
        entry = reg.rollback(expected=args.expect if args.expect is not None else ANY)
    except RegistryError as exc:
        return _err(str(exc))
    print(f"rolled back: live model {entry.version} (was {before}); monitors swap between batches")
    return 0


# ---- jobs ------------------------------------------------------------------------------------------
def _job_line(rec: Any) -> str:
    dur = f"{rec.duration_s:.1f}s" if rec.duration_s is not None else "running"
    sizes = rec.data_sizes
    data = f"fit={sizes.get('fit', '-')} cal={sizes.get('calibration', '-')} held-out={sizes.get('holdout', '-')}"
    failed = rec.failed_gates()
    gates = ("FAIL " + ",".join(failed)) if failed else ("pass" if rec.gates else "-")
    ver = f" -> {rec.version}" if rec.version else ""
    return f"job {rec.job_id} [{rec.trigger}] {rec.outcome}{ver} in {dur}; {data}; gates {gates}"


def _jobs(args: argparse.Namespace, settings: Settings) -> int:
    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.trainer.history import JobHistory

    redis = connect_redis(settings.redis)
    hist = JobHistory(redis, Keys.of(settings.redis))
    if args.id:
        rec = hist.get(args.id)
        if rec is None:
            return _err(f"no job {args.id!r} (see `dlsr jobs`)")
        print(json.dumps(rec.__dict__, indent=2, default=str))
        return 0
    recs = hist.recent(args.limit)
    if args.json:
        for r in recs:
            print(json.dumps(r.__dict__, default=str))
        return 0
    if not recs:
        print("no trainer jobs yet")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="trainer jobs (newest first)")
    for col in (
        "job",
        "trigger",
        "start",
        "duration",
        "fit",
        "cal",
        "held-out",
        "gates",
        "outcome",
        "message",
    ):
        table.add_column(col, overflow="fold")
    for r in recs:
        failed = r.failed_gates()
        table.add_row(
            r.job_id,
            r.trigger,
            _fmt_time(r.start),
            f"{r.duration_s:.1f}s" if r.duration_s is not None else "running",
            str(r.data_sizes.get("fit", "-")),
            str(r.data_sizes.get("calibration", "-")),
            str(r.data_sizes.get("holdout", "-")),
            ("FAIL " + ",".join(failed)) if failed else ("pass" if r.gates else "-"),
            r.outcome + (f" {r.version}" if r.version else ""),
            r.message,
        )
    Console().print(table)
    return 0
