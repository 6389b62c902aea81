"""MonitorState against the real local Redis (per-test prefix, cleaned up by the `keys` fixture)."""

import json

import pytest

from dlsr_monitor.console.views import StateView
from dlsr_monitor.monitor.drift import DriftTest
from dlsr_monitor.monitor.state import MonitorState, WindowRecord

T0 = 1_700_000_000.0  # a fixed event time: windows are bucketed by the message's ts, not the wall clock


@pytest.fixture
def state(redis_client, keys):
    return MonitorState(redis_client, keys, bucket_s=60, window_buckets=5, baseline_min=50, heartbeat_ttl_s=5)


@pytest.fixture
def view(redis_client, keys):
    """The console's read-only view of what `state` writes."""
    return StateView(redis_client, keys, bucket_s=60)


def _recs(offsets, source="camA", ood=(), ts=T0):
    return [WindowRecord(o, source, ts, True, o in ood, 0.5) for o in offsets]


def test_apply_is_exactly_once_per_offset(state, view):
    r1 = state.apply_batch("g", "in", 0, _recs(range(0, 10), ood={3}), alerts=[(3, '{"kind":"ood"}')])
    assert (r1.applied, r1.skipped) == (10, 0)
    # A replay of the same batch and an overlapping one: only offsets 10..14 are new.
    r2 = state.apply_batch("g", "in", 0, _recs(range(0, 10), ood={3}), alerts=[(3, '{"kind":"ood"}')])
    r3 = state.apply_batch("g", "in", 0, _recs(range(5, 15)))
    assert (r2.applied, r2.skipped) == (0, 10)
    assert (r3.applied, r3.skipped) == (5, 5)
    totals = view.window_totals("camA")
    assert totals["images"] == 15 and totals["ood"] == 1
    assert totals["score_sum"] == pytest.approx(7.5)
    assert view.read_watermark("g", "in", 0) == 14
    assert len(view.read_recent_alerts()) == 1  # the replayed alert was not pushed twice
    # Another partition has its own watermark.
    assert state.apply_batch("g", "in", 1, _recs(range(0, 3))).applied == 3
    assert view.window_totals("camA")["images"] == 18


def test_dead_letters_count_separately(state, view):
    state.apply_batch("g", "in", 0, [WindowRecord(0, "s", T0, scored=False), *_recs([1, 2], source="s")])
    t = view.window_totals("s")
    assert (t["images"], t["dead"]) == (2, 1)


def test_windows_bucket_by_event_time(state, view):
    state.apply_batch("g", "in", 0, _recs([0, 1], ts=T0) + _recs([2], ts=T0 + 120))
    buckets = view.read_window("camA", T0, T0 + 120)
    assert [b.images for b in buckets] == [2, 0, 1]
    assert buckets[0].start == pytest.approx((T0 // 60) * 60)
    assert [s.source for s in view.read_sources()] == ["camA"]


def test_drift_raise_clear_and_reemit_until_marked(state, view):
    test = DriftTest(alpha=0.01, min_images=50)
    state.apply_batch("g", "in", 0, _recs(range(100), ood=set(range(40))))
    alerts = state.evaluate_drift(["camA"], test, model_version="3")
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.state, a.seq, a.alert_id, a.window.images, a.window.ood) == ("raised", 1, "drift:camA:1", 100, 40)
    assert view.read_drift("camA")["state"] == "raised"
    # Not marked emitted: the next evaluation hands the same alert again (same id), no new transition.
    again = state.evaluate_drift(["camA"], test)
    assert [x.alert_id for x in again] == ["drift:camA:1"]
    state.mark_drift_emitted(again)
    assert state.evaluate_drift(["camA"], test) == []
    # Recovery: the window moves on (5 buckets of 60 s) and fills with clean images -> cleared, seq 2.
    state.apply_batch("g", "in", 0, _recs(range(100, 400), ts=T0 + 600))
    cleared = state.evaluate_drift(["camA"], test)
    assert [(x.state, x.seq) for x in cleared] == [("cleared", 2)]
    kinds = [x["state"] for x in view.read_recent_alerts() if x.get("kind") == "drift"]
    assert kinds == ["cleared", "raised"]


def test_drift_cas_refuses_a_stale_snapshot(state, redis_client, keys):
    test = DriftTest(alpha=0.01, min_images=50)
    state.apply_batch("g", "in", 0, _recs(range(100), ood=set(range(40))))
    snap = state._drift_snapshot("camA")
    state.apply_batch("g", "in", 0, _recs([100]))  # a record lands between the read and the write
    ok = state._drift_cas(
        keys=[keys.drift("camA"), keys.recent_alerts()],
        args=[snap["ver"], snap["seq"], json.dumps({"fields": {"state": "raised"}, "alert": "", "recent_max": 5})],
    )
    assert int(ok) == 0
    assert [a.seq for a in state.evaluate_drift(["camA"], test)] == [1]


def test_heartbeats_expire_and_are_listed(state, view):
    state.heartbeat("m1", model_version="4", rate=12.5, lag=7, extra={"scored": 3})
    beats = view.read_heartbeats()
    assert beats[0]["instance"] == "m1" and beats[0]["lag"] == 7 and beats[0]["model_version"] == "4"
    assert beats[0]["rate"] == pytest.approx(12.5)
    state.remove_heartbeat("m1")
    assert view.read_heartbeats() == []


def test_units_are_counted_next_to_images_and_drift_can_test_either(state, view, redis_client, keys):
    # 100 images, 40 flagged, but only every 20th opens an evidence unit (5 scenes, the first flagged).
    recs = [WindowRecord(o, "camA", T0, True, o < 40, 0.5, unit=o % 20 == 0) for o in range(100)]
    state.apply_batch("g", "in", 0, recs)
    test = DriftTest(alpha=0.01, min_images=5)
    assert state.evaluate_drift(["camA"], test, evidence="scenes") == []  # 2 of 5 units flagged: not enough
    d = view.read_drift("camA")
    assert (d["images"], d["ood"], d["units"], d["unit_ood"], d["state"]) == (100, 40, 5, 2, "ok")
    assert d["rate"] == pytest.approx(0.4)
    raised = state.evaluate_drift(["camA"], test, evidence="frames")  # counted per image the same window raises
    assert [(a.state, a.window.images, a.window.units) for a in raised] == [("raised", 100, 5)]
    with pytest.raises(ValueError, match="evidence"):
        state.evaluate_drift(["camA"], test, evidence="clips")


def test_buckets_written_before_units_count_their_images_as_units(state, view, redis_client, keys):
    # A bucket from an older monitor has images and ood only: its images are its units.
    redis_client.hset(keys.window_bucket("camB", state.bucket_of(T0)), mapping={"images": 60, "ood": 30})
    redis_client.zadd(keys.sources(), {"camB": T0})
    alerts = state.evaluate_drift(["camB"], DriftTest(alpha=0.01, min_images=5), evidence="scenes")
    assert [(a.state, a.window.units, a.window.unit_ood) for a in alerts] == [("raised", 60, 30)]
