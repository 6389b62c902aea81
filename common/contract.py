"""The message contract: what goes in, what comes out, as pydantic models any consumer can validate against.

Input (topic `kafka.input_topic`): value = encoded image bytes; optional headers `image_id`, `source`, `ts`.
Output: one `ScoreRecord` per scored message on `dlsr.scores` (key = source), alerts on `dlsr.alerts`
(`OodAlert`, `DriftAlert`, `ModelAlert`; key = source), dead letters on `dlsr.dlq` (original value, key and
headers plus `error` / `error_detail`). Count(in) = count(scores) + count(dead letters).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

#: 2 added `sha256` (content hash of the input value) and, when the model has per-stage calibration, `layers`
#: and `shift`; version 1 records (without them) still parse. 3 added `guarantee` and `delta` to score records
#: (which false-alarm guarantee the threshold holds); version 1 and 2 records (without them) still parse.
#: Changes are additive: a consumer of version N reads version N + 1 by ignoring the fields it does not know.
SCHEMA_VERSION = 3

#: Dead-letter headers added to the original ones (bytes, utf-8).
DLQ_ERROR = "error"  # short slug, e.g. "too_many_pixels", "not_an_image"
DLQ_ERROR_DETAIL = "error_detail"  # one human-readable line
DLQ_ORIGIN = "origin"  # "topic:partition:offset" of the input message
DLQ_IMAGE_ID = "image_id"

#: Input headers the monitor understands.
H_IMAGE_ID = "image_id"
H_SOURCE = "source"
H_TS = "ts"
DEFAULT_SOURCE = "default"

#: Provenance headers of a message on the vetted topic (`dlsr vet accept`), besides the original `source`,
#: `image_id` (and `ts`, when the input had one). Value = the original input bytes, unchanged.
VETTED_ORIGIN = "origin"  # "topic:partition:offset" of the input message
VETTED_ALERT_ID = "alert_id"  # the OOD alert raised for it, when there was one
VETTED_BY = "vetted_by"
VETTED_AT = "vetted_at"  # ISO 8601, UTC
VETTED_NOTE = "note"
VETTED_SHA256 = "sha256"  # of the value (hex)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Optional fields left out of the wire form while None, so records without them stay byte-identical.
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    schema_version: int = SCHEMA_VERSION

    def wire_exclude(self) -> set[str] | None:
        """The fields `to_bytes` (and `alert_to_json`) leave out of this record."""
        return {name for name in self.omit_if_none if getattr(self, name) is None} or None

    def to_bytes(self) -> bytes:
        """Compact JSON, utf-8 (what goes on the wire)."""
        return self.model_dump_json(exclude=self.wire_exclude()).encode()


#: What the per-stage evidence fields say (ScoreRecord and OodAlert; README "Message contract").
LAYERS_DESCRIPTION = (
    "Present only when the model has per-stage calibration: one conformal p-value per encoder stage (4 "
    "significant digits), stage 1 = low-level texture / colour / noise (the earliest, highest-resolution map) "
    "... the last = semantics (object content). Each is the stage's own score (DLSR: the reconstruction error "
    "of that layer; the Gaussian and kNN baselines: the distance within that stage's dims) against the same "
    "stage's scores on the model's calibration split (the artifact's, also when `p_value` comes from the "
    "vetted baseline reservoir)"
)
SHIFT_DESCRIPTION = (
    "Present with `layers`: which kind of shift they point to (dlsr.evidence.shift_of). early = stages "
    "1..floor(S/2), late = the rest (the middle stage of an odd S is late; Lite0: early 1-2, late 3-5); a half "
    "is significant when its smallest p-value is <= the model's alpha. 'low_level' = early significant and late "
    "not (noise, blur, a colour cast ...), 'semantic' = late significant and early not (unfamiliar content), "
    "'mixed' = both or neither (always for fewer than 2 stages)"
)


#: What the guarantee fields say (ScoreRecord; README "Message contract").
GUARANTEE_DESCRIPTION = (
    "Which false-alarm guarantee the threshold in force holds (the model's calibration method, also when the "
    "threshold comes from the vetted baseline reservoir): 'marginal' = in-distribution images are flagged at "
    "most alpha of the time on average over calibration sets (one calibration set may realise more); 'pac' = "
    "at most alpha for this calibration set, with probability at least 1 - `delta`. Absent in records of "
    "schema version 1 and 2"
)
DELTA_DESCRIPTION = (
    "Present with guarantee 'pac': the chance that the calibration set realises a false-alarm rate above alpha"
)


class ScoreRecord(_Record):
    """One per scored input message on `dlsr.scores`."""

    image_id: str = Field(description="Header `image_id`, else `topic:partition:offset` (stable across replays)")
    source: str = Field(description="Header `source`, else the message key, else 'default'")
    topic: str
    partition: int
    offset: int
    ts: float = Field(description="Event time, Unix seconds (header `ts`, else the Kafka timestamp)")
    score: float = Field(description="DLSR score, higher = more OOD")
    threshold: float = Field(description="Threshold in force for this model version when the image was scored")
    p_value: float = Field(description="Conformal p-value against the ID baseline")
    is_ood: bool
    model_version: str
    latency_ms: float = Field(description="Kafka timestamp to score, milliseconds")
    instance: str = Field(description="Monitor instance that scored it")
    sha256: str | None = Field(
        default=None, description="SHA-256 of the input message's value (hex): finds the original and proves it"
    )
    input_notes: list[str] | None = Field(
        default=None,
        description="Present only when an input header was unusable and a documented default was used instead "
        "(e.g. a `ts` of NaN, inf, before 2000 or more than a day ahead: the Kafka timestamp is used)",
    )
    layers: list[float] | None = Field(default=None, description=LAYERS_DESCRIPTION)
    shift: Literal["low_level", "semantic", "mixed"] | None = Field(default=None, description=SHIFT_DESCRIPTION)
    guarantee: Literal["marginal", "pac"] | None = Field(default=None, description=GUARANTEE_DESCRIPTION)
    delta: float | None = Field(default=None, description=DELTA_DESCRIPTION)

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"layers", "shift", "guarantee", "delta"})

    def wire_exclude(self) -> set[str] | None:
        out = super().wire_exclude() or set()
        return (out | ({"input_notes"} if not self.input_notes else set())) or None

    def to_bytes(self) -> bytes:
        """Compact JSON, utf-8; `input_notes` only when there are notes and `layers` / `shift` only when the
        model has per-stage calibration (records of clean input scored by other models are unchanged)."""
        return self.model_dump_json(exclude=self.wire_exclude()).encode()


class OodAlert(_Record):
    """An image scored over its threshold."""

    kind: Literal["ood"] = "ood"
    alert_id: str = Field(description="'ood:<image_id>', the same on a replay")
    source: str
    image_id: str
    topic: str
    partition: int
    offset: int
    ts: float
    score: float
    threshold: float
    p_value: float
    model_version: str
    layers: list[float] | None = Field(default=None, description=LAYERS_DESCRIPTION)
    shift: Literal["low_level", "semantic", "mixed"] | None = Field(default=None, description=SHIFT_DESCRIPTION)

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"layers", "shift"})


class WindowStats(BaseModel):
    """What the drift test saw: images and OOD flags in the source's sliding window (and its evidence units)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: int
    ood: int
    units: int | None = Field(None, description="Evidence units (new scenes) in the window; None before they existed")
    unit_ood: int | None = Field(None, description="Evidence units whose first image was flagged OOD")
    rate: float = Field(description="The tested OOD rate: per unit with `drift_evidence=scenes`, else per image")
    null_rate: float = Field(
        description="OOD rate expected in distribution: the upper 1 - delta bound of the false-alarm rate the "
        "calibration in force realises (alpha x drift null factor when that override is set)"
    )
    p_value: float = Field(description="One-sided binomial p-value of the window against null_rate")
    window_s: float
    since: float
    until: float


class DriftAlert(_Record):
    """A source's drift state changed."""

    kind: Literal["drift"] = "drift"
    alert_id: str = Field(description="'drift:<source>:<seq>', seq = the source's transition counter")
    source: str
    state: Literal["raised", "cleared"]
    seq: int
    ts: float
    window: WindowStats
    model_version: str | None = None


class ModelAlert(_Record):
    """A model version went live, or failed to load (the old one stays live)."""

    kind: Literal["model"] = "model"
    alert_id: str
    source: str = Field("*", description="Model alerts concern every source")
    event: Literal["live", "load_failed"]
    version: str
    previous_version: str | None = None
    reason: str | None = None
    ts: float
    instance: str | None = None


Alert = Annotated[OodAlert | DriftAlert | ModelAlert, Field(discriminator="kind")]
_ALERT = TypeAdapter(Alert)


def parse_alert(data: bytes | str) -> OodAlert | DriftAlert | ModelAlert:
    """Validate one alert from `dlsr.alerts` (raises pydantic.ValidationError on a bad record)."""
    return _ALERT.validate_json(data)


def parse_score(data: bytes | str) -> ScoreRecord:
    """Validate one record from `dlsr.scores`."""
    return ScoreRecord.model_validate_json(data)


#: Event times outside [TS_MIN, now + TS_MAX_AHEAD_S] are unusable (a clock far off, or a poison header).
TS_MIN = 946_684_800.0  # 2000-01-01
TS_MAX_AHEAD_S = 86_400.0
#: Longest `image_id` kept; a longer one is replaced by the default id (it ends up in keys and alert ids).
IMAGE_ID_MAX = 256


@dataclass(frozen=True)
class InputMeta:
    """What the monitor reads from an input message besides its value."""

    image_id: str
    source: str
    ts: float
    notes: tuple[str, ...] = ()  # why a documented default replaced a header


def _header(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            try:
                text = v.decode("utf-8").strip() if isinstance(v, bytes | bytearray) else str(v).strip()
            except UnicodeDecodeError:
                return None
            return text or None
    return None


def _present(headers: list[tuple[str, bytes | None]] | None, name: str) -> bool:
    """A header of that name with a non-blank value (readable or not)."""
    return any(
        k == name and v is not None and (v if isinstance(v, bytes | bytearray) else str(v).encode()).strip()
        for k, v in headers or ()
    )


def _parse_ts(text: str | None) -> float | None:
    """Epoch seconds (or milliseconds, when > 1e11) or an ISO-8601 string; None when unreadable."""
    if text is None:
        return None
    try:
        value = float(text[:64])
        return value / 1000.0 if value > 1e11 else value
    except (ValueError, OverflowError):
        pass
    try:
        return datetime.fromisoformat(text[:64].replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _usable_ts(ts: float | None, now: float) -> bool:
    return ts is not None and math.isfinite(ts) and TS_MIN <= ts <= now + TS_MAX_AHEAD_S


def parse_input_meta(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
    timestamp_ms: int | None,
    now: float | None = None,
) -> InputMeta:
    """Headers -> (image_id, source, ts) with the documented defaults; never raises.

    Every field is untrusted: an `image_id` that is not UTF-8 or longer than IMAGE_ID_MAX becomes
    `topic:partition:offset`; a `ts` that is unreadable, not finite, before 2000 or more than a day ahead of
    `now` is replaced by the Kafka timestamp (by `now` when that is unusable too), and `notes` says so.
    """
    now = time.time() if now is None else now
    notes: list[str] = []
    default_id = f"{topic}:{partition}:{offset}"
    if len(default_id) > IMAGE_ID_MAX:  # a topic name near Kafka's 249-character limit: keep the id bounded
        default_id = f"{hashlib.sha256(topic.encode()).hexdigest()[:32]}:{partition}:{offset}"
    image_id = _header(headers, H_IMAGE_ID)
    if image_id is None and _present(headers, H_IMAGE_ID):
        notes.append(f"image_id header not UTF-8: used {default_id}")
    if image_id is not None and len(image_id) > IMAGE_ID_MAX:
        notes.append(f"image_id header longer than {IMAGE_ID_MAX} characters: used {default_id}")
        image_id = None
    source = _header(headers, H_SOURCE)
    if source is None and key:
        try:
            source = key[:1024].decode("utf-8").strip() or None
        except UnicodeDecodeError:
            source = None
    raw_ts = _header(headers, H_TS)
    if raw_ts is None and _present(headers, H_TS):
        raw_ts = "<not UTF-8>"
    ts = _parse_ts(raw_ts)
    if not _usable_ts(ts, now):
        kafka_ts = timestamp_ms / 1000.0 if timestamp_ms is not None and timestamp_ms > 0 else None
        fallback, used = (kafka_ts, "the Kafka timestamp") if _usable_ts(kafka_ts, now) else (now, "the arrival time")
        if raw_ts is not None:
            notes.append(f"ts header {raw_ts[:40]!r} unusable: used {used}")
        elif used != "the Kafka timestamp":
            notes.append(f"no usable ts header or Kafka timestamp: used {used}")
        ts = fallback
    return InputMeta(
        image_id=image_id or default_id,
        source=_clean_source(source or DEFAULT_SOURCE),
        ts=float(ts),
        notes=tuple(notes),
    )


def _clean_source(source: str) -> str:
    # Sources become part of Redis keys and Kafka keys: keep them printable and bounded.
    cleaned = "".join(ch if ch.isprintable() and ch not in ":*?[]" else "_" for ch in source)[:128]
    return cleaned or DEFAULT_SOURCE


def dlq_headers(
    original: list[tuple[str, bytes | None]] | None, *, reason: str, detail: str, origin: str, image_id: str
) -> list[tuple[str, bytes]]:
    """Original headers (minus any earlier error headers) plus `error`, `error_detail`, `origin`, `image_id`."""
    drop = {DLQ_ERROR, DLQ_ERROR_DETAIL, DLQ_ORIGIN}
    out = [(k, v if v is not None else b"") for k, v in (original or ()) if k not in drop]
    if _header(original, H_IMAGE_ID) is None:
        out.append((DLQ_IMAGE_ID, image_id.encode()))
    out += [
        (DLQ_ERROR, reason.encode()),
        (DLQ_ERROR_DETAIL, detail.encode("utf-8", "replace")[:1000]),
        (DLQ_ORIGIN, origin.encode()),
    ]
    return out


def alert_to_json(alert: OodAlert | DriftAlert | ModelAlert) -> str:
    """JSON text as stored in the dashboard's recent-alerts list (optional fields as in `to_bytes`)."""
    return json.dumps(alert.model_dump(exclude=alert.wire_exclude()), separators=(",", ":"))
