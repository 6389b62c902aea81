"""BaseDetector (inputs, encoder path, calibration and predict, checks) and the detector registry.

The shared logic is exercised through DLSRDetector, the detector it was written for.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr.base import check_boundaries, detector_class, detector_kinds, pad_rows, register_detector
from dlsr.baselines import KNNDetector, MahalanobisDetector
from dlsr.detector import DLSRDetector
from dlsr.exceptions import CalibrationWarning, FeatureWidthError, NotCalibratedError
from dlsr.readers import ImageItem
from tests.dlsr._synthetic import BOUNDARIES, TINY, D, ToyDetector, clusters


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models are dominated by thread hand-offs on a busy 2-core box; one thread is faster and stable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clusters()


@pytest.fixture(scope="module")
def fitted(data: tuple[np.ndarray, np.ndarray]) -> DLSRDetector:
    return DLSRDetector(t=5, **TINY).fit(data[0][:800])


def test_calibrate_and_predict(fitted: DLSRDetector, data) -> None:
    x_id, x_ood = data
    det = DLSRDetector(t=5, **TINY)
    with pytest.raises(NotCalibratedError, match=r"call calibrate\(\) first"):
        fitted.predict(x_id[:3]) if not fitted.is_calibrated else det.predict(x_id[:3])
    fitted.calibrate(x_id[800:1000], alpha=0.05)
    assert fitted.is_calibrated and fitted.alpha == 0.05 and fitted.calibration_scores.shape == (200,)
    pred = fitted.predict(np.concatenate([x_id[1000:], x_ood]))
    assert pred.score.shape == pred.p_value.shape == pred.is_ood.shape == (500,)
    np.testing.assert_array_equal(pred.is_ood, pred.score > pred.threshold)
    assert pred.is_ood[:200].mean() < 0.15 and pred.is_ood[200:].mean() > 0.8
    assert np.all((pred.p_value > 0) & (pred.p_value <= 1))
    with pytest.warns(CalibrationWarning):
        det2 = DLSRDetector(t=5, **{**TINY, "epochs": 1}).fit(x_id[:100]).calibrate(x_id[100:120], alpha=0.01)
    assert det2.threshold == float("inf") and not det2.predict(x_ood[:5]).is_ood.any()


class StubEncoder:
    """Duck-typed encoder: pixels -> mean colour per channel spread over D dims (deterministic, tiny)."""

    name = "stub"
    dim = D
    boundaries = BOUNDARIES

    def __init__(self) -> None:
        self.proj = torch.randn(3, D, generator=torch.Generator().manual_seed(0))

    def identity(self) -> dict:
        return {"name": "stub", "weights": {"source": "test"}}

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        arr = np.stack(
            [np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) / 255 for im in images]
        )
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.mean(dim=(2, 3)) @ self.proj)

    def encode(self, images, *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return self.encode_pixels(self.preprocess(list(images))).numpy()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_images_and_pixels_go_through_the_encoder() -> None:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(40)]
    enc = StubEncoder()
    det = DLSRDetector(enc, **{**TINY, "boundaries": None, "epochs": 1})
    assert det.boundaries == BOUNDARIES and det.encoder_name == "stub"
    det.fit(images=imgs[:30])
    via_images = det.score(images=imgs[30:])
    via_pixels = det.score_pixels(enc.preprocess(imgs[30:]))
    np.testing.assert_allclose(via_images, via_pixels, rtol=1e-6)
    # Undecodable items are reported by name, not fatal: skipped by fit, NaN (flagged) when scored.
    good = [ImageItem(f"ok{i}", _png(im)) for i, im in enumerate(imgs[:3])]
    items = [good[0], ImageItem("broken.jpg", b"not an image"), *good[1:]]
    s = det.score(images=items)
    assert (
        np.isnan(s[1])
        and np.all(np.isfinite(s[[0, 2, 3]]))
        and det.failures == [("broken.jpg", "not_an_image")]
    )
    np.testing.assert_allclose(s[[0, 2, 3]], det.score(images=imgs[:3]), rtol=1e-6)
    det.calibrate(images=items, alpha=0.5)  # the undecodable item is left out of the calibration set
    assert det.calibration_scores.shape == (3,)
    det.fit(images=items + items)
    assert det.n_train == 6 and len(det.failures) == 2
    with pytest.raises(FeatureWidthError, match="from encoder stub"):
        det.score(np.zeros((2, 10), dtype=np.float32))
    with pytest.raises(FeatureWidthError, match="do not match encoder"):
        DLSRDetector(enc, boundaries=(0, 64))


def test_boundaries_are_checked() -> None:
    assert check_boundaries(None) is None and check_boundaries([0, 8, 64], dim=64) == (0, 8, 64)
    for bad in ((8, 64), (0,), (0, 8, 8, 64)):
        with pytest.raises(ValueError, match="strictly increasing"):
            check_boundaries(bad)
    with pytest.raises(FeatureWidthError, match="end at 64 but the features have D=32"):
        check_boundaries((0, 64), dim=32)


def test_pad_rows_pads_small_batches_only() -> None:
    x = torch.ones(3, 4)
    padded = pad_rows(x, 8)
    assert padded.shape == (8, 4) and torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_rows(x, 2) is x


def test_the_built_in_kinds_are_registered() -> None:
    assert detector_kinds() == ("dlsr", "knn", "mahalanobis")
    assert detector_class("dlsr") is DLSRDetector
    assert detector_class("knn") is KNNDetector
    assert detector_class("mahalanobis") is MahalanobisDetector


def test_the_decorator_fills_the_table(registered_toy: type[ToyDetector]) -> None:
    assert registered_toy is ToyDetector  # returned unchanged
    assert detector_class("toy") is ToyDetector and "toy" in detector_kinds()
    assert register_detector(ToyDetector) is ToyDetector  # the same class again (a reload) is fine
    x = clusters(n_id=50, n_ood=1)[0]
    det = detector_class("toy")(scale=2.0, progress=False).fit(x)
    np.testing.assert_allclose(det.score(x[:3]), 2.0 * ((x[:3] - x.mean(0)) ** 2).sum(1), rtol=1e-5)


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown detector kind 'nope'; choose one of \['dlsr', 'knn', 'mahalanobis'\]"
    ):
        detector_class("nope")


def test_registering_needs_an_own_kind_that_is_free(registered_toy: type[ToyDetector]) -> None:
    class Inherits(ToyDetector):  # kind "toy" comes from the parent: not its own
        pass

    class Impostor(ToyDetector):
        kind: ClassVar[str] = "toy"

    with pytest.raises(TypeError, match="its own `kind`"):
        register_detector(Inherits)
    with pytest.raises(TypeError, match="BaseDetector subclass"):
        register_detector(int)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="'toy' is already taken by tests.dlsr._synthetic.ToyDetector"):
        register_detector(Impostor)
    assert detector_class("toy") is ToyDetector


@pytest.mark.parametrize(("kind", "score_batch"), [("dlsr", 1024), ("knn", 4096), ("mahalanobis", 4096)])
def test_base_options_are_taken_once_with_each_kinds_defaults(kind: str, score_batch: int) -> None:
    cls = detector_class(kind)
    det = cls()
    assert (det.score_batch_size, det.encode_batch_size, det.progress) == (score_batch, 64, True)
    assert list(det.hyperparameters())[-2:] == ["score_batch_size", "encode_batch_size"]
    det = cls(boundaries=(0, 8, 16), score_batch_size=7, encode_batch_size=3, progress=False)
    assert (det.boundaries, det.score_batch_size, det.encode_batch_size, det.progress) == (
        (0, 8, 16),
        7,
        3,
        False,
    )
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        cls(score_batch_size=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        cls(colour="red")
