"""BaseDetector and the detector registry: kinds -> classes, filled by @register_detector."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from dlsr.base import detector_class, detector_kinds, register_detector
from dlsr.baselines import KNNDetector, MahalanobisDetector
from dlsr.detector import DLSRDetector
from tests.dlsr._synthetic import ToyDetector, clusters


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
