"""Untrusted input: poison headers and hostile payloads in the middle of a stream. Every message ends as a
score record (a bad header replaced by its documented default, with `input_notes` for `ts`) or a dead letter
with a reason; everything behind the poison is processed; the monitor stays up."""

from __future__ import annotations

import math
import time

import pytest

from tests.faults.harness import Msg, image_msgs, pick
from tests.faults.payloads import PAYLOAD_OVERSIZE_LIMIT, hostile_payloads, poison_headers
from tests.faults.runner import RESULT_TIMEOUT_S, Scenario, scenario_body
from tests.integration.conftest import load_images

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(RESULT_TIMEOUT_S + 60)]


@scenario_body("poison_headers")
def scenario_poison_headers(s: Scenario) -> None:
    s.prepare(partitions=3)
    mon = s.monitor("poison")
    n_side = pick(16, 60)
    images = load_images(s.data_dir, "cifar10", "test", 2 * n_side + 40, seed=31)
    before = image_msgs(images[:n_side], ["camP"], partition=0, kind="before")
    after = image_msgs(images[n_side:2 * n_side], ["camP"], partition=0, kind="after")
    poisons = [
        Msg(images[2 * n_side + (i % 40)], key, headers, 0, kind)
        for i, (kind, headers, key) in enumerate(poison_headers("x"))
    ]
    others = image_msgs(images[:n_side], ["camQ", "camR"], partition=None, kind="other")
    t_send = time.time()
    where = s.send(before + poisons + after + others)
    t_sent = time.time()
    kind_of = {pos: m.kind for pos, m in zip(where, before + poisons + after + others, strict=True)}
    row, t = s.finish(timeout_s=pick(120, 300), alive=[mon])

    by_pos = {(r.partition, r.offset): r for r in s.outputs.score_recs}
    dead_by_pos = {}
    for d in s.outputs.dead_recs:
        _, p, o = d["origin"].rsplit(":", 2)
        dead_by_pos[(int(p), int(o))] = d
    per_kind, problems = {}, []
    for pos, kind in kind_of.items():
        rec, dead = by_pos.get(pos), dead_by_pos.get(pos)
        if kind in ("before", "after", "other"):
            if rec is None:
                problems.append(f"{kind} image at {pos} not scored ({dead and dead['reason']})")
            continue
        if rec is None and dead is None:
            per_kind[kind] = "LOST"
            continue
        if rec is None:
            per_kind[kind] = f"dlq:{dead['reason']}"
            continue
        notes = rec.input_notes or []
        per_kind[kind] = "score" + (f" notes={notes[0][:60]!r}" if notes else "")
        if len(rec.image_id) > 256:
            problems.append(f"{kind}: image_id of {len(rec.image_id)} chars")
        if not (rec.source.isprintable() and 0 < len(rec.source) <= 128):
            problems.append(f"{kind}: source {rec.source[:40]!r} not printable / too long")
        if not math.isfinite(rec.ts) or not (t_send - 60 <= rec.ts <= t_sent + 60):
            problems.append(f"{kind}: ts {rec.ts} is not the Kafka timestamp")
        if kind.startswith("ts_") and kind != "ts_empty" and not notes:
            problems.append(f"{kind}: score record without input_notes")
        if kind == "image_id_100kb" and rec.image_id != f"{rec.topic}:{rec.partition}:{rec.offset}":
            problems.append(f"{kind}: image_id not the default id")
    row.extra["per_kind"] = per_kind
    if problems:
        row.notes = "; ".join(filter(None, [row.notes, *problems]))
    s.check(row, t)
    assert not problems, problems
    assert "LOST" not in per_kind.values(), per_kind


@scenario_body("hostile_payloads")
def scenario_hostile_payloads(s: Scenario) -> None:
    s.prepare(partitions=3)
    mon = s.monitor("hostile", DLSR_MONITOR__MAX_IMAGE_BYTES=PAYLOAD_OVERSIZE_LIMIT)
    payloads = hostile_payloads()
    assert len(payloads) >= 25
    good = load_images(s.data_dir, "cifar10", "test", pick(16, 90), seed=41)
    msgs = image_msgs(good[: len(good) // 2], ["camH"], kind="good")
    rounds = pick(1, 3)
    for r in range(rounds):
        msgs += [Msg(v, b"camH", [("source", b"camH")], i % 3, kind) for i, (kind, v) in enumerate(payloads.items())]
        if r == 0:
            msgs += image_msgs(good[len(good) // 2:], ["camH"], kind="good")
    where = s.send(msgs)
    kind_of = {pos: m.kind for pos, m in zip(where, msgs, strict=True)}
    row, t = s.finish(timeout_s=pick(120, 300), alive=[mon])

    scored = {(r.partition, r.offset) for r in s.outputs.score_recs}
    dead = {}
    for d in s.outputs.dead_recs:
        _, p, o = d["origin"].rsplit(":", 2)
        dead[(int(p), int(o))] = d
    per_kind: dict[str, set[str]] = {}
    problems = []
    for pos, kind in kind_of.items():
        if pos in scored:
            outcome = "score"
        elif pos in dead:
            outcome = f"dlq:{dead[pos]['reason'] or 'NO-REASON'}"
            if not dead[pos]["reason"]:
                problems.append(f"{kind}: dead letter without a reason")
        else:
            outcome = "LOST"
        if kind == "good" and outcome != "score":
            problems.append(f"good image at {pos}: {outcome}")
            continue
        per_kind.setdefault(kind, set()).add(outcome)
    row.extra["per_kind"] = {k: ",".join(sorted(v)) for k, v in per_kind.items() if k != "good"}
    row.extra["internal_errors"] = [d["detail"] for d in s.outputs.dead_recs
                                    if d["reason"] in ("internal_error", "decode_failed")]
    if row.extra["internal_errors"]:
        row.notes = "; ".join(filter(None, [row.notes, f"internal/decoder errors: {row.extra['internal_errors']}"]))
    if problems:
        row.notes = "; ".join(filter(None, [row.notes, *problems]))
    s.check(row, t)
    assert not problems, problems
    assert all("LOST" not in v for v in per_kind.values()), per_kind
    bombs = {k: v for k, v in row.extra["per_kind"].items() if "bomb" in k and "ztxt" not in k}
    assert all(v == "dlq:too_many_pixels" for v in bombs.values()), bombs
    assert row.extra["per_kind"]["oversize_value"] == "dlq:too_many_bytes"


def test_poison_headers(fault_runner):
    fault_runner.result("poison_headers", RESULT_TIMEOUT_S)


def test_hostile_payloads(fault_runner):
    fault_runner.result("hostile_payloads", RESULT_TIMEOUT_S)
