"""kNN and Mahalanobis baselines: correctness against brute force / scikit-learn, separation, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from sklearn.covariance import ledoit_wolf_shrinkage as sk_lw_shrinkage

from dlsr.artifacts import load_detector
from dlsr.baselines import KNNDetector, MahalanobisDetector, ledoit_wolf_shrinkage
from dlsr.exceptions import FeatureWidthError, NotFittedError
from dlsr.metrics import auroc
from tests.dlsr._synthetic import BOUNDARIES, clusters


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clusters(n_id=1500, n_ood=300)


def _brute_knn(bank: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = np.sort(qq.astype(np.float64) @ b.T.astype(np.float64), axis=1)[:, ::-1]
    return 1.0 - sims[:, k - 1]


def test_knn_matches_brute_force_and_is_chunk_independent(data) -> None:
    x_id, x_ood = data
    q = np.concatenate([x_id[1000:1100], x_ood[:50]])
    ref = _brute_knn(x_id[:1000], q, 10)
    for chunk in (7, 256, 5000):
        det = KNNDetector(k=10, chunk_size=chunk, progress=False).fit(x_id[:1000])
        np.testing.assert_allclose(det.score(q), ref, atol=1e-5)
    s64 = det.score(q, batch_size=64)
    for bs in (1, 7, 1000):
        np.testing.assert_allclose(det.score(q, batch_size=bs), s64, rtol=1e-6)


def test_ledoit_wolf_matches_scikit_learn(data) -> None:
    x = data[0][:500].astype(np.float64)
    xc = x - x.mean(0)
    assert ledoit_wolf_shrinkage(torch.from_numpy(xc)) == pytest.approx(
        sk_lw_shrinkage(xc, assume_centered=True)
    )


def test_mahalanobis_matches_scikit_learn_ledoit_wolf(data) -> None:
    x_id, x_ood = data
    det = MahalanobisDetector(progress=False).fit(x_id[:1000])
    lw = LedoitWolf().fit(x_id[:1000].astype(np.float64))
    q = np.concatenate([x_id[1000:1050], x_ood[:50]]).astype(np.float64)
    np.testing.assert_allclose(det.score(q), lw.mahalanobis(q), rtol=1e-6)
    fixed = MahalanobisDetector(shrinkage=0.5, progress=False).fit(x_id[:1000])
    assert fixed.shrinkage_used == 0.5 and not np.allclose(fixed.score(q), det.score(q))


@pytest.mark.parametrize("cls", [KNNDetector, MahalanobisDetector])
def test_baselines_separate_two_clusters_and_round_trip(cls, data, tmp_path) -> None:
    x_id, x_ood = data
    det = cls(boundaries=BOUNDARIES, progress=False).fit(x_id[:1000])
    assert auroc(det.score(x_id[1000:]), det.score(x_ood)) > 0.9
    det.calibrate(x_id[1000:1300], alpha=0.05)
    loaded = load_detector(det.save(tmp_path / cls.kind))
    assert type(loaded) is cls and loaded.threshold == det.threshold
    np.testing.assert_array_equal(loaded.score(x_ood), det.score(x_ood))
    np.testing.assert_array_equal(loaded.predict(x_ood).is_ood, det.predict(x_ood).is_ood)


def test_baseline_errors(data) -> None:
    x = data[0]
    with pytest.raises(NotFittedError, match=r"call fit\(\) first"):
        KNNDetector().score(x[:3])
    with pytest.raises(ValueError, match="k=50 needs at least 50"):
        KNNDetector(progress=False).fit(x[:10])
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisDetector(shrinkage=2.0)
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisDetector(shrinkage="oas")
    det = KNNDetector(k=3, progress=False).fit(x[:20])
    with pytest.raises(FeatureWidthError, match="D'=8"):
        det.score(x[:2, :8])


def test_knn_warm_start_extends_the_bank(data) -> None:
    x = data[0]
    det = KNNDetector(k=5, progress=False).fit(x[:100])
    det.fit(x[100:300], warm_start=True)
    assert det.bank.shape == (300, x.shape[1]) and det.n_train == 300
    np.testing.assert_allclose(det.score(x[300:320]), _brute_knn(x[:300], x[300:320], 5), atol=1e-5)
