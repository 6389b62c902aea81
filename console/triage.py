"""`dlsr triage`: pick flagged images from the score records, fetch their originals, show them for a decision.

The score records (`dlsr.scores`) are read from the beginning to the end offsets taken at the start (no consumer
group); the chosen ones (`TriageFilter`, the highest scores first, at most `limit`) are fetched from the input
topic by the offset they name and proved by the sha256 they carry (console/originals.py). Written to `--out`:

- `contact_sheet.png`: thumbnails in a grid of ceil(n / cols) rows x cols, each with image id, source, event time,
  score and p-value, and a per-stage bar when the record has `layers`; the PNG's text chunks say how many
  thumbnails, the grid and the image ids, for scripts;
- `index.html`: one self-contained page (images inline as data URIs), sorted by score, with the same facts;
- `selection.json`: the chosen records (topic / partition / offset / sha256 / image id / source / alert id), which
  `dlsr vet accept|reject --selection` takes; originals that could not be fetched are listed with the reason.

A record whose original is gone (retention) or is another image (sha256 mismatch) is listed as missing, never a
crash. The console writes nothing to Kafka or Redis here.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dlsr_monitor.console.originals import (
    MISSING_REASONS,
    Missing,
    Origin,
    Original,
    fetch_originals,
    open_consumer,
    origin_text,
    read_topic,
)

if TYPE_CHECKING:
    from PIL import Image

    from dlsr_monitor.config.settings import Settings

SHIFTS = ("low_level", "semantic", "mixed")
SELECTION_KIND = "dlsr-triage-selection"
SELECTION_VERSION = 1
SHEET_NAME, HTML_NAME, SELECTION_NAME = "contact_sheet.png", "index.html", "selection.json"

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
_REQUIRED = ("image_id", "source", "topic", "partition", "offset", "ts", "score", "p_value", "is_ood")


# ---- time ---------------------------------------------------------------------------------------
def parse_when(text: str, *, now: float) -> float:
    """Unix seconds from ISO 8601 (a naive time is UTC) or a span back from `now`: `30s`, `15m`, `2h`, `1d`, `1w`.

    Raises:
        ValueError: neither form (the message shows both).
    """
    m = _SPAN.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2).lower()]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r}: use ISO 8601 (2025-01-31T14:00:00Z; no zone = UTC) or a span back from now "
            "(30s, 15m, 2h, 1d, 1w)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def fmt_time(ts: float | None) -> str:
    """`2025-01-31 14:03:07Z`, or `?` for a missing time."""
    if not isinstance(ts, int | float) or not math.isfinite(ts):
        return "?"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# ---- score records ------------------------------------------------------------------------------
def decode_score(value: bytes | str | None) -> dict | None:
    """A score record as a dict (fields of newer schemas kept as they are); None when it is not one."""
    if value is None:
        return None
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or any(k not in data for k in _REQUIRED):
        return None
    try:
        from dlsr_monitor.common.contract import parse_score

        return {**data, **parse_score(value).model_dump(mode="json")}
    except Exception:  # a record of a newer schema (e.g. `layers` / `shift`): take what it says, typed
        try:
            return {
                **data,
                "image_id": str(data["image_id"]),
                "source": str(data["source"]),
                "topic": str(data["topic"]),
                "partition": int(data["partition"]),
                "offset": int(data["offset"]),
                "ts": float(data["ts"]),
                "score": float(data["score"]),
                "p_value": float(data["p_value"]),
                "is_ood": bool(data["is_ood"]),
            }
        except (TypeError, ValueError):
            return None


def origin_of(rec: dict) -> Origin:
    return (str(rec["topic"]), int(rec["partition"]), int(rec["offset"]))


def shift_of(rec: dict) -> str | None:
    """The record's shift label (low_level / semantic / mixed), when it carries one."""
    shift = rec.get("shift")
    if isinstance(shift, dict):
        shift = shift.get("kind") or shift.get("label") or shift.get("type")
    return str(shift) if shift else None


@dataclass(frozen=True)
class Stage:
    """One stage of a record's `layers`: a label, the value it carries, and a bar height in [0, 1]."""

    label: str
    value: float
    strength: float
    is_p: bool


def _stage_number(entry: Any) -> tuple[float | None, bool]:
    if isinstance(entry, bool):
        return None, False
    if isinstance(entry, int | float):
        return float(entry), False
    if isinstance(entry, dict):
        for key in ("p_value", "p"):
            if isinstance(entry.get(key), int | float):
                return float(entry[key]), True
        for key in ("score", "value", "z"):
            if isinstance(entry.get(key), int | float):
                return float(entry[key]), False
    return None, False


def stages_of(rec: dict) -> list[Stage] | None:
    """The record's per-stage values as bars, or None when it has no (readable) `layers`.

    Accepts a list (numbers, or dicts with `p_value` / `p` / `score`) or a mapping stage -> number or dict.
    Per-stage p-values (dict keys, or a list of numbers all within [0, 1]) give bars of -log10(p) / 4 (full at
    p <= 1e-4); other values are scaled by the largest magnitude.
    """
    layers = rec.get("layers")
    if isinstance(layers, dict):
        pairs = [(str(k), *_stage_number(v)) for k, v in layers.items()]
    elif isinstance(layers, list | tuple):
        pairs = []
        for i, entry in enumerate(layers):
            label = str(entry.get("stage", entry.get("name", i + 1))) if isinstance(entry, dict) else str(i + 1)
            pairs.append((label, *_stage_number(entry)))
    else:
        return None
    pairs = [(lbl, v, p) for lbl, v, p in pairs if v is not None and math.isfinite(v)]
    if not pairs:
        return None
    as_p = all(p for _, _, p in pairs) or all(not p and 0.0 <= v <= 1.0 for _, v, p in pairs)
    if as_p:
        return [Stage(lbl, v, min(1.0, -math.log10(max(v, 1e-12)) / 4.0), True) for lbl, v, _ in pairs]
    top = max(abs(v) for _, v, _ in pairs) or 1.0
    return [Stage(lbl, v, min(1.0, abs(v) / top), False) for lbl, v, _ in pairs]


# ---- selection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TriageFilter:
    """Which score records to look at; None / empty means "any"."""

    sources: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None
    shift: str | None = None
    min_score: float | None = None
    max_p: float | None = None
    include_all: bool = False  # False: only records flagged is_ood

    def __post_init__(self) -> None:
        if self.shift is not None and self.shift not in SHIFTS:
            raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, got {self.shift!r}")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"--since ({fmt_time(self.since)}) is after --until ({fmt_time(self.until)})")

    def accepts(self, rec: dict) -> bool:
        if not self.include_all and not rec.get("is_ood"):
            return False
        if self.sources and rec.get("source") not in self.sources:
            return False
        ts = rec.get("ts")
        if self.since is not None and not (isinstance(ts, int | float) and ts >= self.since):
            return False
        if self.until is not None and not (isinstance(ts, int | float) and ts <= self.until):
            return False
        if self.shift is not None and shift_of(rec) != self.shift:
            return False
        if self.min_score is not None and not rec.get("score", -math.inf) >= self.min_score:
            return False
        return not (self.max_p is not None and not rec.get("p_value", math.inf) <= self.max_p)

    def describe(self) -> str:
        """One line for headers: the filters in force."""
        parts = ["all records" if self.include_all else "flagged OOD"]
        if self.sources:
            parts.append("source " + ",".join(sorted(self.sources)))
        if self.since is not None:
            parts.append(f"since {fmt_time(self.since)}")
        if self.until is not None:
            parts.append(f"until {fmt_time(self.until)}")
        if self.shift:
            parts.append(f"shift {self.shift}")
        if self.min_score is not None:
            parts.append(f"score >= {self.min_score:g}")
        if self.max_p is not None:
            parts.append(f"p <= {self.max_p:g}")
        return ", ".join(parts)

    def as_json(self) -> dict:
        return {
            "sources": sorted(self.sources),
            "since": self.since,
            "until": self.until,
            "shift": self.shift,
            "min_score": self.min_score,
            "max_p": self.max_p,
            "all": self.include_all,
        }


def select(records: Iterable[dict], flt: TriageFilter, *, limit: int | None = 100) -> list[dict]:
    """Records passing `flt`, one per input message (a replayed record replaces the earlier one), highest score
    first (then earliest), at most `limit` (None: all)."""
    latest: dict[Origin, dict] = {}
    for rec in records:
        latest[origin_of(rec)] = rec
    chosen = [r for r in latest.values() if flt.accepts(r)]
    chosen.sort(key=lambda r: (-float(r["score"]), float(r["ts"]), origin_of(r)))
    return chosen if limit is None else chosen[: max(0, limit)]


def read_scores(consumer: Any, topic: str) -> tuple[list[dict], int]:
    """Every score record of `topic` (bounded read) and how many records were not score records."""
    out, bad = [], 0
    for r in read_topic(consumer, topic):
        rec = decode_score(r.value)
        if rec is None:
            bad += 1
        else:
            out.append(rec)
    return out, bad


def read_alert_ids(consumer: Any, topic: str) -> dict[Origin, str]:
    """origin -> alert id of the OOD alerts on `topic` (bounded read)."""
    ids: dict[Origin, str] = {}
    for r in read_topic(consumer, topic):
        try:
            alert = json.loads(r.value)
            if isinstance(alert, dict) and alert.get("kind") == "ood":
                ids[(str(alert["topic"]), int(alert["partition"]), int(alert["offset"]))] = str(alert["alert_id"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue
    return ids


@dataclass
class TriageItem:
    """One chosen record, its alert id (if any) and its original (or why it is missing)."""

    record: dict
    alert_id: str | None = None
    original: Original | None = None
    missing: Missing | None = None

    @property
    def origin(self) -> Origin:
        return origin_of(self.record)

    @property
    def image_id(self) -> str:
        return str(self.record["image_id"])

    def as_json(self) -> dict:
        r = self.record
        out = {
            "status": "missing" if self.missing else "ok",
            "image_id": r["image_id"],
            "source": r["source"],
            "ts": r["ts"],
            "time": fmt_time(r["ts"]),
            "score": r["score"],
            "p_value": r["p_value"],
            "threshold": r.get("threshold"),
            "is_ood": r["is_ood"],
            "model_version": r.get("model_version"),
            "origin": origin_text(self.origin),
            "topic": r["topic"],
            "partition": r["partition"],
            "offset": r["offset"],
            "sha256": r.get("sha256") or (self.original.sha256 if self.original else None),
            "alert_id": self.alert_id,
        }
        if shift_of(r):
            out["shift"] = shift_of(r)
        if r.get("layers") is not None:
            out["layers"] = r["layers"]
        if self.missing:
            out["reason"] = self.missing.reason
            out["detail"] = self.missing.detail
        return out


def fetch_items(
    consumer: Any, records: list[dict], alert_ids: dict[Origin, str], *, on_progress: Callable[[int], None] | None
) -> list[TriageItem]:
    """TriageItems for `records` (in order), each with its original or its Missing."""
    items = [TriageItem(r, alert_ids.get(origin_of(r))) for r in records]
    found, missing = fetch_originals(
        consumer, [(it.origin, it.record.get("sha256")) for it in items], on_progress=on_progress
    )
    for it in items:
        it.original, it.missing = found.get(it.origin), missing.get(it.origin)
    return items


@contextlib.contextmanager
def progress_bar(total: int, label: str, stream: TextIO | None = None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on `stream` (stderr) while the block runs, only when it is a terminal; yields the
    callback that sets how many are done (None when there is no bar)."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if total <= 0 or not (isatty and isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(file=stream), transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


# ---- the contact sheet --------------------------------------------------------------------------
THUMB = 128
PAD = 6
LINE_H = 12
CAPTION_LINES = 4
BAR_H = 14
HEADER_H = 26
BACKGROUND = (250, 250, 250)
BAR_BG = (226, 232, 244)  # the stage bar's box (a tint no antialiased caption makes)


@dataclass(frozen=True)
class SheetGeometry:
    """Where thumbnails go: `rows` x `cols` cells of `cell_w` x `cell_h` under a header strip."""

    n: int
    rows: int
    cols: int
    cell_w: int
    cell_h: int
    width: int
    height: int
    header_h: int = HEADER_H

    def cell_box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the i-th cell, row by row."""
        r, c = divmod(i, self.cols)
        left, top = c * self.cell_w, self.header_h + r * self.cell_h
        return left, top, left + self.cell_w, top + self.cell_h

    def thumb_box(self, i: int) -> tuple[int, int, int, int]:
        left, top, _, _ = self.cell_box(i)
        return left + PAD, top + PAD, left + PAD + THUMB, top + PAD + THUMB


def sheet_geometry(n: int, cols: int = 8, *, stages: bool = False) -> SheetGeometry:
    """ceil(n / cols) rows of `cols` cells (fewer columns when n < cols); a stage-bar strip only when
    `stages`."""
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}")
    cols = min(cols, n) if n > 0 else cols
    rows = math.ceil(n / cols) if n > 0 else 0
    cell_w = THUMB + 2 * PAD
    cell_h = PAD + THUMB + 4 + CAPTION_LINES * LINE_H + (BAR_H + 4 if stages else 0) + PAD
    return SheetGeometry(n, rows, cols, cell_w, cell_h, cols * cell_w, HEADER_H + rows * cell_h)


def _font(size: int = 11) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(text: str, font: Any, width: int) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _decode(original: Original | None) -> Image.Image | None:
    if original is None:
        return None
    try:
        from dlsr.images import decode_image

        return decode_image(original.value)
    except Exception:  # shown as a placeholder; the record still says what it was
        return None


def _thumbnail(img: Image.Image, size: int) -> Image.Image:
    from PIL import Image

    scale = min(size / img.width, size / img.height)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    # Tiny images (CIFAR 32 px, MNIST 28 px) are enlarged with square pixels: no invented detail.
    return img.resize(new, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def _bar_colour(strength: float) -> tuple[int, int, int]:
    s = max(0.0, min(1.0, strength))
    return (int(60 + 195 * s), int(170 - 120 * s), 70)


def draw_stage_bars(draw: Any, box: tuple[int, int, int, int], stages: list[Stage]) -> None:
    """Small bar chart of per-stage strengths inside `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, fill=BAR_BG)
    k = len(stages)
    gap = 2
    w = max(1.0, (right - left - gap * (k - 1)) / k)
    for j, st in enumerate(stages):
        x0 = left + j * (w + gap)
        h = max(1, round(st.strength * (bottom - top)))
        draw.rectangle((round(x0), bottom - h, round(x0 + w) - 1, bottom), fill=_bar_colour(st.strength))


def render_contact_sheet(items: list[TriageItem], *, cols: int = 8, title: str = "") -> Image.Image:
    """The fetched items as a grid (order kept): thumbnail, image id, source, time, score / p-value, and the
    per-stage bar of records with `layers`. Missing items get no cell."""
    from PIL import Image, ImageDraw

    shown = [it for it in items if it.original is not None]
    stage_lists = [stages_of(it.record) for it in shown]
    geo = sheet_geometry(len(shown), cols, stages=any(s is not None for s in stage_lists))
    sheet = Image.new("RGB", (geo.width, geo.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small = _font(12), _font(11)
    draw.rectangle((0, 0, geo.width, geo.header_h - 1), fill=(40, 44, 52))
    draw.text((PAD, 6), _fit(title, font, geo.width - 2 * PAD), fill=(255, 255, 255), font=font)
    for i, (it, stages) in enumerate(zip(shown, stage_lists, strict=True)):
        left, top, right, _ = geo.cell_box(i)
        tl, tt, tr, tb = geo.thumb_box(i)
        rec = it.record
        img = _decode(it.original)
        draw.rectangle((tl - 2, tt - 2, tr + 1, tb + 1), fill=(200, 30, 30) if rec.get("is_ood") else (150, 150, 150))
        draw.rectangle((tl, tt, tr - 1, tb - 1), fill=(20, 20, 20))
        if img is not None:
            th = _thumbnail(img, THUMB)
            sheet.paste(th, (tl + (THUMB - th.width) // 2, tt + (THUMB - th.height) // 2))
        else:
            draw.text((tl + 8, tt + THUMB // 2 - 6), "not decodable", fill=(230, 230, 230), font=small)
        y = tb + 4
        lines = [
            it.image_id,
            str(rec.get("source", "")),
            fmt_time(rec.get("ts"))[5:],
            f"s={float(rec['score']):.4g} p={float(rec['p_value']):.2g}",
        ]
        for j, line in enumerate(lines):
            colour = (20, 20, 20) if j != 3 else ((170, 20, 20) if rec.get("is_ood") else (60, 60, 60))
            draw.text((tl, y), _fit(line, small, THUMB), fill=colour, font=small)
            y += LINE_H
        if stages:
            draw_stage_bars(draw, (tl, y + 2, tr - 1, y + 2 + BAR_H), stages)
    return sheet


def save_contact_sheet(sheet: Image.Image, path: Path, items: list[TriageItem], cols: int) -> SheetGeometry:
    """PNG with text chunks `dlsr:thumbnails`, `dlsr:grid` (rows x cols) and `dlsr:image_ids` (JSON)."""
    from PIL.PngImagePlugin import PngInfo

    shown = [it for it in items if it.original is not None]
    geo = sheet_geometry(len(shown), cols, stages=any(stages_of(it.record) for it in shown))
    info = PngInfo()
    info.add_text("dlsr:thumbnails", str(len(shown)))
    info.add_text("dlsr:grid", f"{geo.rows}x{geo.cols}")
    info.add_text("dlsr:image_ids", json.dumps([it.image_id for it in shown]))
    sheet.save(path, format="PNG", pnginfo=info, optimize=True)
    return geo


# ---- the HTML page ------------------------------------------------------------------------------
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
_INLINE_MAX = 1_000_000


def data_uri(original: Original) -> str | None:
    """The original as a data URI when a browser shows its format and it is at most 1 MB, else a PNG of it
    (at most 512 px); None when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(original.value)) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, ValueError):
        fmt = None
    if fmt in _MIME and len(original.value) <= _INLINE_MAX:
        return f"data:{_MIME[fmt]};base64,{base64.b64encode(original.value).decode()}"
    img = _decode(original)
    if img is None:
        return None
    buf = io.BytesIO()
    (_thumbnail(img, 512) if max(img.size) > 512 else img).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;background:#fafafa;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} .meta{color:#555;margin-bottom:1em}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:220px;font-size:12px}
.card.ood{border-color:#c33} .card img{width:200px;height:200px;object-fit:contain;background:#111;
image-rendering:pixelated;display:block;margin:0 auto 6px}
.card .id{font-weight:600;word-break:break-all} .card table{border-collapse:collapse;width:100%}
.card td{padding:1px 2px;vertical-align:top} .card td:first-child{color:#666;width:38%}
.stages{display:flex;align-items:flex-end;gap:2px;height:28px;background:#eee;margin-top:4px}
.stages div{flex:1;min-height:1px}
table.missing{border-collapse:collapse;margin-top:.5em;font-size:13px}
table.missing td,table.missing th{border:1px solid #ddd;padding:3px 6px;text-align:left}
code{font-size:11px}
"""


def _stage_html(stages: list[Stage]) -> str:
    bars = "".join(
        f'<div title="stage {html.escape(s.label)}: {"p" if s.is_p else "value"} {s.value:.3g}" '
        f'style="height:{max(1, round(100 * s.strength))}%;background:rgb{_bar_colour(s.strength)}"></div>'
        for s in stages
    )
    what = "per-stage -log10 p" if stages[0].is_p else "per-stage value"
    return f'<div class="stages" title="{what}">{bars}</div>'


def render_html(items: list[TriageItem], *, title: str, meta: str) -> str:
    """One self-contained page: a card per fetched item (sorted by score, highest first) and a table of the
    missing ones with the reason."""
    e = html.escape
    shown = sorted((it for it in items if it.original is not None), key=lambda it: -float(it.record["score"]))
    cards = []
    for it in shown:
        r = it.record
        uri = data_uri(it.original) if it.original else None
        img = f'<img alt="{e(it.image_id)}" src="{uri}">' if uri else "<p>(not decodable)</p>"
        rows = [
            ("source", e(str(r["source"]))),
            ("time", e(fmt_time(r["ts"]))),
            ("score", f"{float(r['score']):.5g}" + (f" (thr {float(r['threshold']):.5g})" if r.get("threshold") is not None else "")),
            ("p-value", f"{float(r['p_value']):.3g}"),
            ("flagged", "yes" if r.get("is_ood") else "no"),
        ]
        if shift_of(r):
            rows.append(("shift", e(shift_of(r) or "")))
        rows += [
            ("origin", f"<code>{e(origin_text(it.origin))}</code>"),
            ("sha256", f"<code title=\"{e(it.original.sha256)}\">{e(it.original.sha256[:16])}...</code>"),
        ]
        if it.alert_id:
            rows.append(("alert", f"<code>{e(it.alert_id)}</code>"))
        if r.get("model_version"):
            rows.append(("model", e(str(r["model_version"]))))
        table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
        stages = stages_of(r)
        cards.append(
            f'<div class="card{" ood" if r.get("is_ood") else ""}" data-image-id="{e(it.image_id)}">{img}'
            f'<div class="id">{e(it.image_id)}</div><table>{table}</table>'
            f"{_stage_html(stages) if stages else ''}</div>"
        )
    missing = [it for it in items if it.missing is not None]
    miss_html = ""
    if missing:
        rows_html = "".join(
            f"<tr><td>{e(it.image_id)}</td><td>{e(str(it.record['source']))}</td>"
            f"<td><code>{e(origin_text(it.origin))}</code></td><td>{e(it.missing.reason)}</td>"
            f"<td>{e(it.missing.detail)}</td></tr>"
            for it in missing
            if it.missing is not None
        )
        miss_html = (
            f"<h2>Missing ({len(missing)})</h2><table class=\"missing\"><tr><th>image id</th><th>source</th>"
            f"<th>origin</th><th>reason</th><th>detail</th></tr>{rows_html}</table>"
        )
    return (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{e(title)}</h1><div class=\"meta\">{e(meta)}</div>"
        f"<div class=\"grid\">{''.join(cards)}</div>{miss_html}</body></html>\n"
    )


# ---- the selection file -------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """An input message to vet: where it is, what it must be (sha256), and what it was called."""

    topic: str
    partition: int
    offset: int
    sha256: str | None
    image_id: str
    source: str
    alert_id: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def origin(self) -> Origin:
        return (self.topic, self.partition, self.offset)


def candidate_of(rec: dict, alert_id: str | None = None) -> Candidate:
    return Candidate(
        topic=str(rec["topic"]),
        partition=int(rec["partition"]),
        offset=int(rec["offset"]),
        sha256=rec.get("sha256"),
        image_id=str(rec["image_id"]),
        source=str(rec["source"]),
        alert_id=alert_id,
    )


def selection_json(items: list[TriageItem], *, flt: TriageFilter, scores_topic: str, created: float) -> dict:
    """The selection file's content: fetched items under `items`, the others under `missing`."""

    def entry(it: TriageItem) -> dict:
        r = it.record
        return {
            "topic": r["topic"],
            "partition": r["partition"],
            "offset": r["offset"],
            "origin": origin_text(it.origin),
            "sha256": r.get("sha256") or (it.original.sha256 if it.original else None),
            "image_id": r["image_id"],
            "source": r["source"],
            "alert_id": it.alert_id,
            "ts": r["ts"],
            "score": r["score"],
            "p_value": r["p_value"],
            "is_ood": r["is_ood"],
        }

    return {
        "kind": SELECTION_KIND,
        "version": SELECTION_VERSION,
        "created": fmt_time(created),
        "scores_topic": scores_topic,
        "filters": flt.as_json(),
        "items": [entry(it) for it in items if it.original is not None],
        "missing": [
            {**entry(it), "reason": it.missing.reason, "detail": it.missing.detail}
            for it in items
            if it.missing is not None
        ],
    }


def load_selection(path: str | Path) -> list[Candidate]:
    """The `items` of a selection file written by `dlsr triage`.

    Raises:
        ValueError: the file is not a triage selection (the message names the file and the entry).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"selection file {p} not found") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"selection file {p} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != SELECTION_KIND or not isinstance(data.get("items"), list):
        raise ValueError(f"{p} is not a selection file written by 'dlsr triage' (no kind {SELECTION_KIND!r})")
    out = []
    for i, item in enumerate(data["items"]):
        try:
            out.append(candidate_of(item, item.get("alert_id")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{p}: items[{i}] lacks topic / partition / offset / image_id / source ({exc})") from None
    return out


# ---- the command ------------------------------------------------------------------------------
def default_out_dir(now: float) -> Path:
    """./triage-<UTC timestamp>."""
    return Path(f"triage-{datetime.fromtimestamp(now, UTC):%Y%m%dT%H%M%SZ}")


@dataclass
class TriageResult:
    """What a run chose and wrote."""

    items: list[TriageItem]
    out_dir: Path
    sheet: Path
    html: Path
    selection: Path
    geometry: SheetGeometry
    undecodable_records: int = 0


def run_triage(
    settings: Settings,
    flt: TriageFilter,
    *,
    limit: int | None = 100,
    out_dir: Path | None = None,
    as_json: bool = False,
    cols: int = 8,
    out: TextIO | None = None,
    err: TextIO | None = None,
    consumer: Any | None = None,
    now: float | None = None,
) -> TriageResult:
    """Read the score records, choose, fetch, write the sheet / page / selection; print JSON lines or a summary.

    Raises:
        StartupError: the broker is unreachable (bounded retries) or stops answering mid-read.
    """
    import time

    out, err = out or sys.stdout, err or sys.stderr
    now = time.time() if now is None else now
    kafka = settings.kafka
    own = consumer is None
    consumer = consumer or open_consumer(kafka)
    try:
        records, bad = read_scores(consumer, kafka.scores_topic)
        if flt.shift is not None and not any(shift_of(r) for r in records):
            print(
                f"dlsr triage: note: no score record on {kafka.scores_topic} carries `shift` (the model has no "
                "per-stage calibration): --shift matches nothing",
                file=err,
            )
        chosen = select(records, flt, limit=limit)
        alert_ids = read_alert_ids(consumer, kafka.alerts_topic) if chosen else {}
        with progress_bar(len(chosen), "fetching originals", err) as tick:
            items = fetch_items(consumer, chosen, alert_ids, on_progress=tick)
    finally:
        if own:
            consumer.close()

    out_dir = out_dir or default_out_dir(now)
    out_dir.mkdir(parents=True, exist_ok=True)
    fetched = sum(it.original is not None for it in items)
    title = f"DLSR triage: {fetched} image(s), {flt.describe()}"
    meta = (
        f"{len(items)} chosen of {len(records)} score records on {kafka.scores_topic} (highest score first"
        f"{f', at most {limit}' if limit is not None else ''}); {len(items) - fetched} missing; created "
        f"{fmt_time(now)}"
    )
    sheet_path, html_path, sel_path = out_dir / SHEET_NAME, out_dir / HTML_NAME, out_dir / SELECTION_NAME
    geo = save_contact_sheet(render_contact_sheet(items, cols=cols, title=title), sheet_path, items, cols)
    html_path.write_text(render_html(items, title=title, meta=meta), encoding="utf-8")
    sel = selection_json(items, flt=flt, scores_topic=kafka.scores_topic, created=now)
    sel_path.write_text(json.dumps(sel, indent=1) + "\n", encoding="utf-8")

    summary = out if not as_json else err
    if as_json:
        for it in items:
            print(json.dumps(it.as_json(), separators=(",", ":"), sort_keys=True), file=out)
    for it in items:
        if it.missing is not None:
            print(
                f"missing {it.image_id} ({origin_text(it.origin)}): {it.missing.reason}: {it.missing.detail}",
                file=err,
            )
    if bad:
        print(f"dlsr triage: note: {bad} record(s) on {kafka.scores_topic} are not score records (skipped)", file=err)
    print(
        f"{len(items)} chosen ({flt.describe()}), {fetched} fetched, {len(items) - fetched} missing; wrote "
        f"{sheet_path}, {html_path}, {sel_path}",
        file=summary,
    )
    return TriageResult(items, out_dir, sheet_path, html_path, sel_path, geo, bad)


def missing_reason_help() -> str:
    """The missing reasons, for --help."""
    return "; ".join(f"{k}: {v}" for k, v in MISSING_REASONS.items())
