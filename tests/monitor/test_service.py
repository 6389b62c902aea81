"""The batching loop on in-memory source/sink, the real Redis and the real image decoder; a tiny stand-in model
(score = mean brightness) keeps it fast while exercising every path."""

import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr_monitor.common.connections import OutagePolicy
from dlsr_monitor.common.contract import DLQ_ERROR, parse_alert, parse_score
from dlsr_monitor.common.streams import Message, SinkError
from dlsr_monitor.common.testing import MemorySink, MemorySource
from dlsr_monitor.config.settings import MonitorSettings
from dlsr_monitor.console.views import StateView
from dlsr_monitor.monitor.service import MonitorService, OutputTopics
from dlsr_monitor.monitor.state import MonitorState

TOPICS = OutputTopics("scores", "alerts", "dlq")
TS = 1_700_000_000_000  # ms


class BrightnessEncoder:
    def preprocess(self, images):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).mean(-1) for im in images])


class BrightnessDetector:
    """Score = mean pixel value; dark images are 'ID', bright ones 'OOD'."""

    def __init__(self):
        self.encoder = BrightnessEncoder()
        self.calibration_scores = np.linspace(0.0, 0.3, 100)
        self.calls = []

    def score_pixels(self, x):
        self.calls.append(len(x))
        return x.reshape(len(x), -1).mean(1).numpy()


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), value).save(buf, format="PNG")
    return buf.getvalue()


def _stream(spec, topic="in"):
    """spec: list of (partition, kind, source) with kind in dark/bright/corrupt."""
    offsets: dict[int, int] = {}
    out = []
    for p, kind, source in spec:
        off = offsets.get(p, 0)
        offsets[p] = off + 1
        value = {"dark": _png(20), "bright": _png(240), "corrupt": b"\x89PNG not really"}[kind]
        out.append(Message(topic, p, off, value, key=source.encode(), timestamp_ms=TS + len(out)))
    return out


def view(svc: MonitorService) -> StateView:
    """What an operator would read of this service's Redis state."""
    return StateView(svc.state.redis, svc.state.keys, bucket_s=svc.state.bucket_s)


@pytest.fixture
def make_service(redis_client, keys):
    created = []

    def make(source, sink=None, detector=None, outages=None, **cfg):
        settings = MonitorSettings(
            instance_id="t1", batch_max=16, batch_wait_ms=5, drift_min_images=20, **cfg
        )
        det = detector or BrightnessDetector()
        handle = SimpleNamespace(version="7", detector=det, threshold=0.5, alpha=0.01)
        state = MonitorState.from_settings(redis_client, keys, settings)
        svc = MonitorService(
            source=source,
            sink=sink or MemorySink(),
            state=state,
            current_model=lambda: handle,
            monitor=settings,
            topics=TOPICS,
            group="g",
            outages=outages,
        )
        created.append(svc)
        return svc

    yield make
    for svc in created:
        svc._pool.shutdown()
        svc._prep.shutdown()


def test_scores_dead_letters_and_ood_alerts(make_service):
    spec = [(i % 2, "dark", "camA") for i in range(40)] + [(0, "bright", "camA")] * 3 + [(1, "corrupt", "camA")] * 4
    src, sink = MemorySource(_stream(spec)), MemorySink()
    svc = make_service(src, sink)
    stats = svc.run(threading.Event(), until_idle=True)
    scores = [parse_score(r.value) for r in sink.on("scores")]
    assert len(scores) == 43 and stats.scored == 43 and stats.dead == 4
    assert sum(s.is_ood for s in scores) == 3
    assert all(s.model_version == "7" and s.threshold == 0.5 for s in scores)
    assert {s.image_id for s in scores} == {f"in:{s.partition}:{s.offset}" for s in scores}
    dead = sink.on("dlq")
    assert len(dead) == 4 and all(d.value == b"\x89PNG not really" for d in dead)
    assert all(dict(d.headers)[DLQ_ERROR] for d in dead)
    ood = [parse_alert(r.value) for r in sink.on("alerts")]
    assert [a.kind for a in ood] == ["ood"] * 3 and all(a.alert_id.startswith("ood:in:0:") for a in ood)
    # Every input accounted for; offsets committed past the last message of each partition.
    assert len(scores) + len(dead) == len(spec)
    assert src.committed == {("in", 0): 23, ("in", 1): 24}
    t = view(svc).window_totals("camA")
    assert (t["images"], t["ood"], t["dead"]) == (43, 3, 4)
    assert view(svc).read_heartbeats()[0]["instance"] == "t1"  # a heartbeat was written


def test_batches_respect_the_size_cap(make_service):
    det = BrightnessDetector()
    svc = make_service(MemorySource(_stream([(0, "dark", "a")] * 50)), detector=det)
    svc.run(threading.Event(), until_idle=True)
    assert max(det.calls) <= 16 and sum(det.calls) == 50


def test_drift_alert_for_the_source_that_turned_ood(make_service):
    spec = [(0, "dark", "camA")] * 60 + [(1, "bright", "camB")] * 30 + [(0, "dark", "camA")] * 20
    sink = MemorySink()
    svc = make_service(MemorySource(_stream(spec)), sink, ood_alerts=False)
    svc.run(threading.Event(), until_idle=True)
    alerts = [parse_alert(r.value) for r in sink.on("alerts")]
    drift = [a for a in alerts if a.kind == "drift"]
    assert [(a.source, a.state) for a in drift] == [("camB", "raised")]
    assert view(svc).read_drift("camA")["state"] == "ok"


def test_broker_failure_is_waited_out_and_counted_once(make_service):
    msgs = _stream([(0, "dark", "camA")] * 20 + [(0, "bright", "camA")] * 4)
    src, sink = MemorySource(msgs), MemorySink(fail_next_flush=True)
    svc = make_service(src, sink, outages={"Kafka": OutagePolicy(backoff_s=0.01)})
    stats = svc.run(threading.Event(), until_idle=True)
    assert stats.outages == 1 and svc.ready  # waited out, ready again
    assert len(sink.on("scores")) == 24  # the failed batch was produced again, nothing lost
    assert view(svc).window_totals("camA")["images"] == 24  # Redis effects once, despite the retry
    assert src.committed == {("in", 0): 24}


def test_failed_produce_beyond_the_outage_budget_is_not_committed_and_replay_counts_once(make_service):
    msgs = _stream([(0, "dark", "camA")] * 20 + [(0, "bright", "camA")] * 4)
    src = MemorySource(msgs)

    class DownSink(MemorySink):
        def flush(self, timeout_s):
            raise SinkError("broker gone")

    svc = make_service(src, DownSink(), outages={"Kafka": OutagePolicy(budget_s=0.05, backoff_s=0.01)})
    with pytest.raises(SinkError):
        svc.run(threading.Event(), until_idle=True)
    assert src.committed == {}  # Redis effects of batch 1 applied, but nothing committed
    assert view(svc).window_totals("camA")["images"] == 16
    # Restart: everything is redelivered; Redis counts each message once, every message gets a record.
    src.rewind_to_committed()
    sink2 = MemorySink()
    stats = make_service(src, sink2).run(threading.Event(), until_idle=True)
    assert len(sink2.on("scores")) == 24 and stats.replayed == 16
    assert view(svc).window_totals("camA")["images"] == 24
    assert src.committed == {("in", 0): 24}


def test_two_replicas_share_state_like_one(make_service, redis_client):
    spec = [(i % 4, "bright" if i % 5 == 0 else "dark", f"cam{i % 3}") for i in range(120)]
    msgs = _stream(spec)
    a_src = MemorySource([m for m in msgs if m.partition in (0, 1)])
    b_src = MemorySource([m for m in msgs if m.partition in (2, 3)])
    a, b = make_service(a_src), make_service(b_src)
    ta = threading.Thread(target=a.run, args=(threading.Event(),), kwargs={"until_idle": True})
    ta.start()
    b.run(threading.Event(), until_idle=True)
    ta.join(30)
    for cam in ("cam0", "cam1", "cam2"):
        expected = [s for s in spec if s[2] == cam]
        t = view(a).window_totals(cam)
        assert t["images"] == len(expected)
        assert t["ood"] == sum(k == "bright" for _, k, _ in expected)


def test_nan_score_is_a_dead_letter(make_service):
    class NanDetector(BrightnessDetector):
        def score_pixels(self, x):
            s = super().score_pixels(x)
            s[0] = np.nan
            return s

    sink = MemorySink()
    make_service(MemorySource(_stream([(0, "dark", "a")] * 3)), sink, detector=NanDetector()).run(
        threading.Event(), until_idle=True
    )
    assert len(sink.on("scores")) == 2
    assert dict(sink.on("dlq")[0].headers)[DLQ_ERROR] == b"score_not_finite"


class StageDetector(BrightnessDetector):
    """With per-stage calibration: 3 stages, only stage 1 (low-level) sees the brightness."""

    def __init__(self):
        super().__init__()
        self.stage_calibration_scores = np.tile(np.linspace(0.0, 0.3, 100)[:, None], (1, 3))

    def score_pixels(self, x, stages=False):
        s = super().score_pixels(x)
        if not stages:
            return s
        return s, np.stack([s, np.zeros_like(s), np.zeros_like(s)], axis=1)


def test_per_stage_evidence_goes_into_records_and_alerts_only_when_the_model_has_it(make_service):
    spec = [(0, "dark", "a")] * 3 + [(0, "bright", "a")] * 2
    sink = MemorySink()
    det = StageDetector()
    make_service(MemorySource(_stream(spec)), sink, detector=det).run(threading.Event(), until_idle=True)
    recs = [parse_score(r.value) for r in sink.on("scores")]
    assert len(recs) == 5 and len(det.calls) == 1  # one scoring call gives both
    dark, bright = recs[:3], recs[3:]
    # stage 1 of a bright image: beyond all 100 calibration scores -> 1/101, 4 significant digits
    assert all(r.layers == [0.009901, 1.0, 1.0] and r.shift == "low_level" and r.is_ood for r in bright)
    assert all(r.layers[0] == 0.7426 and r.shift == "mixed" and not r.is_ood for r in dark)  # neither half
    alerts = [parse_alert(r.value) for r in sink.on("alerts")]
    assert [(a.kind, a.shift, a.layers) for a in alerts] == [("ood", "low_level", [0.009901, 1.0, 1.0])] * 2

    plain = MemorySink()  # the same stream, a model without per-stage calibration: the records as before
    make_service(MemorySource(_stream(spec)), plain).run(threading.Event(), until_idle=True)
    for r in plain.on("scores") + plain.on("alerts"):
        assert b'"layers"' not in r.value and b'"shift"' not in r.value
    assert all(parse_score(r.value).layers is None for r in plain.on("scores"))


class PacDetector(BrightnessDetector):
    """The stand-in model calibrated with the pac method (what the product publishes by default)."""

    calibration_method, delta = "pac", 0.2


def test_records_say_which_guarantee_holds(make_service):
    spec = [(0, "dark", "a")] * 3 + [(0, "bright", "a")]
    sink = MemorySink()
    make_service(MemorySource(_stream(spec)), sink, detector=PacDetector()).run(threading.Event(), until_idle=True)
    assert [(r.guarantee, r.delta) for r in map(parse_score, (m.value for m in sink.on("scores")))] == [
        ("pac", 0.2)
    ] * 4
    old = MemorySink()  # a model calibrated before the field (no calibration_method): marginal, no delta
    make_service(MemorySource(_stream(spec)), old).run(threading.Event(), until_idle=True)
    for m in old.on("scores"):
        assert parse_score(m.value).guarantee == "marginal" and b'"delta"' not in m.value


def test_the_drift_null_is_the_false_alarm_bound_of_the_calibration_in_force(make_service, redis_client, keys):
    from dlsr.calibration import false_alarm_bound

    spec = [(0, "dark", "a")] * 30
    svc = make_service(MemorySource(_stream(spec)), detector=PacDetector())
    svc.run(threading.Event(), until_idle=True)
    # 100 calibration scores, all below the threshold 0.5: k = n = 100, the Beta(1, 100) 0.8 quantile.
    expected = false_alarm_bound(100, 100, 0.2)
    assert view(svc).read_drift("a")["null_rate"] == pytest.approx(expected)
    assert 0.01 < expected < 0.02  # tighter than the old fixed null of alpha x 2 = 0.02

    forced = make_service(MemorySource(_stream(spec)), drift_null_factor=3.0)  # the override
    forced.run(threading.Event(), until_idle=True)
    assert view(forced).read_drift("a")["null_rate"] == pytest.approx(0.03)

    # Once the vetted reservoir holds baseline_min scores, its threshold is in force and the null comes from it.
    redis_client.hset(keys.model_entry("7"), mapping={"alpha": "0.01", "calibration": "pac", "delta": "0.2"})
    reservoir = np.linspace(0.0, 0.4, 600)
    svc.state.baseline.add("7", reservoir, alpha=0.01)
    later = make_service(MemorySource(_stream(spec)), detector=PacDetector())
    later.run(threading.Event(), until_idle=True)
    t = svc.state.baseline.threshold("7", 0.01)
    assert t < 0.5 and view(later).read_drift("a")["null_rate"] == pytest.approx(
        false_alarm_bound(600, int((reservoir <= t).sum()), 0.2)
    )


def test_stop_finishes_the_batch_in_flight(make_service):
    src = MemorySource(_stream([(0, "dark", "a")] * 40))
    sink = MemorySink()
    svc = make_service(src, sink)
    stop = threading.Event()
    real_process = svc._process

    def process_then_stop(prep):
        real_process(prep)
        stop.set()  # a SIGTERM arrives while batch 2 is being prepared

    svc._process = process_then_stop
    svc.run(stop)
    n = len(sink.on("scores"))
    assert n == 32 and src.committed == {("in", 0): 32}  # both polled batches finished, no more polled


def test_model_events_become_model_alerts(make_service):
    sink = MemorySink()
    svc = make_service(MemorySource(_stream([(0, "dark", "a")] * 2)), sink)
    svc.on_model_event(SimpleNamespace(kind="load_failed", version="9", message="sha256 mismatch",
                                       active_version="7", at=1.0))
    svc.run(threading.Event(), until_idle=True)
    alert = parse_alert(sink.on("alerts")[0].value)
    assert (alert.kind, alert.event, alert.version, alert.previous_version) == ("model", "load_failed", "9", "7")
    assert "sha256" in alert.reason


def test_an_image_the_preprocessing_rejects_is_a_dead_letter_not_a_crash(make_service):
    class PickyEncoder(BrightnessEncoder):
        def preprocess(self, images):
            if any(np.asarray(im).mean() > 200 for im in images):
                raise ValueError("cannot preprocess this one")
            return super().preprocess(images)

    det = BrightnessDetector()
    det.encoder = PickyEncoder()
    sink = MemorySink()
    make_service(MemorySource(_stream([(0, "dark", "a")] * 5 + [(0, "bright", "a")])), sink, detector=det).run(
        threading.Event(), until_idle=True
    )
    assert len(sink.on("scores")) == 5
    assert dict(sink.on("dlq")[0].headers)[DLQ_ERROR] == b"preprocess_failed"


@pytest.mark.parametrize("ts", [b"nan", b"inf", b"-inf", b"-1", b"1e300", b"9" * 400, b"\xff\xfe", b"", b"0"])
def test_a_poison_ts_header_is_scored_with_a_note_and_the_partition_goes_on(make_service, ts):
    msgs = _stream([(0, "dark", "a")] * 4)
    poisoned = Message("in", 0, 0, msgs[0].value, key=b"a", headers=[("ts", ts)], timestamp_ms=TS)
    sink = MemorySink()
    src = MemorySource([poisoned, *msgs[1:]])
    make_service(src, sink).run(threading.Event(), until_idle=True)
    records = [parse_score(r.value) for r in sink.on("scores")]
    assert len(records) == 4 and src.committed == {("in", 0): 4}  # nothing stuck behind it
    assert records[0].ts == TS / 1000.0  # the Kafka timestamp stands in
    if ts.strip(b"\xff\xfe"):
        assert records[0].input_notes and "ts header" in records[0].input_notes[0]
    assert all(r.input_notes is None for r in records[1:])
    assert b"input_notes" not in sink.on("scores")[1].value  # clean input: the record is unchanged


def test_one_message_that_breaks_routing_is_an_internal_error_dead_letter(make_service, monkeypatch):
    import dlsr_monitor.monitor.service as service

    real = service._route_one

    def flaky(m, *args, **kwargs):
        if m.offset == 1:
            raise KeyError("a bug nobody saw coming")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(service, "_route_one", flaky)
    sink = MemorySink()
    src = MemorySource(_stream([(0, "dark", "a")] * 5))
    make_service(src, sink).run(threading.Event(), until_idle=True)
    assert len(sink.on("scores")) == 4 and src.committed == {("in", 0): 5}
    headers = dict(sink.on("dlq")[0].headers)
    assert headers[DLQ_ERROR] == b"internal_error" and b"KeyError" in headers["error_detail"]


def test_a_redis_outage_is_waited_out_and_counted_once(make_service):
    from redis.exceptions import ConnectionError as RedisConnectionError

    svc = make_service(MemorySource(_stream([(0, "dark", "a")] * 20)),
                       outages={"Redis": OutagePolicy(backoff_s=0.01)})
    real, failures = svc.state.apply_batch, iter(range(3))

    def down_then_up(*args, **kwargs):
        if next(failures, None) is not None:
            raise RedisConnectionError("Connection refused")
        return real(*args, **kwargs)

    svc.state.apply_batch = down_then_up
    stats = svc.run(threading.Event(), until_idle=True)
    assert stats.outages == 1 and svc.ready and stats.scored == 20
    assert view(svc).window_totals("a")["images"] == 20


def test_a_stop_during_an_outage_leaves_the_batch_uncommitted(make_service):
    from redis.exceptions import ConnectionError as RedisConnectionError

    src = MemorySource(_stream([(0, "dark", "a")] * 10))
    svc = make_service(src, outages={"Redis": OutagePolicy(backoff_s=0.01)})
    stop = threading.Event()

    def down(*args, **kwargs):
        stop.set()  # SIGTERM while Redis is away
        raise RedisConnectionError("Connection refused")

    svc.state.apply_batch = down
    svc.run(stop)
    assert src.committed == {}  # replayed after the restart, never half-applied


def test_messages_of_revoked_partitions_are_dropped_before_scoring(make_service):
    class Rebalanced(MemorySource):
        def assigned(self):
            return {("in", 0)}  # partition 1 moved to another replica after it was polled

    src = Rebalanced(_stream([(0, "dark", "a"), (1, "dark", "b")] * 5))
    sink = MemorySink()
    make_service(src, sink).run(threading.Event(), until_idle=True)
    records = [parse_score(r.value) for r in sink.on("scores")]
    assert {r.partition for r in records} == {0} and len(records) == 5
    assert src.committed == {("in", 0): 5}


def test_decoded_pixels_in_flight_stay_within_the_budget(make_service):
    from dlsr.images import decoded_bytes

    def big(value):
        buf = io.BytesIO()
        Image.new("RGB", (800, 600), (value, value, value)).save(buf, format="PNG")
        return buf.getvalue()

    images = [big(10 * i) for i in range(8)]
    one = decoded_bytes(images[0])
    msgs = [Message("in", 0, i, v, key=b"a", timestamp_ms=TS) for i, v in enumerate(images)]
    sink = MemorySink()
    svc = make_service(MemorySource(msgs), sink, decode_threads=4, max_decoded_bytes=int(one * 1.5))
    svc.run(threading.Event(), until_idle=True)
    assert len(sink.on("scores")) == 8
    assert one <= svc._budget.peak <= int(one * 1.5) and svc._budget.in_use == 0


class FeatureDetector(BrightnessDetector):
    """Hands back its 'encoder features' (the pixels) from the same pass, like BaseDetector.score_pixels."""

    def score_pixels(self, x, stages=False, features=False):
        s = super().score_pixels(x)
        if features:
            angle = np.pi * s  # grey level -> direction: frames of one level coincide, others point elsewhere
            return s, None, np.stack([np.cos(angle), np.sin(angle)], axis=1)
        return (s, None) if stages else s


def _frames(values, source="cam", ms_per_frame=33):
    """One source's frames (grey levels), 30 fps in event time."""
    return [
        Message("in", 0, i, _png(v), key=source.encode(), timestamp_ms=TS + i * ms_per_frame)
        for i, v in enumerate(values)
    ]


@pytest.mark.parametrize("evidence", ["scenes", "frames"])
def test_a_still_scene_is_one_unit_of_drift_evidence(make_service, evidence) -> None:
    # 60 frames of one bright (OOD) scene, then 30 frames that are each a new scene (different grey levels).
    values = [240] * 60 + list(range(100, 250, 5))
    svc = make_service(MemorySource(_frames(values)), detector=FeatureDetector(), drift_evidence=evidence,
                       drift_scene_distance=1e-4)
    svc.run(threading.Event(), until_idle=True)
    d = view(svc).read_drift("cam")
    assert (d["images"], d["ood"]) == (90, 60 + sum(v > 127 for v in values[60:]))  # images counted as before
    if evidence == "scenes":
        assert (d["units"], d["unit_ood"]) == (31, 1 + sum(v > 127 for v in values[60:]))
    else:
        assert (d["units"], d["unit_ood"]) == (90, d["ood"])  # every image is a unit


def test_a_model_without_features_counts_every_image(make_service) -> None:
    svc = make_service(MemorySource(_frames([20] * 40)), drift_evidence="scenes")
    svc.run(threading.Event(), until_idle=True)
    d = view(svc).read_drift("cam")
    assert (d["images"], d["units"]) == (40, 40)
