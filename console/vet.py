"""`dlsr vet accept|reject|list`: an operator's decision on flagged images, recorded once per image content.

- accept: the original bytes go to the vetted topic (`settings.kafka.vetted_topic`) with provenance headers
  (common/contract.py `VETTED_*`: origin, alert_id, vetted_by, vetted_at, note, sha256, plus the original
  `source` / `image_id` / `ts`); the trainer takes them in as in-distribution (trainer/intake.py).
- reject: the original bytes are kept as confirmed OOD under `<trainer workdir>/confirmed_ood/<sha256>.<ext>`
  (common/confirmed_ood.py); the trainer adds that folder to its reference OOD set for the AUROC gate.
- list: what was decided, by whom, when.

The ledger is a Redis hash per image sha256 (`Keys.vet_decision`) plus an index by time (`Keys.vet_index`):
vetting an image again adds nothing (an accepted sha256 is never republished, a rejected one never stored
twice); an image decided the other way before is a conflict, reported and left as it was. Accept publishes
first and records after the broker acknowledged, so a crash in between republishes on the next run (the
trainer's store keeps one copy per content hash), never loses a decision. This and `dlsr notify` are the console
commands that write: the vetted topic, the confirmed-OOD folder and their own ledger keys.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dlsr_monitor.common.redisdata import as_str
from dlsr_monitor.console.originals import Missing, Original, fetch_originals, open_consumer, origin_text
from dlsr_monitor.console.triage import (
    Candidate,
    TriageFilter,
    candidate_of,
    fmt_time,
    progress_bar,
    read_alert_ids,
    read_scores,
    select,
)

if TYPE_CHECKING:
    import redis

    from dlsr_monitor.common.keys import Keys
    from dlsr_monitor.config.settings import Settings

ACCEPT, REJECT = "accept", "reject"
_PAST = {ACCEPT: "accepted", REJECT: "rejected"}

# Record a decision only when the image has none yet; index it by time. KEYS: decision hash, index.
# ARGV: sha256, at, then field/value pairs. Returns 1 when recorded, 0 when a decision was already there.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


def default_user() -> str:
    """The OS user (what `--by` defaults to)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return "unknown"


@dataclass(frozen=True)
class Decision:
    """One image's vetting decision, as the ledger keeps it."""

    sha256: str
    decision: str  # accept | reject
    by: str
    at: float
    note: str = ""
    origin: str = ""
    image_id: str = ""
    source: str = ""
    alert_id: str = ""
    path: str = ""  # reject: the stored file

    def fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k != "sha256"}

    @classmethod
    def from_hash(cls, sha256: str, data: dict) -> Decision:
        d = {as_str(k): as_str(v) for k, v in data.items()}
        return cls(
            sha256=sha256,
            decision=d.get("decision", ""),
            by=d.get("by", ""),
            at=float(d.get("at") or 0.0),
            note=d.get("note", ""),
            origin=d.get("origin", ""),
            image_id=d.get("image_id", ""),
            source=d.get("source", ""),
            alert_id=d.get("alert_id", ""),
            path=d.get("path", ""),
        )

    def as_json(self) -> dict:
        return {**asdict(self), "time": fmt_time(self.at)}


class VetLedger:
    """The decisions of one deployment (`keys.prefix`) in Redis."""

    def __init__(self, redis: redis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._record = redis.register_script(_RECORD)

    def get(self, sha256: str) -> Decision | None:
        data = self.redis.hgetall(self.keys.vet_decision(sha256))
        return Decision.from_hash(sha256, data) if data else None

    def record(self, d: Decision) -> bool:
        """Store `d` unless the image already has a decision; True when stored."""
        args: list[Any] = [d.sha256, d.at]
        for k, v in d.fields().items():
            args += [k, v]
        return bool(self._record(keys=[self.keys.vet_decision(d.sha256), self.keys.vet_index()], args=args))

    def recent(self, limit: int | None = 100, decision: str | None = None) -> list[Decision]:
        """Decisions, newest first (at most `limit` after the `decision` filter)."""
        out: list[Decision] = []
        start, page = 0, 500
        while limit is None or len(out) < limit:
            shas = self.redis.zrevrange(self.keys.vet_index(), start, start + page - 1)
            if not shas:
                break
            pipe = self.redis.pipeline(transaction=False)
            for sha in shas:
                pipe.hgetall(self.keys.vet_decision(as_str(sha)))
            for sha, data in zip(shas, pipe.execute(), strict=True):
                if data:
                    d = Decision.from_hash(as_str(sha), data)
                    if decision is None or d.decision == decision:
                        out.append(d)
            start += page
        return out if limit is None else out[:limit]


# ---- what to vet --------------------------------------------------------------------------------
@dataclass
class Targets:
    """The input messages to vet and the ids that matched no score record."""

    candidates: list[Candidate]
    unknown_ids: list[str]


def targets_from_ids(records: Iterable[dict], ids: list[str], alert_ids: dict) -> Targets:
    """Every input message whose score record has one of `ids` (a replayed record counts once)."""
    wanted = set(ids)
    chosen = select((r for r in records if r["image_id"] in wanted), TriageFilter(include_all=True), limit=None)
    seen = {r["image_id"] for r in chosen}
    cands = [candidate_of(r, alert_ids.get((r["topic"], r["partition"], r["offset"]))) for r in chosen]
    return Targets(cands, [i for i in dict.fromkeys(ids) if i not in seen])


def targets_from_filter(records: Iterable[dict], flt: TriageFilter, alert_ids: dict, limit: int | None) -> Targets:
    chosen = select(records, flt, limit=limit)
    return Targets([candidate_of(r, alert_ids.get((r["topic"], r["partition"], r["offset"]))) for r in chosen], [])


# ---- outcome ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one candidate."""

    status: str  # accepted | rejected | already_accepted | already_rejected | conflict | missing | unknown_id
    image_id: str
    source: str = ""
    origin: str = ""
    sha256: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Now in the state asked for (done now or before)."""
        return self.status in ("accepted", "rejected", "already_accepted", "already_rejected")

    def as_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        sha = f" sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{self.status:<16} {self.image_id}{where}{sha}{': ' + self.detail if self.detail else ''}"


def vetted_headers(orig: Original, cand: Candidate, *, by: str, at: float, note: str) -> list[tuple[str, bytes]]:
    """Provenance headers of a vetted message (common/contract.py VETTED_*), with the original source /
    image_id / ts."""
    from dlsr_monitor.common import contract as C

    h: list[tuple[str, bytes]] = [
        (C.H_SOURCE, (orig.header(C.H_SOURCE) or cand.source.encode())),
        (C.H_IMAGE_ID, (orig.header(C.H_IMAGE_ID) or cand.image_id.encode())),
    ]
    ts = orig.header(C.H_TS)
    if ts:
        h.append((C.H_TS, ts))
    h += [
        (C.VETTED_ORIGIN, origin_text(orig.origin).encode()),
        (C.VETTED_BY, by.encode()),
        (C.VETTED_AT, fmt_time(at).replace(" ", "T").encode()),
        (C.VETTED_NOTE, note.encode()),
        (C.VETTED_SHA256, orig.sha256.encode()),
    ]
    if cand.alert_id:
        h.append((C.VETTED_ALERT_ID, cand.alert_id.encode()))
    return h


def decide(
    action: str,
    candidates: list[Candidate],
    originals: dict,
    missing: dict[Any, Missing],
    ledger: VetLedger,
    *,
    by: str,
    note: str,
    now: float,
    publish: Any | None = None,
    workdir: Path | None = None,
) -> list[Outcome]:
    """Apply `action` to the fetched candidates: skip those already decided, publish (accept, via
    `publish(list of (Original, headers))`, which must raise unless acknowledged) or store (reject, under
    `workdir`), then record each in the ledger."""
    from dlsr_monitor.common.confirmed_ood import store_confirmed

    outcomes: list[Outcome | None] = []  # in the order of `candidates`; None: decided below
    todo: list[tuple[int, Candidate, Original]] = []
    seen: set[str] = set()
    for c in candidates:
        base = {"image_id": c.image_id, "source": c.source, "origin": origin_text(c.origin)}
        if c.origin in missing:
            m = missing[c.origin]
            outcomes.append(Outcome("missing", sha256=c.sha256, detail=f"{m.reason}: {m.detail}", **base))
            continue
        orig = originals[c.origin]
        sha = orig.sha256
        base["sha256"] = sha
        if sha in seen:
            outcomes.append(Outcome(f"already_{_PAST[action]}", detail="same image as another in this run", **base))
            continue
        seen.add(sha)
        before = ledger.get(sha)
        if before is not None:
            when = f"by {before.by} at {fmt_time(before.at)}"
            if before.decision == action:
                outcomes.append(Outcome(f"already_{_PAST[action]}", detail=when, **base))
            else:
                outcomes.append(
                    Outcome("conflict", detail=f"{_PAST.get(before.decision, before.decision)} {when}; left as it is", **base)
                )
            continue
        todo.append((len(outcomes), c, orig))
        outcomes.append(None)
    if action == ACCEPT and todo:
        assert publish is not None
        publish([(o, vetted_headers(o, c, by=by, at=now, note=note)) for _, c, o in todo])
    for i, c, o in todo:
        path = ""
        if action == REJECT:
            assert workdir is not None
            path = str(store_confirmed(workdir, o.value)[0])
        d = Decision(
            sha256=o.sha256, decision=action, by=by, at=now, note=note, origin=origin_text(o.origin),
            image_id=c.image_id, source=c.source, alert_id=c.alert_id or "", path=path,
        )  # fmt: skip
        recorded = ledger.record(d)
        status = _PAST[action] if recorded else f"already_{_PAST[action]}"
        outcomes[i] = Outcome(status, c.image_id, c.source, origin_text(c.origin), o.sha256,
                              "" if recorded else "decided meanwhile by another run")  # fmt: skip
    return [o for o in outcomes if o is not None]


def run_vet(
    settings: Settings,
    action: str,
    *,
    ids: list[str] | None = None,
    selection: Path | None = None,
    flt: TriageFilter | None = None,
    limit: int | None = None,
    by: str | None = None,
    note: str = "",
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: float | None = None,
) -> tuple[int, list[Outcome]]:
    """`dlsr vet accept|reject`: resolve the targets, fetch and prove the originals, decide; print one line (or
    JSON object) per image and a summary. Exit code 0 when every image named is now in the state asked for.

    Raises:
        StartupError: Kafka or Redis unreachable (bounded retries).
        ValueError: an unreadable selection file.
    """
    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.console.triage import load_selection

    out, err = out or sys.stdout, err or sys.stderr
    now = time.time() if now is None else now
    by = by or default_user()
    targets = Targets(load_selection(selection), []) if selection is not None else None  # bad file: fail first
    redis = connect_redis(settings.redis)
    try:
        return _vet(settings, action, redis, targets, ids=ids, flt=flt, limit=limit, by=by, note=note,
                    as_json=as_json, out=out, err=err, now=now)  # fmt: skip
    finally:
        redis.close()


def _vet(
    settings: Settings, action: str, redis: redis.Redis, targets: Targets | None, *, ids: list[str] | None,
    flt: TriageFilter | None, limit: int | None, by: str, note: str, as_json: bool, out: TextIO, err: TextIO,
    now: float,
) -> tuple[int, list[Outcome]]:  # fmt: skip
    from dlsr_monitor.common.connections import kafka_retry
    from dlsr_monitor.common.keys import Keys

    kafka = settings.kafka
    ledger = VetLedger(redis, Keys.of(settings.redis))
    consumer = open_consumer(kafka)
    try:
        if targets is None:
            records, _bad = read_scores(consumer, kafka.scores_topic)
            alert_ids = read_alert_ids(consumer, kafka.alerts_topic)
            if ids:
                targets = targets_from_ids(records, ids, alert_ids)
            else:
                targets = targets_from_filter(records, flt or TriageFilter(), alert_ids, limit)
        with progress_bar(len(targets.candidates), "fetching originals", err) as tick:
            found, missing = fetch_originals(
                consumer, [(c.origin, c.sha256) for c in targets.candidates], on_progress=tick
            )
    finally:
        consumer.close()

    publish = None
    sink = None
    if action == ACCEPT:
        from dlsr_monitor.common.kafka_io import KafkaSink, ensure_topics

        def publish(batch: list[tuple[Original, list[tuple[str, bytes]]]]) -> None:
            nonlocal sink
            kafka_retry(kafka, lambda: ensure_topics(kafka, [kafka.vetted_topic], partitions=kafka.topic_partitions))
            sink = sink or kafka_retry(kafka, lambda: KafkaSink(kafka))
            for orig, headers in batch:
                src = next((v for k, v in headers if k == "source"), b"")
                sink.send(kafka.vetted_topic, src or None, orig.value, headers)
            sink.flush(60.0)

    try:
        outcomes = decide(
            action, targets.candidates, found, missing, ledger, by=by, note=note, now=now, publish=publish,
            workdir=settings.trainer.workdir,
        )  # fmt: skip
    finally:
        if sink is not None:
            sink.close()
    outcomes += [Outcome("unknown_id", i, detail="no score record has this image id") for i in targets.unknown_ids]

    for o in outcomes:
        print(json.dumps(o.as_json(), sort_keys=True) if as_json else o.line(), file=out if as_json or o.ok else err)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    where = kafka.vetted_topic if action == ACCEPT else str(settings.trainer.workdir / "confirmed_ood")
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items())) or "nothing to vet"
    print(f"dlsr vet {action}: {summary} ({_PAST[action]} images: {where})", file=err if as_json else out)
    return (0 if all(o.ok for o in outcomes) else 1), outcomes


def run_vet_list(
    settings: Settings,
    *,
    limit: int | None = 100,
    decision: str | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """`dlsr vet list`: decisions, newest first, as a rich table or JSON lines."""
    from dlsr_monitor.common.connections import connect_redis
    from dlsr_monitor.common.keys import Keys

    out = out or sys.stdout
    redis = connect_redis(settings.redis)
    try:
        decisions = VetLedger(redis, Keys.of(settings.redis)).recent(limit, decision)
    finally:
        redis.close()
    if as_json:
        for d in decisions:
            print(json.dumps(d.as_json(), sort_keys=True), file=out)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vetting decisions ({len(decisions)}, newest first)", title_justify="left")
    for col in ("when", "decision", "image id", "source", "by", "note", "origin", "sha256"):
        table.add_column(col, overflow="fold")
    for d in decisions:
        style = "green" if d.decision == ACCEPT else "red"
        table.add_row(
            fmt_time(d.at), f"[{style}]{d.decision}[/]", d.image_id, d.source, d.by, d.note, d.origin, d.sha256[:12]
        )
    Console(file=out, width=160 if not getattr(out, "isatty", lambda: False)() else None).print(table)
    return 0
