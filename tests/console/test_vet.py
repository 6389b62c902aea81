"""`dlsr vet`: provenance headers, the decision ledger (real Redis), idempotent accept / reject, conflicts,
missing originals, id lookups, the confirmed-OOD folder the trainer reads, and `vet list`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from dlsr_monitor.common import contract as C
from dlsr_monitor.common.confirmed_ood import (
    confirmed_files,
    confirmed_ood_dir,
    image_extension,
    store_confirmed,
)
from dlsr_monitor.console.originals import Missing, Original
from dlsr_monitor.console.triage import Candidate, TriageFilter
from dlsr_monitor.console.vet import (
    ACCEPT,
    REJECT,
    Decision,
    VetLedger,
    decide,
    run_vet_list,
    targets_from_filter,
    targets_from_ids,
    vetted_headers,
)
from dlsr_monitor.trainer.reference_ood import reference_ood_images

NOW = 1_750_000_000.0


def image(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format=fmt)
    return buf.getvalue()


def original(offset: int, data: bytes, **headers: bytes) -> Original:
    hs = tuple(headers.items()) or (("source", b"cam-ood"), ("image_id", f"img-{offset}".encode()))
    return Original("images", 0, offset, data, b"cam-ood", hs, 0)


def cand(o: Original, alert: str | None = "ood:x") -> Candidate:
    return Candidate("images", 0, o.offset, o.sha256, f"img-{o.offset}", "cam-ood", alert)


class Publisher:
    def __init__(self) -> None:
        self.batches: list[list] = []

    def __call__(self, batch) -> None:
        self.batches.append(batch)

    @property
    def values(self) -> list[bytes]:
        return [o.value for b in self.batches for o, _ in b]


@pytest.fixture
def ledger(redis_client, keys) -> VetLedger:
    return VetLedger(redis_client, keys)


def test_vetted_headers_carry_provenance_and_the_original_headers():
    o = original(7, image((1, 2, 3)), source=b"cam-9", image_id=b"frame-77", ts=b"1700000000")
    h = dict(vetted_headers(o, cand(o, "ood:frame-77"), by="ada", at=NOW, note="false alarm: glare"))
    assert h[C.H_SOURCE] == b"cam-9" and h[C.H_IMAGE_ID] == b"frame-77" and h[C.H_TS] == b"1700000000"
    assert h[C.VETTED_ORIGIN] == b"images:0:7" and h[C.VETTED_ALERT_ID] == b"ood:frame-77"
    assert h[C.VETTED_BY] == b"ada" and h[C.VETTED_NOTE] == b"false alarm: glare"
    assert h[C.VETTED_AT] == b"2025-06-15T15:06:40Z" and h[C.VETTED_SHA256] == o.sha256.encode()
    bare = dict(vetted_headers(original(8, b"x", other=b"1"), cand(original(8, b"x"), None), by="b", at=NOW, note=""))
    assert bare[C.H_SOURCE] == b"cam-ood" and bare[C.H_IMAGE_ID] == b"img-8" and C.VETTED_ALERT_ID not in bare


def test_accept_publishes_each_image_once_and_records_who_when(ledger):
    a, b = original(1, image((200, 0, 0))), original(2, image((0, 200, 0)))
    twin = original(3, a.value)  # the same image sent twice, at another offset
    pub = Publisher()
    found = {o.origin: o for o in (a, b, twin)}
    out = decide(ACCEPT, [cand(a), cand(b), cand(twin)], found, {}, ledger, by="ada", note="n", now=NOW, publish=pub)
    assert [o.status for o in out] == ["accepted", "accepted", "already_accepted"]
    assert pub.values == [a.value, b.value]
    d = ledger.get(a.sha256)
    assert (d.decision, d.by, d.at, d.note, d.origin, d.alert_id) == (ACCEPT, "ada", NOW, "n", "images:0:1", "ood:x")
    again = Publisher()
    out = decide(ACCEPT, [cand(a), cand(b)], found, {}, ledger, by="bob", note="", now=NOW + 5, publish=again)
    assert [o.status for o in out] == ["already_accepted"] * 2 and again.batches == []
    assert "by ada" in out[0].detail and ledger.get(a.sha256).by == "ada"  # the first decision stays


def test_a_publish_that_fails_records_nothing(ledger):
    a = original(1, image((5, 5, 5)))

    def broken(batch):
        raise RuntimeError("not acknowledged")

    with pytest.raises(RuntimeError):
        decide(ACCEPT, [cand(a)], {a.origin: a}, {}, ledger, by="ada", note="", now=NOW, publish=broken)
    assert ledger.get(a.sha256) is None  # so the next run publishes it


def test_reject_stores_once_and_the_trainer_reads_it(ledger, tmp_path):
    a, b = original(1, image((10, 10, 200))), original(2, image((200, 200, 10), "JPEG"))
    found = {o.origin: o for o in (a, b)}
    out = decide(REJECT, [cand(a), cand(b)], found, {}, ledger, by="ada", note="", now=NOW, workdir=tmp_path)
    assert [o.status for o in out] == ["rejected", "rejected"]
    files = confirmed_files(tmp_path)
    assert sorted(p.name for p in files) == sorted([f"{a.sha256}.png", f"{b.sha256}.jpg"])
    assert [p.read_bytes() for p in files] == [o.value for o in sorted((a, b), key=lambda o: o.sha256)]
    assert ledger.get(b.sha256).path == str(confirmed_ood_dir(tmp_path) / f"{b.sha256}.jpg")
    out = decide(REJECT, [cand(a)], found, {}, ledger, by="bob", note="", now=NOW, workdir=tmp_path)
    assert [o.status for o in out] == ["already_rejected"] and len(confirmed_files(tmp_path)) == 2
    ref = reference_ood_images(None, tmp_path)
    assert sorted(item.data for item in ref) == sorted([a.value, b.value])


def test_deciding_the_other_way_is_a_conflict_left_as_it_was(ledger, tmp_path):
    a = original(1, image((1, 200, 1)))
    pub = Publisher()
    decide(REJECT, [cand(a)], {a.origin: a}, {}, ledger, by="ada", note="", now=NOW, workdir=tmp_path)
    (out,) = decide(ACCEPT, [cand(a)], {a.origin: a}, {}, ledger, by="bob", note="", now=NOW, publish=pub)
    assert out.status == "conflict" and not out.ok and "rejected by ada" in out.detail
    assert pub.batches == [] and ledger.get(a.sha256).decision == REJECT


def test_missing_originals_are_outcomes_with_the_reason(ledger):
    c = Candidate("images", 0, 3, "ab" * 32, "img-3", "cam-ood")
    gone = {c.origin: Missing("images", 0, 3, "expired", "offset 3 < beginning offset 10")}
    pub = Publisher()
    (out,) = decide(ACCEPT, [c], {}, gone, ledger, by="ada", note="", now=NOW, publish=pub)
    assert (out.status, out.ok) == ("missing", False) and out.detail.startswith("expired: offset 3")
    assert pub.batches == [] and ledger.get(c.sha256) is None


def test_targets_by_id_and_by_filter():
    def rec(i, src="cam-ood", ood=True, ts=NOW):
        return {"image_id": f"img-{i}", "source": src, "topic": "images", "partition": 0, "offset": i, "ts": ts,
                "score": float(i), "p_value": 0.01, "is_ood": ood, "sha256": f"{i:064x}"}  # fmt: skip

    recs = [rec(1), rec(2, ood=False), rec(3, src="cam-id"), rec(1), rec(4, ts=NOW - 7200)]
    t = targets_from_ids(recs, ["img-2", "img-1", "nope", "img-1"], {("images", 0, 1): "ood:img-1"})
    assert sorted(c.image_id for c in t.candidates) == ["img-1", "img-2"]  # not flagged is fine by id
    assert t.unknown_ids == ["nope"] and {c.image_id: c.alert_id for c in t.candidates}["img-1"] == "ood:img-1"
    flt = TriageFilter(sources=frozenset({"cam-ood"}), since=NOW - 3600)
    assert [c.image_id for c in targets_from_filter(recs, flt, {}, None).candidates] == ["img-1"]
    flt_all = TriageFilter(sources=frozenset({"cam-ood"}), since=NOW - 3600, include_all=True)
    assert [c.image_id for c in targets_from_filter(recs, flt_all, {}, 1).candidates] == ["img-2"]


def test_ledger_lists_newest_first_and_filters(ledger):
    for i, decision in enumerate([ACCEPT, REJECT, ACCEPT]):
        assert ledger.record(Decision(f"{i:064x}", decision, "ada", NOW + i, image_id=f"img-{i}"))
    assert not ledger.record(Decision(f"{0:064x}", REJECT, "bob", NOW + 9))  # one decision per image
    assert [d.image_id for d in ledger.recent()] == ["img-2", "img-1", "img-0"]
    assert [d.image_id for d in ledger.recent(1, ACCEPT)] == ["img-2"]
    assert [d.image_id for d in ledger.recent(decision=REJECT)] == ["img-1"]
    assert ledger.get(f"{0:064x}") == Decision(f"{0:064x}", ACCEPT, "ada", NOW, image_id="img-0")


def test_vet_list_table_and_json(ledger, redis_url, prefix):
    from dlsr_monitor.config.settings import RedisSettings

    ledger.record(Decision("ab" * 32, ACCEPT, "ada", NOW, note="glare", image_id="img-1", source="cam-1",
                           origin="images:0:1"))  # fmt: skip
    settings = SimpleNamespace(redis=RedisSettings(url=redis_url, prefix=prefix, connect_retries=1))
    out = io.StringIO()
    assert run_vet_list(settings, as_json=True, out=out) == 0
    (row,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert (row["decision"], row["by"], row["note"], row["time"]) == (ACCEPT, "ada", "glare", "2025-06-15 15:06:40Z")
    out = io.StringIO()
    run_vet_list(settings, out=out)
    text = out.getvalue()
    assert "vetting decisions (1" in text and "img-1" in text and "ada" in text and "glare" in text


def test_confirmed_files_are_named_by_content_hash_and_extension(tmp_path):
    png, jpg = image((3, 3, 3)), image((3, 3, 3), "JPEG")
    assert (image_extension(png), image_extension(jpg)) == ("png", "jpg")
    p, created = store_confirmed(tmp_path, png)
    assert created and p.parent == confirmed_ood_dir(tmp_path) and p.suffix == ".png"
    assert store_confirmed(tmp_path, png) == (p, False)
    with pytest.raises(ValueError, match="not a readable image"):
        image_extension(b"not an image")
    assert confirmed_files(tmp_path / "none") == []
    assert not any(Path(tmp_path / "confirmed_ood").glob(".*"))  # no temp files left behind
