"""Drift on correlated frames, on Tansu + Redis with the real small model: a clip of near-identical frames of an
ID image the model happens to flag would raise drift under per-frame counting; counted per scene it does not,
while clips of OOD images (MNIST) still raise it. Frames come from `dlsr.video` (jitter, zoom, noise)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dlsr_monitor.common.contract import DriftAlert, parse_alert
from dlsr_monitor.console.views import StateView
from dlsr_monitor.monitor.drift import DriftTest
from tests.integration.conftest import Item, load_images, produce, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _clip(data: bytes, n: int, seed: int) -> list[bytes]:
    from dlsr.video import render_clip

    return [_png(f) for f in render_clip(_pixels(data), n, np.random.default_rng(seed))]


def test_correlated_id_frames_do_not_raise_drift_but_ood_clips_do(
    test_settings, published_model, small_model, data_dir, tansu, topics, monitors, readers, redis_client, keys
):
    from dlsr.artifacts import load_detector
    from dlsr.readers import array_images
    from dlsr_monitor.common.kafka_io import ensure_topics

    ensure_topics(tansu, [topics.input, topics.scores, topics.alerts, topics.dlq], partitions=2)
    cifar = load_images(data_dir, "cifar10", "test", 100, seed=5)
    mnist = load_images(data_dir, "mnist", "test", 16, seed=5)
    det = load_detector(small_model.path)
    scores = det.score(images=array_images(np.stack([_pixels(c) for c in cifar])))
    worst = int(np.argmax(scores))  # the ID image the model likes least: its clip's frames are flagged
    calm = [c for i, c in enumerate(cifar) if i != worst and scores[i] < small_model.threshold]
    # camV: 40 distinct ID images, then 40 near-identical frames of the flagged ID image.
    cam_v = [Item(v, "camV", "id", None) for v in calm[:40]]
    cam_v += [Item(v, "camV", "id", None) for v in _clip(cifar[worst], 40, seed=1)]
    # camO: 12 ID clips of 4 frames, then 16 MNIST clips of 4 frames: a real shift, seen through correlated frames.
    cam_o = [Item(v, "camO", "id", None) for k, c in enumerate(calm[40:52]) for v in _clip(c, 4, seed=10 + k)]
    cam_o += [Item(v, "camO", "ood", None) for k, m in enumerate(mnist) for v in _clip(m, 4, seed=30 + k)]

    alerts = readers(topics.alerts)
    scores_topic = readers(topics.scores)
    mon = monitors("scenes", drift_min_images=10)
    produce(tansu, topics.input, cam_v + cam_o)
    n = len(cam_v) + len(cam_o)
    wait_until(lambda: len(scores_topic.poll()) >= n, 300, f"{n} scores", (mon,))
    assert mon.terminate() == 0, mon.log()[-2000:]
    alerts.poll(2.0)

    state = StateView.from_settings(redis_client, keys, test_settings.monitor)
    v, o = state.read_drift("camV"), state.read_drift("camO")
    print(f"\ncamV {v}\ncamO {o}")
    # camV: the flagged scene's frames would raise drift counted one by one...
    m = test_settings.monitor
    old = DriftTest(alpha=small_model.alpha, null_factor=m.drift_null_factor, raise_p=m.drift_raise_p,
                    clear_p=m.drift_clear_p, min_images=10)
    assert v["images"] == 80 and v["ood"] >= 10, v
    assert old.evaluate("ok", v["images"], v["ood"]).state == "raised", "per-frame counting would raise"
    # ... counted per scene they are one unit (a few at most, if the jitter crossed the cut), and nothing raises.
    assert 40 < v["units"] <= 44 and v["unit_ood"] <= 4, v
    assert v["state"] == "ok"
    # camO: every clip is a unit (two MNIST digits may sit within the scene distance and merge), the MNIST ones
    # flagged: drift raised.
    assert 20 <= o["units"] <= 30 and o["unit_ood"] >= 8, o
    assert o["state"] == "raised"
    drift = [a for a in (parse_alert(r.value) for r in alerts.records) if isinstance(a, DriftAlert)]
    assert [(a.source, a.state) for a in drift] == [("camO", "raised")], drift
    w = drift[0].window
    assert w.units is not None and w.unit_ood is not None and w.units < w.images and w.rate == w.unit_ood / w.units
