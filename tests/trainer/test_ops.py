"""DlsrOps: the detector kind chosen by the settings (DLSR or a feature baseline) and warm-start rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr_monitor.config.settings import ModelSettings
from dlsr_monitor.trainer.ops import DlsrOps


def _model(tmp_path, detector: str) -> ModelSettings:
    # A tiny random backbone: the kind plumbing, not the quality, is under test.
    return ModelSettings(
        detector=detector,
        encoder="test_efficientnet",
        encoder_weights="random",
        input_size=32,
        device="cpu",
        feature_cache=tmp_path / "cache",
    )


@pytest.mark.parametrize(("kind", "extra"), [("mahalanobis", {}), ("knn", {"k": 5})])
def test_baseline_kind_fits_saves_and_loads(tmp_path, kind, extra):
    ops = DlsrOps(_model(tmp_path, kind), extra)
    x = np.random.default_rng(0).normal(size=(200, ops.encoder.dim)).astype(np.float32)
    det = ops.fit(x[:150], warm_from=None, progress=False)
    assert det.kind == kind
    assert not ops.can_warm_start(det)  # baselines always refit from scratch
    det.calibrate(x[150:], alpha=0.1)
    path = det.save(tmp_path / "artifact")
    loaded = ops.load(path)
    assert loaded.kind == kind
    np.testing.assert_allclose(loaded.score(x[:10]), det.score(x[:10]), rtol=1e-6)
    # The monitor's path: preprocessed pixels in, one finite score per image out.
    images = [Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)) for v in (0, 128, 255)]
    scores = loaded.score_pixels(ops.encoder.preprocess(images))
    assert np.asarray(scores).shape == (3,) and np.isfinite(scores).all()


def test_dlsr_kind_warm_starts_only_from_dlsr(tmp_path):
    ops = DlsrOps(_model(tmp_path, "dlsr"), {"n_blocks": 1, "width": 16, "epochs": 1})
    x = np.random.default_rng(1).normal(size=(64, ops.encoder.dim)).astype(np.float32)
    det = ops.fit(x, warm_from=None, progress=False)
    assert det.kind == "dlsr" and det.n_blocks == 1
    assert ops.can_warm_start(det)
    maha = DlsrOps(_model(tmp_path, "mahalanobis")).fit(x, warm_from=None, progress=False)
    assert not ops.can_warm_start(maha)


def test_warm_start_from_a_loaded_artifact_takes_the_current_training_settings(tmp_path):
    ops = DlsrOps(_model(tmp_path, "dlsr"), {"n_blocks": 1, "width": 16, "epochs": 5})
    x = np.random.default_rng(2).normal(size=(64, ops.encoder.dim)).astype(np.float32)
    live = ops.load(ops.fit(x, warm_from=None, progress=False).save(tmp_path / "live"))
    before = {k: v.clone() for k, v in live.state_tensors().items()}
    refit = DlsrOps(_model(tmp_path, "dlsr"), {"n_blocks": 1, "width": 16, "epochs": 10, "lr": 3e-4})
    assert refit.can_warm_start(live)
    det = refit.fit(x[:32], warm_from=live, progress=False)
    assert det is live and det.n_train == 96 and len(det.history) == 5 + 1  # refit: a fifth of the live epochs
    assert (det.config.epochs, det.config.lr) == (10, 3e-4)  # training settings: the current ones
    assert any(not torch.equal(before[k], v) for k, v in det.state_tensors().items())


def _pngs(side: int, n: int):
    import io

    from dlsr.readers import ImageItem, MemoryImageSet

    rng = np.random.default_rng(side)
    items = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        items.append(ImageItem(f"{i}.png", buf.getvalue()))
    return MemoryImageSet(items)


def test_auto_input_size_comes_from_the_fit_images_and_the_artifact_keeps_it(tmp_path):
    from dlsr.artifacts import load_detector
    from dlsr.encoder import SMALL_SOURCE_SIZE

    model = _model(tmp_path, "dlsr").model_copy(update={"input_size": "auto"})
    lines: list[str] = []
    ops = DlsrOps(model, {"n_blocks": 1, "width": 16, "epochs": 1}, announce=lines.append)
    feats = ops.features(_pngs(32, 40), progress=False)  # 32x32 sources, like CIFAR-10
    assert ops.encoder.input_size == SMALL_SOURCE_SIZE
    det = ops.fit(feats, warm_from=None, progress=False)
    assert len(lines) == 1 and lines[0].startswith("estimated LFDN fit: ")  # before the fit, once
    assert ops.last_estimate.steps == 1 and ops.last_estimate.seconds > 0
    path = det.calibrate(feats, alpha=0.1).save(tmp_path / "artifact")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["encoder"]["input_size"] == SMALL_SOURCE_SIZE
    # Scoring uses the recorded size: a monitor rebuilds the encoder from the artifact, whatever its settings.
    assert load_detector(path).encoder.input_size == SMALL_SOURCE_SIZE
    # A fresh trainer process (no images seen yet) loads the live model at its own size too.
    assert DlsrOps(model).load(path).encoder.input_size == SMALL_SOURCE_SIZE


def test_a_number_keeps_the_input_size_whatever_the_images(tmp_path):
    ops = DlsrOps(_model(tmp_path, "mahalanobis"))  # input_size=32
    assert ops.encoder.input_size == 32
    ops.features(_pngs(64, 4), progress=False)
    assert ops.encoder.input_size == 32


def test_auto_lfdn_is_cpu_sized_and_trainer_detector_wins(tmp_path):
    ops = DlsrOps(_model(tmp_path, "dlsr"))
    det = ops.new_detector()
    assert (det.n_blocks, det.width, det.epochs) == (8, ops.encoder.dim, 20)  # device cpu: 8 blocks, D, 20 epochs
    det = DlsrOps(_model(tmp_path, "dlsr"), {"n_blocks": 2, "epochs": 3}).new_detector()
    assert (det.n_blocks, det.width, det.epochs) == (2, ops.encoder.dim, 3)
