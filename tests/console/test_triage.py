"""`dlsr triage`: time parsing, selection, fetch-by-offset with missing reasons, contact sheet, HTML, selection
file; a whole run over an in-memory log (the real broker is in tests/integration/test_triage_vet.py)."""

from __future__ import annotations

import hashlib
import io
import json
import math
from types import SimpleNamespace

import pytest
from PIL import Image

from dlsr_monitor.common.contract import ScoreRecord
from dlsr_monitor.console.originals import MISSING_REASONS, fetch_originals, read_topic
from dlsr_monitor.console.triage import (
    BACKGROUND,
    BAR_BG,
    SELECTION_NAME,
    SHEET_NAME,
    TriageFilter,
    TriageItem,
    decode_score,
    load_selection,
    parse_when,
    read_scores,
    render_contact_sheet,
    render_html,
    run_triage,
    save_contact_sheet,
    select,
    selection_json,
    sheet_geometry,
    stages_of,
)

NOW = 1_750_000_000.0


# ---- an in-memory log with the consumer calls the console uses ------------------------------------
class FakeLog:
    """Partitions {(topic, partition): (beginning offset, [value or None])}; None is a hole (compacted).
    `listed_short` makes `end_offsets` report that many fewer than the end (as Tansu does for batches)."""

    def __init__(self, parts: dict, batch: int = 3, listed_short: int = 0) -> None:
        self.parts, self.batch, self.listed_short = parts, batch, listed_short
        self.pos: dict = {}
        self.hw: dict = {}
        self.assigned: list = []
        self.paused: set = set()
        self.seeks = 0

    def partitions_for_topic(self, topic):
        return {p for t, p in self.parts if t == topic}

    def _range(self, tp):
        begin, values = self.parts[(tp.topic, tp.partition)]
        return begin, begin + len(values)

    def beginning_offsets(self, tps):
        return {tp: self._range(tp)[0] for tp in tps}

    def end_offsets(self, tps):
        return {tp: max(self._range(tp)[0], self._range(tp)[1] - self.listed_short) for tp in tps}

    def highwater(self, tp):
        return self.hw.get(tp)  # known once a fetch answered for the partition

    def assign(self, tps):
        self.assigned = list(tps)
        self.paused = set()
        self.hw = {}

    def seek(self, tp, off):
        self.seeks += 1
        self.pos[tp] = off

    def pause(self, tp):
        self.paused.add(tp)

    def position(self, tp):
        return self.pos[tp]

    def poll(self, timeout_ms=0, max_records=None):
        out = {}
        for tp in self.assigned:
            if tp in self.paused:
                continue
            begin, values = self.parts[(tp.topic, tp.partition)]
            self.hw[tp] = begin + len(values)
            off, recs = max(self.pos.get(tp, begin), begin), []
            while off < begin + len(values) and len(recs) < self.batch:
                v = values[off - begin]
                if v is not None:
                    recs.append(SimpleNamespace(
                        topic=tp.topic, partition=tp.partition, offset=off, value=v, key=b"k",
                        headers=[("source", b"cam")], timestamp=1000 * int(NOW),
                    ))  # fmt: skip
                off += 1
            self.pos[tp] = off
            if recs:
                out[tp] = recs
        return out

    def close(self):
        pass


def png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(i: int, *, source="cam-ood", score=2.0, p=0.001, ood=True, ts=NOW - 60, partition=0, offset=None,
           data: bytes | None = None, **extra) -> dict:  # fmt: skip
    rec = ScoreRecord(
        image_id=f"img-{i}", source=source, topic="images", partition=partition,
        offset=i if offset is None else offset, ts=ts, score=score, threshold=1.0, p_value=p, is_ood=ood,
        model_version="v1", latency_ms=5.0, instance="m0", sha256=sha(data) if data is not None else None,
    ).model_dump(mode="json")  # fmt: skip
    return {**rec, **extra}


# ---- time -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("15m", NOW - 900), ("2h", NOW - 7200), ("30s", NOW - 30), ("1d", NOW - 86400), ("1.5h", NOW - 5400),
     (" 2H ", NOW - 7200), ("1w", NOW - 7 * 86400)],
)  # fmt: skip
def test_relative_spans_count_back_from_now(text, expected):
    assert parse_when(text, now=NOW) == pytest.approx(expected)


def test_iso_times_with_and_without_zone():
    assert parse_when("2025-06-15T16:26:40Z", now=NOW) == 1_750_004_800.0
    assert parse_when("2025-06-15T16:26:40", now=NOW) == 1_750_004_800.0  # naive = UTC
    assert parse_when("2025-06-15T18:26:40+02:00", now=NOW) == 1_750_004_800.0
    assert parse_when("2025-06-15", now=NOW) == 1_749_945_600.0


@pytest.mark.parametrize("text", ["yesterday", "15", "15 minutes", "-2h", ""])
def test_bad_times_say_both_forms(text):
    with pytest.raises(ValueError, match="ISO 8601.*15m"):
        parse_when(text, now=NOW)


# ---- records and selection --------------------------------------------------------------------
def test_decode_score_keeps_newer_fields_and_drops_non_records():
    rec = record(1, layers=[0.5, 0.01, 1e-5], shift="semantic")
    got = decode_score(json.dumps(rec).encode())
    assert got["layers"] == [0.5, 0.01, 1e-5] and got["shift"] == "semantic" and got["offset"] == 1
    assert decode_score(ScoreRecord.model_validate(record(2)).to_bytes())["image_id"] == "img-2"
    for bad in (b"not json", b"[1, 2]", json.dumps({"image_id": "x"}).encode(), None,
                json.dumps({**record(3), "offset": "many"}).encode()):  # fmt: skip
        assert decode_score(bad) is None


def test_selection_filters_dedupes_orders_and_limits():
    recs = [
        record(1, score=3.0),
        record(2, score=5.0, source="cam-id"),
        record(3, score=1.5, ood=False, p=0.3),
        record(4, score=4.0, ts=NOW - 7200),
        record(5, score=2.5, shift="semantic", p=0.02),
        record(6, score=9.0, shift="low_level"),
        record(1, score=3.0),  # a replay of 1: same input message, counted once
    ]
    ids = lambda rs: [r["image_id"] for r in rs]  # noqa: E731
    assert ids(select(recs, TriageFilter())) == ["img-6", "img-2", "img-4", "img-1", "img-5"]
    assert ids(select(recs, TriageFilter(include_all=True), limit=None))[-1] == "img-3"
    assert ids(select(recs, TriageFilter(sources=frozenset({"cam-ood"})), limit=2)) == ["img-6", "img-4"]
    since = parse_when("1h", now=NOW)
    assert "img-4" not in ids(select(recs, TriageFilter(since=since)))
    assert ids(select(recs, TriageFilter(until=since))) == ["img-4"]
    assert ids(select(recs, TriageFilter(shift="semantic"))) == ["img-5"]  # records without `shift` do not match
    assert ids(select(recs, TriageFilter(min_score=4.0))) == ["img-6", "img-2", "img-4"]
    assert ids(select(recs, TriageFilter(max_p=0.005))) == ["img-6", "img-2", "img-4", "img-1"]
    with pytest.raises(ValueError, match="shift must be one of"):
        TriageFilter(shift="colour")
    with pytest.raises(ValueError, match="after --until"):
        TriageFilter(since=NOW, until=NOW - 1)


def test_stage_bars_from_p_values_scores_or_nothing():
    assert stages_of(record(1)) is None
    assert stages_of(record(1, layers=[])) is None
    p = stages_of(record(1, layers=[1.0, 0.01, 1e-4, 1e-9]))
    assert [s.is_p for s in p] == [True] * 4
    assert [round(s.strength, 3) for s in p] == [0.0, 0.5, 1.0, 1.0]
    d = stages_of(record(1, layers=[{"stage": "s2", "p_value": 0.1}, {"stage": "s3", "p_value": 0.001}]))
    assert [s.label for s in d] == ["s2", "s3"] and d[1].strength > d[0].strength
    sc = stages_of(record(1, layers={"1": 2.0, "2": -8.0, "3": 4.0}))
    assert [s.is_p for s in sc] == [False] * 3 and [s.strength for s in sc] == [0.25, 1.0, 0.5]


# ---- fetch by offset ----------------------------------------------------------------------------
def test_fetch_reports_every_missing_reason_and_never_raises():
    a, b, c, other = png((200, 0, 0)), png((0, 200, 0)), png((0, 0, 200)), png((9, 9, 9))
    # partition 0 lost offsets 0..9 to retention; partition 1 has a hole at 2 (compaction).
    log = FakeLog({("images", 0): (10, [a, b, other, c]), ("images", 1): (0, [a, b, None, c])})
    wanted = [
        (("images", 0, 10), sha(a)),  # ok
        (("images", 0, 11), None),  # ok, not checked
        (("images", 0, 12), sha(b)),  # another image at that offset
        (("images", 0, 3), sha(a)),  # expired
        (("images", 0, 99), sha(a)),  # beyond the end
        (("images", 1, 2), sha(c)),  # hole
        (("images", 1, 3), sha(c)),  # ok
        (("images", 7, 0), sha(c)),  # no such partition
        (("gone", 0, 0), sha(c)),  # no such topic
        (("images", 0, 10), sha(a)),  # asked twice: fetched once
    ]
    ticks = []
    found, missing = fetch_originals(log, wanted, on_progress=ticks.append)
    assert set(found) == {("images", 0, 10), ("images", 0, 11), ("images", 1, 3)}
    assert found[("images", 0, 10)].value == a and found[("images", 0, 10)].header("source") == b"cam"
    reasons = {o: m.reason for o, m in missing.items()}
    assert reasons == {
        ("images", 0, 12): "sha256_mismatch",
        ("images", 0, 3): "expired",
        ("images", 0, 99): "beyond_end",
        ("images", 1, 2): "not_found",
        ("images", 7, 0): "no_partition",
        ("gone", 0, 0): "no_partition",
    }
    assert set(reasons.values()) <= set(MISSING_REASONS)
    assert "beginning offset 10" in missing[("images", 0, 3)].detail
    assert ticks[-1] == 9 and ticks == sorted(ticks)
    # 10, 11, 12 come in one fetch (batch of 3), 99 takes one; partition 1: one seek for 2 (its batch brings 3)
    assert log.seeks == 3


def test_a_listed_end_offset_short_of_the_real_end_is_not_believed():
    # Tansu lists the base offset of the last batch + 1 as the end; the fetch's high watermark is right.
    values = [png((i, i, i)) for i in range(9)]
    log = FakeLog({("images", 0): (0, values)}, listed_short=5)
    found, missing = fetch_originals(log, [(("images", 0, 8), sha(values[8])), (("images", 0, 9), None)])
    assert set(found) == {("images", 0, 8)} and missing[("images", 0, 9)].reason == "beyond_end"
    assert [r.offset for r in read_topic(FakeLog({("s", 0): (0, values)}, listed_short=5), "s")] == list(range(9))


def test_bounded_read_stops_at_the_end_offsets():
    log = FakeLog({("s", 0): (5, [b"x"] * 7), ("s", 1): (0, []), ("s", 2): (0, [b"y", None, b"z"])})
    got = list(read_topic(log, "s"))
    assert sorted((r.partition, r.offset) for r in got) == [(0, o) for o in range(5, 12)] + [(2, 0), (2, 2)]
    assert list(read_topic(log, "absent")) == []


# ---- the contact sheet, the page, the selection file ------------------------------------------------
def _items(n: int, *, layers: bool = False) -> list[TriageItem]:
    from dlsr_monitor.console.originals import Original

    items = []
    for i in range(n):
        data = png(((37 * i) % 256, 120, 200 - i % 200))
        rec = record(i, score=10.0 - i * 0.01, data=data, **({"layers": [0.5, 0.01, 1e-5]} if layers else {}))
        items.append(TriageItem(rec, f"ood:img-{i}", Original("images", 0, i, data, b"cam", (("source", b"cam"),), 0)))
    return items


@pytest.mark.parametrize(("n", "cols"), [(1, 8), (7, 8), (8, 8), (9, 8), (17, 8), (23, 5), (3, 1)])
def test_sheet_is_ceil_n_over_cols_rows_of_cols_thumbnails(n, cols):
    geo = sheet_geometry(n, cols)
    eff = min(cols, n)
    assert (geo.rows, geo.cols) == (math.ceil(n / eff), eff)
    assert (geo.width, geo.height) == (eff * geo.cell_w, geo.header_h + geo.rows * geo.cell_h)
    assert sheet_geometry(n, cols, stages=True).cell_h > geo.cell_h


@pytest.mark.parametrize(("n", "layers"), [(11, False), (5, True)])
def test_rendered_sheet_has_one_thumbnail_per_image_and_says_so(tmp_path, n, layers):
    items = _items(n, layers=layers)
    sheet = render_contact_sheet(items, cols=4, title="t")
    geo = sheet_geometry(n, 4, stages=layers)
    assert sheet.size == (geo.width, geo.height)
    filled = []
    for i in range(geo.rows * geo.cols):
        cell = sheet.crop(geo.thumb_box(i))
        filled.append(cell.getcolors(1 << 16) != [(cell.width * cell.height, BACKGROUND)])
    assert filled == [True] * n + [False] * (geo.rows * geo.cols - n)
    # a stage bar (its grey box, bars inside) under the caption only when records carry `layers`
    bar_box = sheet.getcolors(1 << 20)
    assert any(colour == BAR_BG for _, colour in bar_box) == layers
    path = tmp_path / SHEET_NAME
    saved = save_contact_sheet(sheet, path, items, 4)
    with Image.open(path) as im:
        assert im.size == (saved.width, saved.height)
        assert im.text["dlsr:thumbnails"] == str(n) and im.text["dlsr:grid"] == f"{geo.rows}x{geo.cols}"
        assert json.loads(im.text["dlsr:image_ids"]) == [f"img-{i}" for i in range(n)]


def test_html_names_every_image_inline_and_lists_missing_reasons():
    from dlsr_monitor.console.originals import Missing

    items = _items(6, layers=True)
    items[2] = TriageItem(items[2].record, None, None, Missing("images", 0, 2, "expired", "offset 2 < 5"))
    page = render_html(items, title="DLSR triage <x>", meta="m")
    for it in items:
        assert f'data-image-id="{it.image_id}"' in page or it.missing is not None
        assert it.image_id in page
    assert page.count("data:image/png;base64,") == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert "Missing (1)" in page and "expired" in page and "offset 2 &lt; 5" in page
    assert "DLSR triage &lt;x&gt;" in page and page.count('class="stages"') == 5
    # sorted by score, highest first
    order = [page.index(f'data-image-id="img-{i}"') for i in (0, 1, 3, 4, 5)]
    assert order == sorted(order)


def test_selection_file_round_trip_and_refuses_other_files(tmp_path):
    from dlsr_monitor.console.originals import Missing

    items = _items(3)
    items[1] = TriageItem(items[1].record, None, None, Missing("images", 0, 1, "sha256_mismatch", "d"))
    sel = selection_json(items, flt=TriageFilter(), scores_topic="scores", created=NOW)
    assert [m["reason"] for m in sel["missing"]] == ["sha256_mismatch"]
    path = tmp_path / SELECTION_NAME
    path.write_text(json.dumps(sel))
    got = load_selection(path)
    assert [(c.origin, c.image_id, c.alert_id, c.sha256) for c in got] == [
        (("images", 0, 0), "img-0", "ood:img-0", items[0].record["sha256"]),
        (("images", 0, 2), "img-2", "ood:img-2", items[2].record["sha256"]),
    ]
    (tmp_path / "other.json").write_text('{"items": []}')
    for bad, match in ((tmp_path / "other.json", "not a selection file"), (tmp_path / "nope.json", "not found")):
        with pytest.raises(ValueError, match=match):
            load_selection(bad)


# ---- a whole run over the in-memory log ---------------------------------------------------------
def test_run_writes_sheet_page_selection_and_json_lines(tmp_path):
    imgs = [png((10 * i, 100, 50)) for i in range(6)]
    scores = [record(i, score=5.0 - i, data=imgs[i]) for i in range(5)]
    scores.append(record(5, data=imgs[0], score=9.0))  # its offset holds another image
    scores.append(record(6, score=8.0, offset=40))  # beyond the input topic's end
    scores.append(record(7, source="cam-id", ood=False, score=0.1))
    alert = {"kind": "ood", "alert_id": "ood:img-1", "topic": "images", "partition": 0, "offset": 1}
    log = FakeLog({
        ("images", 0): (0, imgs + [png((1, 1, 1))] * 2),
        ("scores", 0): (0, [json.dumps(s).encode() for s in scores] + [b"junk"]),
        ("alerts", 0): (0, [json.dumps(alert).encode(), b"{}"]),
    })  # fmt: skip
    settings = SimpleNamespace(kafka=SimpleNamespace(scores_topic="scores", alerts_topic="alerts"))
    out, err = io.StringIO(), io.StringIO()
    res = run_triage(settings, TriageFilter(sources=frozenset({"cam-ood"})), out_dir=tmp_path / "t", as_json=True,
                     cols=3, out=out, err=err, consumer=log, now=NOW)  # fmt: skip
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["image_id"] for x in lines] == ["img-5", "img-6", "img-0", "img-1", "img-2", "img-3", "img-4"]
    status = {x["image_id"]: (x["status"], x.get("reason")) for x in lines}
    assert status["img-5"] == ("missing", "sha256_mismatch") and status["img-6"] == ("missing", "beyond_end")
    assert lines[3]["alert_id"] == "ood:img-1" and lines[2]["alert_id"] is None
    assert "missing img-5" in err.getvalue() and "1 record(s)" in err.getvalue() and "5 fetched" in err.getvalue()
    with Image.open(res.sheet) as im:
        assert im.size == (3 * res.geometry.cell_w, res.geometry.header_h + 2 * res.geometry.cell_h)
        assert im.text["dlsr:thumbnails"] == "5"
    page = res.html.read_text()
    assert all(f"img-{i}" in page for i in range(7))
    sel = json.loads(res.selection.read_text())
    assert [i["image_id"] for i in sel["items"]] == ["img-0", "img-1", "img-2", "img-3", "img-4"]
    assert {m["image_id"] for m in sel["missing"]} == {"img-5", "img-6"}
    assert sel["filters"]["sources"] == ["cam-ood"]


def test_read_scores_counts_what_is_not_a_record():
    log = FakeLog({("scores", 0): (0, [json.dumps(record(1)).encode(), b"x", b"{}"])})
    recs, bad = read_scores(log, "scores")
    assert [r["image_id"] for r in recs] == ["img-1"] and bad == 2


def test_progress_bar_only_on_a_terminal():
    from dlsr_monitor.console.triage import progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    pipe = io.StringIO()
    with progress_bar(5, "fetching originals", pipe) as tick:
        assert tick is None
    assert pipe.getvalue() == ""
    tty = Tty()
    with progress_bar(5, "fetching originals", tty) as tick:
        for i in range(1, 6):
            tick(i)
    assert "fetching originals" in tty.getvalue()
