"""Per-stage evidence: per-stage scores of every detector kind, their calibration and p-values, the saved
reference sample, artifacts from before they existed, and the shift rule (dlsr.evidence)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dlsr.artifacts import file_sha256, load_detector
from dlsr.base import REFERENCE_ROWS, BaseDetector
from dlsr.baselines import KNNDetector, MahalanobisDetector
from dlsr.calibration import p_values
from dlsr.detector import DLSRDetector
from dlsr.evidence import early_stages, shift_fractions, shift_of, shifts, stage_p_values
from dlsr.exceptions import DLSRError
from tests.dlsr._synthetic import BOUNDARIES, TINY, D, ToyDetector, clusters

S = len(BOUNDARIES) - 1


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clusters(n_id=700, n_ood=100)


def _make(kind: str) -> BaseDetector:
    if kind == "dlsr":
        return DLSRDetector(t=2, n_draws=2, **{**TINY, "epochs": 3})
    if kind == "knn":
        return KNNDetector(k=5, chunk_size=64, boundaries=BOUNDARIES, progress=False)
    return MahalanobisDetector(boundaries=BOUNDARIES, progress=False)


KINDS = ("dlsr", "knn", "mahalanobis")


@pytest.fixture(scope="module")
def calibrated(data) -> dict[str, BaseDetector]:
    return {kind: _make(kind).fit(data[0][:400]).calibrate(data[0][400:600], alpha=0.05) for kind in KINDS}


# -- per-stage scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stage_scores_have_one_column_per_stage_and_do_not_depend_on_the_batch(kind, calibrated, data) -> None:
    det = calibrated[kind]
    x = np.concatenate([data[0][600:640], data[1][:40]])
    full = det.score_stages(x)
    assert full.shape == (80, S) and full.dtype == np.float64 and np.isfinite(full).all()
    np.testing.assert_array_equal(det.score_stages(x), full)  # a repeated call is bit-identical
    for bs in range(1, 18):
        np.testing.assert_allclose(det.score_stages(x, batch_size=bs), full, rtol=1e-6, atol=1e-12)
    perm = np.random.default_rng(1).permutation(len(x))
    np.testing.assert_allclose(det.score_stages(x[perm]), full[perm], rtol=1e-6, atol=1e-12)
    # OOD rows are more unusual than ID rows in (at least) the stage that carries the difference.
    assert full[40:].mean(axis=0).max() > full[:40].mean(axis=0).max()


def test_dlsr_stage_scores_are_the_main_score_per_layer(calibrated, data) -> None:
    det = calibrated["dlsr"]
    x = data[1][:30]
    widths = np.diff(BOUNDARIES)
    cos = det.score_stages(x)  # mfsim5 (the config's score): 1 - cosine per layer
    np.testing.assert_allclose(cos.mean(axis=1) - 1.0, det.score(x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        cos[:, 1:].mean(axis=1) - 1.0, det.score(x, score="mfsim4"), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_array_equal(det.score_stages(x, score="mfsim4"), cos)  # same per-layer cosines
    mse = det.score_stages(x, score="mse")
    np.testing.assert_allclose(mse @ widths / D, det.score(x, score="mse"), rtol=1e-9)
    both = det.score_all(x, scores=("mse", "mfsim4"), stages=True)
    np.testing.assert_array_equal(both["mse:stages"], mse)
    np.testing.assert_array_equal(both["mfsim4:stages"], cos)


def test_mahalanobis_stage_scores_are_a_gaussian_per_stage(calibrated, data) -> None:
    det = calibrated["mahalanobis"]
    x = data[1][:20]
    ref = MahalanobisDetector(progress=False)
    for s, (lo, hi) in enumerate(zip(BOUNDARIES[:-1], BOUNDARIES[1:], strict=True)):
        ref.fit(data[0][:400, lo:hi])
        np.testing.assert_allclose(det.score_stages(x)[:, s], ref.score(x[:, lo:hi]), rtol=1e-9)


def test_knn_stage_scores_are_the_knn_score_within_each_stage(calibrated, data) -> None:
    det = calibrated["knn"]
    x = data[1][:20]
    for s, (lo, hi) in enumerate(zip(BOUNDARIES[:-1], BOUNDARIES[1:], strict=True)):
        ref = KNNDetector(k=5, progress=False).fit(data[0][:400, lo:hi])
        np.testing.assert_allclose(det.score_stages(x)[:, s], ref.score(x[:, lo:hi]), rtol=1e-5, atol=1e-6)


class CountingEncoder:
    """Duck-typed encoder (pixels -> D features) that counts its forward passes."""

    name = "counting"
    dim = D
    boundaries = BOUNDARIES

    def __init__(self) -> None:
        self.proj = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
        self.passes = 0

    def identity(self) -> dict:
        return {"name": "counting", "weights": {"source": "test"}}

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return torch.tanh(x.mean(dim=(2, 3)) @ self.proj)


@pytest.mark.parametrize("kind", KINDS)
def test_score_pixels_gives_both_from_one_encoder_pass(kind) -> None:
    enc = CountingEncoder()
    pixels = torch.rand(60, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    feats = enc.encode_pixels(pixels).numpy()
    det = _make(kind)
    det._adopt_encoder(enc)
    det.fit(feats[:50])
    enc.passes = 0
    scores, stages = det.score_pixels(pixels[50:], stages=True)
    assert enc.passes == 1
    np.testing.assert_allclose(scores, det.score_pixels(pixels[50:]), rtol=1e-6)
    np.testing.assert_allclose(stages, det.score_stages(feats[50:]), rtol=1e-6, atol=1e-12)
    assert isinstance(det.score_pixels(pixels[50:]), np.ndarray)  # without stages=: the scores as before
    enc.passes = 0
    scores_f, stages_f, z = det.score_pixels(pixels[50:], stages=True, features=True)
    assert enc.passes == 1  # the features come from the same pass
    np.testing.assert_allclose(z, feats[50:], rtol=1e-6)
    np.testing.assert_allclose(scores_f, scores, rtol=1e-6)
    np.testing.assert_allclose(stages_f, stages, rtol=1e-6, atol=1e-12)
    s_only, none, z2 = det.score_pixels(pixels[50:], features=True)
    assert none is None and z2.dtype == np.float32 and z2.shape == (10, D)


# -- calibration, p-values, reference sample -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_calibration_keeps_stage_scores_and_a_reference_sample(kind, calibrated, data) -> None:
    det = calibrated[kind]
    cal_x = data[0][400:600]
    np.testing.assert_array_equal(det.stage_calibration_scores, det.score_stages(cal_x))
    np.testing.assert_array_equal(det.calibration_scores, det.score(cal_x))
    assert det.reference_features.shape == (REFERENCE_ROWS, D) and det.reference_features.dtype == np.float32
    np.testing.assert_array_equal(det.reference_features, cal_x[:REFERENCE_ROWS])
    np.testing.assert_array_equal(det.reference_scores, det.calibration_scores[:REFERENCE_ROWS])
    x = np.concatenate([data[0][600:], data[1]])
    p = det.stage_p_values(det.score_stages(x))
    assert p.shape == (len(x), S) and np.all((p > 0) & (p <= 1))
    for s in range(S):
        np.testing.assert_array_equal(p[:, s], p_values(det.stage_calibration_scores[:, s], det.score_stages(x)[:, s]))
    # ID rows are rarely significant in any stage, OOD rows mostly are in their strongest one.
    assert (p[:100].min(axis=1) <= 0.05).mean() < 0.5 and (p[100:].min(axis=1) <= 0.05).mean() > 0.8


def test_small_calibration_sets_keep_all_rows_and_scores_only_keep_nothing(data) -> None:
    det = _make("mahalanobis").fit(data[0][:400]).calibrate(data[0][400:420], alpha=0.1)
    assert det.reference_features.shape == (20, D) and det.stage_calibration_scores.shape == (20, S)
    det.calibrate(scores=det.score(data[0][420:520]), alpha=0.1)  # precomputed scores: no rows, no stages
    assert det.is_calibrated and det.stage_calibration_scores is None and det.reference_features is None
    assert det.stage_p_values(det.score_stages(data[1][:3])) is None
    det.calibrate(data[0][400:500], alpha=0.1)
    det.fit(data[0][:300])  # a refit drops the calibration it no longer matches, stages and reference too
    assert det.stage_calibration_scores is None and det.reference_features is None and det.reference_scores is None


def test_a_kind_without_stage_scores_calibrates_as_before(data) -> None:
    det = ToyDetector(progress=False, boundaries=BOUNDARIES).fit(data[0][:100]).calibrate(data[0][100:200], alpha=0.1)
    assert det.is_calibrated and not det.has_stage_scores and det.stage_calibration_scores is None
    assert det.reference_features.shape == (REFERENCE_ROWS, D)  # the reference sample needs no stages
    with pytest.raises(DLSRError, match="no per-stage scores"):
        det.score_stages(data[1][:2])


@pytest.mark.parametrize("kind", KINDS)
def test_stage_calibration_and_reference_round_trip(kind, calibrated, data, tmp_path: Path) -> None:
    det = calibrated[kind]
    loaded = load_detector(det.save(tmp_path / kind))
    x = np.concatenate([data[0][600:650], data[1][:50]])
    np.testing.assert_array_equal(loaded.score_stages(x), det.score_stages(x))
    np.testing.assert_array_equal(loaded.stage_calibration_scores, det.stage_calibration_scores)
    np.testing.assert_array_equal(loaded.reference_features, det.reference_features)
    np.testing.assert_array_equal(loaded.reference_scores, det.reference_scores)
    np.testing.assert_array_equal(loaded.stage_p_values(loaded.score_stages(x)), det.stage_p_values(det.score_stages(x)))
    np.testing.assert_allclose(loaded.score(loaded.reference_features), loaded.reference_scores, rtol=1e-9)


def _as_old_artifact(path: Path) -> Path:
    """Rewrite a saved detector as the format wrote it before per-stage evidence: no stage scores or reference
    sample in calibration.json, no per-stage Gaussians in the weights; the manifest's sha256s updated."""
    cal_path = path / "calibration.json"
    cal = json.loads(cal_path.read_text())
    cal.pop("stage_scores", None)
    cal.pop("reference", None)
    cal_path.write_text(json.dumps(cal))
    weights = path / "weights.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("stage.")}
    save_file(tensors, str(weights), metadata={"format_version": "1"})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: file_sha256(path / name) for name in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_an_artifact_without_stage_calibration_loads_and_scores(kind, calibrated, data, tmp_path: Path) -> None:
    det = calibrated[kind]
    old = load_detector(_as_old_artifact(det.save(tmp_path / kind)))
    x = data[1][:20]
    np.testing.assert_array_equal(old.score(x), det.score(x))
    np.testing.assert_array_equal(old.calibration_scores, det.calibration_scores)
    assert old.threshold == det.threshold and old.is_calibrated
    assert old.stage_calibration_scores is None and old.reference_features is None and old.reference_scores is None
    if kind == "mahalanobis":  # its per-stage Gaussians are in the weights: an old one has none
        assert not old.has_stage_scores
        with pytest.raises(DLSRError, match="no per-stage scores"):
            old.score_stages(x)
    else:  # derived from the model: computable, but nothing to turn them into p-values
        np.testing.assert_array_equal(old.score_stages(x), det.score_stages(x))
        assert old.stage_p_values(old.score_stages(x)) is None
    assert old.save(tmp_path / f"{kind}-again").is_dir()  # and saves again without them


def test_malformed_stage_calibration_is_an_artifact_error(calibrated, tmp_path: Path) -> None:
    from dlsr.exceptions import ArtifactError

    path = calibrated["mahalanobis"].save(tmp_path / "m")
    cal = json.loads((path / "calibration.json").read_text())
    cal["stage_scores"] = [row[:2] for row in cal["stage_scores"]]  # 2 columns for 5 stages
    (path / "calibration.json").write_text(json.dumps(cal))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["calibration.json"] = file_sha256(path / "calibration.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="per-stage calibration"):
        load_detector(path)


# -- the shift rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, expected",
    [
        ([0.001, 0.3, 0.5, 0.6, 0.7], "low_level"),  # stage 1 only
        ([0.5, 0.04, 0.5, 0.6, 0.7], "low_level"),  # stage 2 only
        ([0.5, 0.5, 0.01, 0.6, 0.7], "semantic"),  # the middle stage of 5 counts as late
        ([0.5, 0.5, 0.5, 0.6, 0.002], "semantic"),
        ([0.01, 0.5, 0.5, 0.6, 0.002], "mixed"),  # both halves
        ([0.5, 0.5, 0.5, 0.6, 0.7], "mixed"),  # neither
        ([0.05, 0.5, 0.5, 0.6, 0.7], "low_level"),  # p == alpha is significant
        ([0.0501, 0.5, 0.5, 0.6, 0.7], "mixed"),
        ([0.01, 0.5, 0.5, 0.6], "low_level"),  # S = 4: early 1-2, late 3-4
        ([0.5, 0.5, 0.01, 0.6], "semantic"),
        ([0.01, 0.6], "low_level"),  # S = 2
        ([0.6, 0.01], "semantic"),
        ([0.001], "mixed"),  # S = 1: nothing to split
        ([np.nan, 0.5, 0.5, 0.6, 0.7], "low_level"),  # NaN = maximally unusual
    ],
)
def test_shift_rule(p, expected) -> None:
    assert shift_of(np.array(p), 0.05) == expected


def test_shift_rule_helpers() -> None:
    assert [early_stages(s) for s in range(1, 8)] == [0, 1, 1, 2, 2, 3, 3]
    p = np.array([[0.001, 0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5, 0.001], [0.5] * 5, [0.5] * 5])
    labels = shifts(p, 0.01)
    assert labels == ["low_level", "semantic", "mixed", "mixed"]
    assert shift_fractions(labels) == {"low_level": 0.25, "semantic": 0.25, "mixed": 0.5}
    assert shift_fractions([]) == {"low_level": 0.0, "semantic": 0.0, "mixed": 0.0}
    with pytest.raises(ValueError, match="alpha"):
        shift_of(np.array([0.1, 0.2]), 1.5)
    with pytest.raises(ValueError, match=r"\(N, S\)"):
        shifts(np.array([0.1, 0.2]), 0.05)


def test_stage_p_values_is_p_values_per_column() -> None:
    rng = np.random.default_rng(0)
    cal, x = rng.normal(size=(99, 3)), rng.normal(size=(7, 3))
    p = stage_p_values(cal, x)
    assert p.shape == (7, 3)
    for s in range(3):
        np.testing.assert_array_equal(p[:, s], p_values(cal[:, s], x[:, s]))
    np.testing.assert_array_equal(stage_p_values(cal, x[0]), p[:1])  # one row
    with pytest.raises(ValueError, match="stage scores"):
        stage_p_values(cal, x[:, :2])
