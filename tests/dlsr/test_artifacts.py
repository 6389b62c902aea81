"""Saved detectors: exact round trip, manifest and digests, refusal of corrupt / unknown / incomplete artifacts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dlsr.artifacts as artifacts
from dlsr.artifacts import FORMAT_VERSION, artifact_digest, file_sha256, load_detector, read_manifest
from dlsr.calibration import conformal_rank
from dlsr.detector import DLSRDetector
from dlsr.exceptions import ArtifactError, NotFittedError
from tests.dlsr._synthetic import BOUNDARIES, D, clusters


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clusters(n_id=600, n_ood=100)


@pytest.fixture(scope="module")
def detector(data) -> DLSRDetector:
    det = DLSRDetector(
        n_blocks=2, width=64, epochs=2, batch_size=128, t=4, n_draws=2, boundaries=BOUNDARIES, progress=False
    )
    return det.fit(data[0][:400]).calibrate(data[0][400:], alpha=0.05)


def test_round_trip_scores_identically(detector: DLSRDetector, data, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "model", metrics={"auroc": 0.97})
    loaded = load_detector(path)
    assert isinstance(loaded, DLSRDetector)
    x = np.concatenate([data[0][:50], data[1]])
    np.testing.assert_array_equal(loaded.score(x), detector.score(x))
    for name in ("mse", "mfsim4"):
        np.testing.assert_array_equal(loaded.score(x, score=name, t=7), detector.score(x, score=name, t=7))
    assert loaded.threshold == detector.threshold and loaded.alpha == detector.alpha
    np.testing.assert_array_equal(loaded.calibration_scores, detector.calibration_scores)
    p1, p2 = loaded.predict(x), detector.predict(x)
    np.testing.assert_array_equal(p1.p_value, p2.p_value)
    np.testing.assert_array_equal(p1.is_ood, p2.is_ood)
    assert loaded.hyperparameters() == detector.hyperparameters()
    assert (loaded.dim, loaded.boundaries, loaded.n_train) == (D, BOUNDARIES, 400)
    assert loaded.history == detector.history


def test_manifest_contents_and_digest(detector: DLSRDetector, tmp_path: Path) -> None:
    a = detector.save(tmp_path / "a", metrics={"auroc": 0.9})
    b = detector.save(tmp_path / "b", metrics={"auroc": 0.9})
    m = read_manifest(a)
    assert m["format_version"] == FORMAT_VERSION and m["kind"] == "dlsr"
    assert m["feature_layout"] == {"dim": D, "boundaries": list(BOUNDARIES)}
    assert m["hyperparameters"]["n_blocks"] == 2 and m["training"]["n_samples"] == 400
    assert m["metrics"] == {"auroc": 0.9} and m["calibration"]["alpha"] == 0.05
    assert set(m["files"]) == {"weights.safetensors", "calibration.json"}
    for name, digest in m["files"].items():
        assert file_sha256(a / name) == digest
    # The same detector always gives the same bytes, hence the same content address.
    assert artifact_digest(a) == artifact_digest(b) == file_sha256(a / "manifest.json")
    assert artifact_digest(detector.save(tmp_path / "c", metrics={"auroc": 0.8})) != artifact_digest(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary leftovers


def test_overwrite_replaces_the_directory(detector: DLSRDetector, data, tmp_path: Path) -> None:
    other = DLSRDetector(n_blocks=1, width=32, epochs=1, boundaries=BOUNDARIES, progress=False).fit(
        data[0][:100]
    )
    path = other.save(tmp_path / "m")
    detector.save(path)
    assert isinstance(load_detector(path), DLSRDetector) and load_detector(path).n_blocks == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_flipped_byte_in_weights_is_refused(detector: DLSRDetector, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "m")
    w = path / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    w.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: sha256 mismatch"):
        load_detector(path)


def test_unknown_format_version_is_refused(detector: DLSRDetector, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "m")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unknown format version 99"):
        load_detector(path)


def test_missing_files_are_named(detector: DLSRDetector, tmp_path: Path) -> None:
    path = detector.save(tmp_path / "m")
    (path / "calibration.json").unlink()
    with pytest.raises(ArtifactError, match="missing file calibration.json"):
        load_detector(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="missing file manifest.json"):
        load_detector(path)
    with pytest.raises(ArtifactError, match="not a directory"):
        load_detector(tmp_path / "nowhere")


def test_failed_save_leaves_nothing_behind(detector: DLSRDetector, tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        detector.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotFittedError):
        DLSRDetector(boundaries=BOUNDARIES).save(tmp_path / "x")


def test_uncalibrated_detector_round_trips_uncalibrated(data, tmp_path: Path) -> None:
    det = DLSRDetector(n_blocks=1, width=32, epochs=1, boundaries=BOUNDARIES, progress=False).fit(
        data[0][:100]
    )
    loaded = load_detector(det.save(tmp_path / "m"))
    assert loaded.is_fitted and not loaded.is_calibrated
    np.testing.assert_array_equal(loaded.score(data[1][:20]), det.score(data[1][:20]))


def test_calibration_method_and_delta_round_trip_and_old_artifacts_load_as_marginal(
    detector: DLSRDetector, data, tmp_path: Path
) -> None:
    assert detector.calibration_method == "marginal" and detector.delta == 0.1  # the library default
    loaded = load_detector(detector.save(tmp_path / "marginal"))
    assert (loaded.calibration_method, loaded.delta) == ("marginal", 0.1)
    pac = DLSRDetector(n_blocks=1, width=32, epochs=1, boundaries=BOUNDARIES, progress=False).fit(data[0][:400])
    pac.calibrate(data[0][400:], alpha=0.05, method="pac", delta=0.2)
    marginal_threshold = float(np.sort(pac.calibration_scores)[conformal_rank(200, 0.05) - 1])
    assert pac.threshold > marginal_threshold  # 200 scores: the pac rank is higher than the marginal one
    path = pac.save(tmp_path / "pac")
    m = read_manifest(path)
    assert (m["calibration"]["method"], m["calibration"]["delta"]) == ("pac", 0.2)
    again = load_detector(path)
    assert (again.calibration_method, again.delta, again.threshold) == ("pac", 0.2, pac.threshold)
    # An artifact written before the pac calibration: no method, no delta -> marginal, delta None.
    cal_path = path / "calibration.json"
    cal = json.loads(cal_path.read_text())
    del cal["method"], cal["delta"]
    cal_path.write_text(json.dumps(cal))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: file_sha256(path / name) for name in manifest["files"]}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    old = load_detector(path)
    assert (old.calibration_method, old.delta) == ("marginal", None) and old.threshold == pac.threshold


def test_encoder_identity_is_recorded_and_rebuilt(tmp_path: Path) -> None:
    from dlsr.encoder import Encoder

    enc = Encoder.create("tf_efficientnet_lite0", weights="random", input_size=32)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, enc.dim)).astype(np.float32)
    det = DLSRDetector(enc, n_blocks=1, width=32, epochs=1, progress=False).fit(feats)
    path = det.save(tmp_path / "m")
    assert read_manifest(path)["encoder"] == enc.identity()
    loaded = load_detector(path, device="auto")
    assert loaded.encoder is not None and loaded.encoder.identity() == enc.identity()
    x = enc.preprocess([Image.new("RGB", (32, 32), (200, 10, 10))])
    np.testing.assert_array_equal(loaded.score_pixels(x), det.score_pixels(x))
    features_only = load_detector(path, rebuild_encoder=False)
    assert features_only.encoder is None and features_only.encoder_name == "tf_efficientnet_lite0"
    other = Encoder.create("tf_efficientnet_lite0", weights="random", input_size=64)
    with pytest.raises(ArtifactError, match="input_size"):
        load_detector(path, encoder=other)


def test_a_rebuilt_encoder_keeps_the_precision_the_model_was_fitted_in(tmp_path: Path) -> None:
    from dlsr.encoder import Encoder

    enc = Encoder.create("tf_efficientnet_lite0", weights="random", input_size=32, precision="bf16")
    feats = np.random.default_rng(0).normal(size=(64, enc.dim)).astype(np.float32)
    det = DLSRDetector(enc, n_blocks=1, width=32, epochs=1, progress=False).fit(feats)
    loaded = load_detector(det.save(tmp_path / "m"), device="cpu")
    assert loaded.encoder.precision == "bf16" and loaded.encoder.identity() == enc.identity()
    fp32 = Encoder.create("tf_efficientnet_lite0", weights="random", input_size=32)
    with pytest.raises(ArtifactError, match="precision"):
        load_detector(tmp_path / "m", encoder=fp32)


def test_a_loaded_detector_can_be_warm_started(detector: DLSRDetector, data, tmp_path: Path) -> None:
    loaded = load_detector(detector.save(tmp_path / "m"))
    before = {k: v.clone() for k, v in loaded.state_tensors().items()}
    loaded.fit(data[0][:200], warm_start=True, epochs=1)
    assert loaded.n_train == 600 and len(loaded.history) == 3 and not loaded.is_calibrated
    assert any(not torch.equal(before[k], v) for k, v in loaded.state_tensors().items())
    assert not any(p.requires_grad for p in loaded.model.parameters())  # the scoring copy stays frozen


def test_artifacts_find_the_class_through_the_registry(registered_toy, data, tmp_path: Path) -> None:
    det = registered_toy(scale=3.0, boundaries=BOUNDARIES, progress=False).fit(data[0][:200])
    det.calibrate(data[0][200:400], alpha=0.1)
    path = det.save(tmp_path / "toy")
    assert read_manifest(path)["kind"] == "toy"
    loaded = load_detector(path)
    assert type(loaded) is registered_toy and loaded.scale == 3.0 and loaded.threshold == det.threshold
    np.testing.assert_array_equal(loaded.score(data[1]), det.score(data[1]))


def test_an_unregistered_kind_is_refused_naming_the_known_ones(
    detector: DLSRDetector, tmp_path: Path
) -> None:
    path = detector.save(tmp_path / "m")
    m = json.loads((path / "manifest.json").read_text())
    m["kind"] = "toy"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ArtifactError, match=r"unknown detector kind 'toy'; this dlsr knows \['dlsr', 'knn', 'mahalanobis'\]"
    ):
        load_detector(path)
