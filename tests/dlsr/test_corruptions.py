"""Corruptions: deterministic given the seed, in range, stronger with severity, named errors."""

from __future__ import annotations

import numpy as np
import pytest

from dlsr.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupt_batch


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(40, 216, (4, 32, 32, 3), dtype=np.uint8)
    base[:, :16] = 200  # some structure, so blur and pixelation change something
    return base


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_deterministic_in_range_and_monotone(name, images):
    dists = []
    for sev in SEVERITIES:
        a = corrupt_batch(images, name, sev, seed=3)
        b = corrupt_batch(images, name, sev, seed=3)
        assert a.dtype == np.uint8 and a.shape == images.shape
        np.testing.assert_array_equal(a, b)
        # batch independence: image 2 alone gets the same corruption as inside the batch
        np.testing.assert_array_equal(corrupt_batch(images, name, sev, seed=3)[2], a[2])
        dists.append(float(np.abs(a.astype(float) - images.astype(float)).mean()))
    assert dists[-1] > 0.2, f"{name} severity 5 barely changes the image"
    assert dists[-1] >= dists[0] - 0.5, f"{name}: severity 5 should change more than severity 1"


def test_random_corruptions_depend_on_seed(images):
    a = corrupt_batch(images, "gaussian_noise", 3, seed=0)
    b = corrupt_batch(images, "gaussian_noise", 3, seed=1)
    assert not np.array_equal(a, b)


def test_bad_arguments():
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(img, "fog", 1, rng=rng)
    with pytest.raises(ValueError, match="severity"):
        corrupt(img, "jpeg", 6, rng=rng)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(img.astype(np.float32), "jpeg", 1, rng=rng)
