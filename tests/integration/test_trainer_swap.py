"""Trainer + monitor on the real Tansu broker and Redis, with the real (tiny) DLSR method.

- a monitor consumes a steady stream while the trainer publishes v2: every input has one score record (or, under
  at-least-once, duplicates with the same id and version), records before the swap name v1 and after it v2;
  rollback -> the monitor follows back to v1. Prints the swap pause (longest gap between score records around
  the swap) next to the median gap.
- a corrupted artifact (flipped byte) is refused by the monitor, which keeps v1 and says so in a `model` alert.
- a candidate that fails a gate is not promoted and the job history says which gate and by how much.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

N_FIT = 400  # vetted images of v1 (CIFAR-10 train)
N_MORE = 100  # vetted images that arrive on the topic before v2
TINY = {"n_blocks": 2, "epochs": 3, "batch_size": 128}


@pytest.fixture
def settings(test_settings, tmp_path, tmp_path_factory):
    """Test settings with a tiny detector, alpha 0.05 (small calibration sets suffice), a session feature cache."""
    from dlsr_monitor.config.settings import TrainerSettings

    cache = tmp_path_factory.getbasetemp() / "trainer-feature-cache"
    model = test_settings.model.model_copy(update={"alpha": 0.05, "feature_cache": cache, "batch_size": 32})
    trainer = TrainerSettings(
        workdir=tmp_path / "vetted",
        detector=TINY,
        refit_epochs=2,
        reference_size=50,
        poll_s=0.2,
        lock_ttl_s=30,
    )
    monitor = test_settings.monitor.model_copy(update={"batch_max": 16, "batch_wait_ms": 100})
    return test_settings.model_copy(update={"model": model, "trainer": trainer, "monitor": monitor})


def _zip_images(path: Path, start: int, n: int) -> list[bytes]:
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if not n.endswith("/"))
        return [zf.read(name) for name in names[start : start + n]]


class Stream:
    """Produces images to the input topic at a steady rate from a thread; ids img-<i>."""

    def __init__(
        self, kafka, topic: str, images: list[bytes], rate: float, first: int = 0, until=None
    ) -> None:
        from kafka import KafkaProducer

        self.producer = KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=0)
        self.topic, self.images, self.rate, self.first = topic, images, rate, first
        self.until = until  # None: send each image once; an Event: cycle through them until it is set
        self.sent: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _items(self):
        if self.until is None:
            yield from enumerate(self.images)
            return
        i = 0
        while not self.until.is_set() and i < 60 * len(self.images):
            yield i, self.images[i % len(self.images)]
            i += 1

    def _run(self) -> None:
        for i, data in self._items():
            iid = f"img-{self.first + i}"
            self.producer.send(
                self.topic,
                key=f"cam-{i % 3}".encode(),
                value=data,
                headers=[("image_id", iid.encode()), ("source", f"cam-{i % 3}".encode())],
            )
            self.sent.append(iid)
            time.sleep(1.0 / self.rate)
        self.producer.flush(30)

    def start(self) -> Stream:
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(600)
        assert not self.thread.is_alive(), "the producer thread did not finish"
        self.producer.close()


class Collector:
    """Reads a topic from the beginning in a thread (its own group), keeping records with their timestamps."""

    def __init__(self, kafka, topic: str) -> None:
        from kafka import KafkaConsumer

        self.consumer = KafkaConsumer(
            topic,
            **kafka.client_kwargs(),
            group_id=f"collect-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self.records: list[tuple[float, dict]] = []  # (kafka timestamp s, parsed JSON)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for recs in self.consumer.poll(timeout_ms=200).values():
                with self.lock:
                    self.records += [(r.timestamp / 1000.0, json.loads(r.value)) for r in recs]

    def snapshot(self) -> list[tuple[float, dict]]:
        with self.lock:
            return list(self.records)

    def wait_for(self, cond, timeout: float, what: str) -> list[tuple[float, dict]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snap = self.snapshot()
            if cond(snap):
                return snap
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()


class Monitor:
    """`run_monitor` in a thread, stopped like SIGTERM would."""

    def __init__(self, settings) -> None:
        from dlsr_monitor.monitor.service import run_monitor

        self.stop = threading.Event()
        self.error: BaseException | None = None

        def go() -> None:
            try:
                run_monitor(settings, self.stop, handle_signals=False)
            except BaseException as exc:  # surfaced by close()
                self.error = exc

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert self.error is None, f"monitor crashed: {self.error!r}"


def _first_model(settings, data_dir):
    """A trainer service (with vetted intake) and v1 published from N_FIT CIFAR-10 train images."""
    from dlsr_monitor.trainer.intake import ingest_path
    from dlsr_monitor.trainer.schedule import build_service

    svc = build_service(settings, intake=True, progress=False)
    ingest_path(svc.ctx.store, data_dir / "cifar10" / "train.zip", limit=N_FIT)
    rec = svc.run_once("fit")
    assert rec is not None and rec.outcome == "promoted", rec.message
    assert rec.version == "v1"
    return svc


def _check_exactly_once(records: list[dict], sent: list[str]) -> dict[str, list[str]]:
    by_id: dict[str, set[str]] = defaultdict(set)
    for r in records:
        by_id[r["image_id"]].add(r["model_version"])
    missing = sorted(set(sent) - set(by_id))
    assert not missing, f"{len(missing)} inputs without a score record, e.g. {missing[:5]}"
    two = {k: v for k, v in by_id.items() if len(v) > 1}
    assert not two, f"inputs scored by two versions: {list(two.items())[:5]}"
    return {k: sorted(v) for k, v in by_id.items()}


def _versions_by_partition(records: list[dict]) -> dict[int, list[str]]:
    seen: dict[tuple[int, int], str] = {}
    for r in records:
        seen[(r["partition"], r["offset"])] = r["model_version"]
    out: dict[int, list[str]] = defaultdict(list)
    for (p, _o), v in sorted(seen.items()):
        out[p].append(v)
    return out


def _runs(seq: list[str]) -> list[str]:
    out: list[str] = []
    for v in seq:
        if not out or out[-1] != v:
            out.append(v)
    return out


def test_swap_during_a_stream_then_rollback(settings, data_dir, redis_client, keys):
    from kafka import KafkaProducer

    from dlsr_monitor.common.registry import Registry

    kafka = settings.kafka
    svc = _first_model(settings, data_dir)
    scores = Collector(kafka, kafka.scores_topic)
    alerts = Collector(kafka, kafka.alerts_topic)
    mon = Monitor(settings)
    try:
        stream_imgs = _zip_images(data_dir / "cifar10" / "test.zip", 0, 300)
        enough = threading.Event()  # set once 100 records after the swap are in
        stream = Stream(kafka, kafka.input_topic, stream_imgs, rate=10.0, until=enough).start()
        scores.wait_for(lambda s: len(s) >= 40, 180, "the first score records (v1)")

        # Vetted images arrive on dlsr.vetted; the trainer takes them in and publishes v2 while the stream flows.
        vp = KafkaProducer(**kafka.client_kwargs(), acks="all")
        for data in _zip_images(data_dir / "cifar10" / "train.zip", N_FIT, N_MORE):
            vp.send(kafka.vetted_topic, value=data, headers=[("source", b"review-ui")])
        vp.flush(30)
        vp.close()
        got, deadline = 0, time.monotonic() + 60
        while got < N_MORE and time.monotonic() < deadline:
            got += svc.take_in(0.5)
        assert got == N_MORE and svc.new_vetted() == N_MORE
        rec = svc.run_once("manual")
        assert rec is not None and rec.outcome == "promoted", rec.message
        assert (rec.version, rec.parent, rec.data_sizes["warm_start"]) == ("v2", "v1", 1)
        swap_published = time.time()
        print(f"\nv2 job: {rec.duration_s:.1f} s, parts {rec.timings}")
        scores.wait_for(lambda s: sum(r["model_version"] == "v2" for _, r in s) >= 100, 240, "100 v2 records")
        enough.set()
        stream.join()
        snap = scores.wait_for(
            lambda s: {r["image_id"] for _, r in s} >= set(stream.sent), 240, "every score record"
        )
        records = [r for _, r in snap]
        _check_exactly_once(records, stream.sent)
        per_part = _versions_by_partition(records)
        for p, seq in per_part.items():
            assert _runs(seq) in (["v1", "v2"], ["v1"], ["v2"]), f"partition {p}: versions {_runs(seq)}"
        assert any("v2" in seq for seq in per_part.values()), "no record scored by v2"
        assert any(seq[0] == "v1" for seq in per_part.values())

        # The swap pause: longest gap between consecutive score records within 10 s around the first v2 record.
        times = sorted(t for t, _ in snap)
        t_swap = min(t for t, r in snap if r["model_version"] == "v2")
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        near = [b - a for a, b in zip(times, times[1:], strict=False) if t_swap - 10 <= b <= t_swap + 10]
        gaps.sort()
        print(
            f"\nSWAP: {len(stream.sent)} inputs, {len(records)} score records; published {swap_published:.2f}, first v2 record {t_swap:.2f} "
            f"(+{t_swap - swap_published:.2f} s); longest gap within 10 s of the swap {max(near):.3f} s; "
            f"median gap {gaps[len(gaps) // 2]:.3f} s, longest gap anywhere {gaps[-1]:.3f} s"
        )

        # The trainer's `model` alert for v2 is on the alerts topic.
        alerts.wait_for(
            lambda s: any(r.get("kind") == "model" and r.get("version") == "v2" for _, r in s),
            60,
            "the v2 alert",
        )

        # Rollback: the pointer returns to v1 and the monitor follows.
        reg = Registry(redis_client, keys, settings.model.artifact_store)
        assert reg.rollback(expected="v2").version == "v1"
        more = _zip_images(data_dir / "cifar10" / "test.zip", 300, 120)
        after = Stream(kafka, kafka.input_topic, more, rate=25.0, first=100_000).start()
        after.join()
        snap = scores.wait_for(
            lambda s: {r["image_id"] for _, r in s} >= set(after.sent), 240, "rollback scores"
        )
        records = [r for _, r in snap]
        _check_exactly_once(records, stream.sent + after.sent)
        per_part = _versions_by_partition(records)
        for p, seq in per_part.items():
            assert _runs(seq)[-1] == "v1", f"partition {p} did not return to v1: {_runs(seq)}"
            assert _runs(seq) in (["v1", "v2", "v1"], ["v1"], ["v2", "v1"]), f"partition {p}: {_runs(seq)}"
    finally:
        mon.close()
        scores.close()
        alerts.close()
        if svc.intake is not None:
            svc.intake.close()


def test_corrupted_artifact_is_refused_and_v1_keeps_serving(settings, data_dir, redis_client, keys):
    from dlsr.artifacts import load_detector
    from dlsr_monitor.common.registry import Registry

    kafka = settings.kafka
    svc = _first_model(settings, data_dir)
    reg = Registry(redis_client, keys, settings.model.artifact_store)
    # A distinct artifact (its manifest records other metrics), registered, then one byte of its weights flipped.
    v1 = reg.entry("v1")
    tmp = Path(settings.trainer.workdir).parent / "v2-src"
    load_detector(reg.artifact_path(v1), encoder=svc.ctx.ops.encoder).save(tmp, metrics={"copy": 2})
    v2 = reg.register(tmp, threshold=v1.threshold, alpha=v1.alpha, parent="v1")
    weights = reg.artifact_path(v2) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    scores = Collector(kafka, kafka.scores_topic)
    alerts = Collector(kafka, kafka.alerts_topic)
    mon = Monitor(settings)
    try:
        first = Stream(kafka, kafka.input_topic, _zip_images(data_dir / "cifar10" / "test.zip", 0, 30), 25.0)
        first.start().join()
        scores.wait_for(lambda s: len({r["image_id"] for _, r in s}) >= 30, 180, "v1 scores")
        reg.promote(v2.version, expected="v1")
        # The monitor turns watcher events into alerts between batches, so keep images flowing.
        second = Stream(
            kafka, kafka.input_topic, _zip_images(data_dir / "cifar10" / "test.zip", 30, 30), 10.0, 30
        )
        second.start()
        snap = alerts.wait_for(
            lambda s: any(r.get("kind") == "model" and r.get("event") == "load_failed" for _, r in s),
            60,
            "a load_failed model alert",
        )
        failed = [r for _, r in snap if r.get("event") == "load_failed"]
        assert failed[0]["version"] == "v2" and "sha256 mismatch" in (failed[0].get("reason") or "")
        second.join()
        snap = scores.wait_for(
            lambda s: len({r["image_id"] for _, r in s}) >= 60, 120, "scores after the refusal"
        )
        assert {r["model_version"] for _, r in snap} == {"v1"}
        # The pointer moved; the monitor refused to follow a bad artifact.
        assert reg.current_version() == "v2"
    finally:
        mon.close()
        scores.close()
        alerts.close()
        if svc.intake is not None:
            svc.intake.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_gate_failure_is_recorded_and_not_promoted(settings, data_dir):
    # The reference OOD set is CIFAR-10 test itself: no model can tell it from the vetted ID data (AUROC ~0.5),
    # so the AUROC gate must refuse the candidate and say by how much.
    from dlsr_monitor.trainer.intake import ingest_path
    from dlsr_monitor.trainer.schedule import build_service

    trainer = settings.trainer.model_copy(
        update={"reference_ood": data_dir / "cifar10" / "test.zip", "min_auroc": 0.9}
    )
    s = settings.model_copy(update={"trainer": trainer})
    svc = build_service(s, intake=False, progress=False)
    svc.ctx.config.reference_ood_limit = 200
    ingest_path(svc.ctx.store, data_dir / "cifar10" / "train.zip", limit=N_FIT)
    rec = svc.run_once("fit")
    assert rec is not None and rec.outcome == "rejected", rec.message
    stored = svc.ctx.history.get(rec.job_id)
    assert stored.failed_gates() == ["auroc"]
    g = stored.gates["auroc"]
    assert g["value"] < 0.9 and "short by" in g["detail"]
    assert svc.ctx.registry.current_version() is None
    assert (Path(s.model.artifact_store) / "rejected" / rec.job_id / "manifest.json").is_file()
