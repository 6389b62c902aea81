"""`dlsr triage` and `dlsr vet accept|reject|list`: the operator's loop over flagged images. Heavy imports
(kafka, redis, Pillow) stay inside the handlers so --help is fast."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SHIFTS = ("low_level", "semantic", "mixed")  # console.triage.SHIFTS (not imported: --help stays light)
WHEN_HELP = "ISO 8601 (2025-01-31T14:00:00Z; no zone = UTC) or a span back from now: 30s, 15m, 2h, 1d"


def _when(text: str) -> float:
    from dlsr_monitor.console.triage import parse_when

    try:
        return parse_when(text, now=time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _time_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=None, metavar="NAME", help="Only this source (repeatable)")
    p.add_argument("--since", type=_when, default=None, metavar="WHEN", help=f"Event time from: {WHEN_HELP}")
    p.add_argument("--until", type=_when, default=None, metavar="WHEN", help=f"Event time up to: {WHEN_HELP}")
    p.add_argument("--all", action="store_true", help="Every score record, not only those flagged OOD")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `triage` and `vet`; each leaf sets `handler(args, settings) -> int`."""
    tri = sub.add_parser(
        "triage",
        help="Fetch flagged originals by offset, check their sha256, write a contact sheet, an HTML page and a "
        "selection file",
        description="Read the score records (scores topic, from the beginning to its current end; no consumer "
        "group), choose the flagged ones that pass the filters (highest score first), fetch each original from "
        "the input topic by topic/partition/offset, check it against the recorded sha256 and write to --out: "
        "contact_sheet.png, index.html (self-contained) and selection.json (for 'dlsr vet'). An original gone "
        "from the topic (retention) or a different image at that offset is listed as missing with the reason.",
    )
    _time_filters(tri)
    tri.add_argument(
        "--shift", choices=SHIFTS, default=None, help="Only records whose per-stage shift is this (when they carry it)"
    )
    tri.add_argument("--min-score", type=float, default=None, metavar="X", help="Only scores of at least X")
    tri.add_argument("--max-p", type=float, default=None, metavar="P", help="Only p-values of at most P")
    tri.add_argument("--limit", type=_positive, default=100, metavar="N", help="At most N images (default: 100)")
    tri.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="Output folder (default: ./triage-<UTC timestamp>)"
    )
    tri.add_argument("--cols", type=_positive, default=8, metavar="N", help="Contact sheet columns (default: 8)")
    tri.add_argument("--json", action="store_true", help="One JSON object per chosen image on stdout")
    tri.set_defaults(handler=_triage)

    vet = sub.add_parser(
        "vet",
        help="Decide on flagged images: accept (to the vetted topic) or reject (confirmed OOD); list decisions",
        description="An operator's decision on images, recorded once per image content (sha256) in Redis: "
        "'accept' republishes the original bytes to the vetted topic with provenance headers (the trainer refits "
        "on them); 'reject' keeps them as confirmed OOD under <trainer workdir>/confirmed_ood (the trainer's "
        "AUROC gate uses them); 'list' shows what was decided, by whom, when.",
    )
    vsub = vet.add_subparsers(dest="vet_command", required=True, metavar="ACTION")
    for action, what in (
        ("accept", "Republish the originals to the vetted topic as in-distribution, with provenance headers"),
        ("reject", "Keep the originals as confirmed OOD for the trainer's AUROC gate"),
    ):
        p = vsub.add_parser(
            action,
            help=what,
            description=f"{what}. Images by --id (looked up in the score records), by a triage --selection "
            "file, or by --source with --since / --until (flagged ones; --all for every record). An image "
            "already decided is skipped (the same way: nothing added; the other way: a conflict, left as it "
            "is). Exit 0 when every image named is now in the state asked for, 1 otherwise.",
        )
        p.add_argument("--id", action="append", default=None, metavar="IMAGE_ID", help="This image id (repeatable)")
        p.add_argument("--selection", type=Path, default=None, metavar="PATH", help="selection.json from 'dlsr triage'")
        _time_filters(p)
        p.add_argument("--limit", type=_positive, default=None, metavar="N", help="With --source: at most N images")
        p.add_argument("--by", default=None, metavar="NAME", help="Who decides (default: the OS user)")
        p.add_argument("--note", default="", metavar="TEXT", help="Why (kept with the decision)")
        p.add_argument("--json", action="store_true", help="One JSON object per image on stdout")
        p.set_defaults(handler=_vet, action=action)

    lst = vsub.add_parser(
        "list", help="What was decided, by whom, when", description="Vetting decisions, newest first (Redis)."
    )
    lst.add_argument("--decision", choices=("accept", "reject"), default=None, help="Only this decision")
    lst.add_argument("--limit", type=_positive, default=100, metavar="N", help="At most N (default: 100)")
    lst.add_argument("--json", action="store_true", help="One JSON object per decision")
    lst.set_defaults(handler=_vet_list)


def _fail(prog: str, message: str, code: int = 1) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _filter(args: argparse.Namespace):
    from dlsr_monitor.console.triage import TriageFilter

    return TriageFilter(
        sources=frozenset(args.source or ()),
        since=args.since,
        until=args.until,
        shift=getattr(args, "shift", None),
        min_score=getattr(args, "min_score", None),
        max_p=getattr(args, "max_p", None),
        include_all=args.all,
    )


def _triage(args: argparse.Namespace, settings) -> int:
    from kafka.errors import KafkaError

    from dlsr_monitor.console.triage import run_triage

    try:
        flt = _filter(args)
    except ValueError as exc:
        return _fail("dlsr triage", str(exc), 2)
    try:
        run_triage(settings, flt, limit=args.limit, out_dir=args.out, as_json=args.json, cols=args.cols)
    except KafkaError as exc:
        return _fail("dlsr triage", f"Kafka at {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}")
    except OSError as exc:
        return _fail("dlsr triage", f"cannot write the output: {exc}")
    except BrokenPipeError:  # `dlsr triage --json | head`
        return 0
    return 0


def _vet(args: argparse.Namespace, settings) -> int:
    from kafka.errors import KafkaError
    from redis.exceptions import RedisError

    from dlsr_monitor.common.streams import SinkError
    from dlsr_monitor.console.vet import run_vet

    prog = f"dlsr vet {args.action}"
    by_filter = bool(args.source or args.since is not None or args.until is not None)
    given = [name for name, on in (("--id", bool(args.id)), ("--selection", args.selection is not None),
                                   ("--source/--since/--until", by_filter)) if on]  # fmt: skip
    if len(given) != 1:
        return _fail(prog, "name the images one way: --id, --selection or --source with --since/--until"
                     + (f" (got {' and '.join(given)})" if given else ""), 2)  # fmt: skip
    if by_filter and not (args.source and (args.since is not None or args.until is not None)):
        return _fail(prog, "--source needs --since and/or --until (and they need --source)", 2)
    try:
        flt = _filter(args) if by_filter else None
        code, _ = run_vet(
            settings, args.action, ids=args.id, selection=args.selection, flt=flt, limit=args.limit, by=args.by,
            note=args.note, as_json=args.json,
        )  # fmt: skip
    except ValueError as exc:
        return _fail(prog, str(exc), 2)
    except (KafkaError, SinkError) as exc:
        return _fail(prog, f"Kafka at {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}")
    except RedisError as exc:
        return _fail(prog, f"Redis at {settings.redis.url}: {type(exc).__name__}: {exc}")
    return code


def _vet_list(args: argparse.Namespace, settings) -> int:
    from redis.exceptions import RedisError

    from dlsr_monitor.console.vet import run_vet_list

    try:
        return run_vet_list(settings, limit=args.limit, decision=args.decision, as_json=args.json)
    except RedisError as exc:
        return _fail("dlsr vet list", f"Redis at {settings.redis.url}: {type(exc).__name__}: {exc}")
