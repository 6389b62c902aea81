"""Model checks on real (tiny, feature-only) detectors: what may go live and what must not."""

import math

import numpy as np
import pytest
import torch

from dlsr.baselines import MahalanobisDetector
from dlsr_monitor.common.model_checks import (
    ModelRefusedError,
    detector_problems,
    entry_problems,
    load_checked,
)
from dlsr_monitor.common.registry import ModelEntry


def _fitted(seed: int = 0) -> MahalanobisDetector:
    rng = np.random.default_rng(seed)
    det = MahalanobisDetector(progress=False).fit(rng.standard_normal((200, 8)).astype(np.float32))
    return det.calibrate(rng.standard_normal((100, 8)).astype(np.float32), alpha=0.05)


def _entry(**over) -> ModelEntry:
    base = dict(version="v3", uri="file:///x", sha256="a" * 64, threshold=1.5, alpha=0.05)
    return ModelEntry(**{**base, **over})


def test_a_good_entry_and_detector_pass(tmp_path):
    det = _fitted()
    assert entry_problems(_entry()) == [] and detector_problems(det) == []
    assert load_checked(det.save(tmp_path / "ok")).dim == 8


@pytest.mark.parametrize(
    "over, phrase",
    [({"alpha": 1.5}, "alpha"), ({"alpha": 0.0}, "alpha"), ({"threshold": math.nan}, "threshold"),
     ({"version": "latest"}, "version"), ({"sha256": "zz"}, "sha256")],
)
def test_impossible_entries_are_refused(over, phrase):
    problems = entry_problems(_entry(**over))
    assert len(problems) == 1 and phrase in problems[0]


def test_nan_weights_are_refused_on_load(tmp_path):
    det = _fitted()
    for tensor in det.state_tensors().values():
        if tensor.is_floating_point() and tensor.numel() > 1:
            tensor.view(-1)[0] = torch.nan  # the artifact's manifest stays consistent: sha256 of NaN weights
            break
    path = det.save(tmp_path / "nan")
    with pytest.raises(ModelRefusedError) as err:
        load_checked(path)
    assert any("not finite" in p for p in err.value.problems)


def test_nan_calibration_is_refused():
    det = _fitted()
    det.calibration_scores = np.array([0.1, np.nan, 0.3])
    assert "calibration scores are not finite" in detector_problems(det)


def test_weights_swapped_after_calibration_are_caught_by_the_reference_sample():
    det = _fitted()
    ref = np.random.default_rng(5).standard_normal((32, 8)).astype(np.float32)
    det.reference_features, det.reference_scores = ref, det.score(ref)
    assert detector_problems(det) == []
    other = _fitted(seed=9)  # finite, plausible, but not the weights that were calibrated
    other.reference_features, other.reference_scores = ref, det.reference_scores
    assert any("reference sample" in p for p in detector_problems(other))


def test_calibrate_stores_the_reference_sample_and_a_weight_swap_in_the_artifact_is_refused(tmp_path):
    import json
    import shutil

    from dlsr.artifacts import file_sha256

    det = _fitted()
    assert det.reference_features.shape == (64, 8) and det.reference_scores.shape == (64,)
    path = det.save(tmp_path / "ok")
    assert load_checked(path).reference_features.shape == (64, 8)  # saved, loaded, and it passes
    shutil.copy(_fitted(seed=9).save(tmp_path / "other") / "weights.safetensors", path / "weights.safetensors")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = file_sha256(path / "weights.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))  # checksums consistent: only the numbers changed
    with pytest.raises(ModelRefusedError) as err:
        load_checked(path)
    assert any("reference sample" in p for p in err.value.problems)
