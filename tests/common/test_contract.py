import json

import pytest
from pydantic import ValidationError

from dlsr_monitor.common.contract import (
    DLQ_ERROR,
    DLQ_ERROR_DETAIL,
    SCHEMA_VERSION,
    DriftAlert,
    ModelAlert,
    OodAlert,
    ScoreRecord,
    WindowStats,
    dlq_headers,
    parse_alert,
    parse_input_meta,
    parse_score,
)


def _meta(headers=None, key=None, ts_ms=1_700_000_000_123):
    return parse_input_meta(topic="in", partition=2, offset=41, key=key, headers=headers, timestamp_ms=ts_ms)


def test_defaults_image_id_source_and_ts():
    m = _meta()
    assert (m.image_id, m.source, m.ts) == ("in:2:41", "default", pytest.approx(1_700_000_000.123))
    assert _meta(key=b"cam-7").source == "cam-7"


def test_headers_win_and_ts_formats():
    m = _meta([("image_id", b"abc"), ("source", b"gate"), ("ts", b"1700000000.5")], key=b"cam-7")
    assert (m.image_id, m.source, m.ts) == ("abc", "gate", 1700000000.5)
    assert _meta([("ts", b"1700000000500")]).ts == pytest.approx(1700000000.5)  # milliseconds
    assert _meta([("ts", b"2023-11-14T22:13:20Z")]).ts == pytest.approx(1700000000.0)
    assert _meta([("ts", b"yesterday")]).ts == pytest.approx(1_700_000_000.123)  # unreadable: Kafka time
    assert _meta([("source", b"a:b*c")]).source == "a_b_c"  # no key-pattern characters in Redis keys
    assert _meta([("source", b"\xff\xfe")]).source == "default"


def test_score_record_round_trip_and_strictness():
    rec = ScoreRecord(image_id="x", source="s", topic="in", partition=0, offset=1, ts=1.0, score=0.2,
                      threshold=0.5, p_value=0.3, is_ood=False, model_version="1", latency_ms=3.0, instance="m")
    assert parse_score(rec.to_bytes()) == rec
    assert json.loads(rec.to_bytes())["schema_version"] == SCHEMA_VERSION
    with pytest.raises(ValidationError):
        parse_score(json.dumps({**rec.model_dump(), "extra": 1}))


def test_per_stage_evidence_fields_are_optional_and_left_out_while_absent():
    from dlsr_monitor.common.contract import alert_to_json

    base = dict(image_id="x", source="s", topic="in", partition=0, offset=1, ts=1.0, score=0.9, threshold=0.5,
                p_value=0.01, model_version="1")
    rec = ScoreRecord(**base, is_ood=True, latency_ms=3.0, instance="m")
    ood = OodAlert(alert_id="ood:x", **base)
    for r in (rec, ood):  # records of models without per-stage calibration: no such keys at all
        assert b"layers" not in r.to_bytes() and b"shift" not in r.to_bytes()
    assert "layers" not in alert_to_json(ood)
    evidence = {"layers": [0.009901, 0.5, 1.0, 0.7, 0.2], "shift": "low_level"}
    rec2, ood2 = rec.model_copy(update=evidence), OodAlert(alert_id="ood:x", **base, **evidence)
    assert parse_score(rec2.to_bytes()) == rec2 and parse_alert(ood2.to_bytes()) == ood2
    assert json.loads(alert_to_json(ood2))["shift"] == "low_level"
    with pytest.raises(ValidationError):
        ScoreRecord(**base, is_ood=True, latency_ms=3.0, instance="m", shift="texture")


def test_guarantee_fields_are_additive_and_older_records_still_parse():
    base = dict(image_id="x", source="s", topic="in", partition=0, offset=1, ts=1.0, score=0.9, threshold=0.5,
                p_value=0.01, model_version="1", is_ood=True, latency_ms=3.0, instance="m")
    pac = ScoreRecord(**base, guarantee="pac", delta=0.1)
    wire = json.loads(pac.to_bytes())
    assert (wire["guarantee"], wire["delta"], wire["schema_version"]) == ("pac", 0.1, SCHEMA_VERSION)
    assert parse_score(pac.to_bytes()) == pac
    marginal = json.loads(ScoreRecord(**base, guarantee="marginal").to_bytes())
    assert marginal["guarantee"] == "marginal" and "delta" not in marginal
    for version in (1, 2):  # records written before the field: no guarantee, still valid
        old = parse_score(json.dumps({**base, "schema_version": version}))
        assert old.guarantee is None and old.delta is None and old.schema_version == version
    with pytest.raises(ValidationError):
        ScoreRecord(**base, guarantee="conditional")


def test_alerts_are_discriminated_by_kind():
    w = WindowStats(images=100, ood=30, rate=0.3, null_rate=0.02, p_value=1e-9, window_s=600, since=0, until=600)
    items = [
        OodAlert(alert_id="ood:x", source="s", image_id="x", topic="in", partition=0, offset=1, ts=1, score=0.9,
                 threshold=0.5, p_value=0.01, model_version="1"),
        DriftAlert(alert_id="drift:s:1", source="s", state="raised", seq=1, ts=600, window=w),
        ModelAlert(alert_id="model:live:2:m", event="live", version="2", ts=5.0),
    ]
    assert [type(parse_alert(a.to_bytes())) for a in items] == [OodAlert, DriftAlert, ModelAlert]


def test_dlq_headers_keep_originals_and_add_reason():
    h = dlq_headers([("source", b"cam"), ("error", b"old")], reason="too_many_pixels", detail="9e9 px",
                    origin="in:0:5", image_id="in:0:5")
    d = dict(h)
    assert d["source"] == b"cam" and d[DLQ_ERROR] == b"too_many_pixels" and d[DLQ_ERROR_DETAIL] == b"9e9 px"
    assert [k for k, _ in h].count("error") == 1 and d["image_id"] == b"in:0:5"


NOW = 1_750_000_000.0


def _meta_at(headers, timestamp_ms=1_749_999_000_000, key=None):
    from dlsr_monitor.common.contract import parse_input_meta

    return parse_input_meta(topic="in", partition=2, offset=7, key=key, headers=headers, timestamp_ms=timestamp_ms,
                            now=NOW)


@pytest.mark.parametrize(
    "raw", ["nan", "inf", "-inf", "-5", "1e300", "1e999", "0", "946684799", str(NOW + 2 * 86400), "x" * 10_000,
            "9999-12-31T23:59:59", "garbage"],
)
def test_an_unusable_ts_falls_back_to_the_kafka_timestamp_with_a_note(raw):
    meta = _meta_at([("ts", raw.encode())])
    assert meta.ts == 1_749_999_000.0
    assert len(meta.notes) == 1 and "Kafka timestamp" in meta.notes[0]


def test_usable_ts_forms_are_kept():
    assert _meta_at([("ts", b"1749990000")]).ts == 1_749_990_000.0
    assert _meta_at([("ts", b"1749990000123")]).ts == pytest.approx(1_749_990_000.123)  # milliseconds
    assert _meta_at([("ts", b"2025-06-15T12:00:00Z")]).notes == ()


def test_no_usable_time_at_all_uses_the_arrival_time():
    meta = _meta_at([("ts", b"nan")], timestamp_ms=-1)
    assert meta.ts == NOW and "arrival time" in meta.notes[0]
    assert _meta_at([], timestamp_ms=None).ts == NOW


def test_hostile_ids_keys_and_sources_get_documented_defaults():
    meta = _meta_at([("image_id", b"i" * 10_000), ("source", b"\xff\xfe")], key=b"\xc3\x28")
    assert meta.image_id == "in:2:7" and "image_id" in meta.notes[0]
    assert meta.source == "default"
    assert _meta_at([("source", b"cam:1*?" + b"z" * 500)]).source.startswith("cam_1__") and len(
        _meta_at([("source", b"z" * 500)]).source) == 128
