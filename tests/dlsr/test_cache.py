"""FeatureCache: only missing images are encoded, rows come back in input order, corrupt items reported by name."""

from __future__ import annotations

import numpy as np
import pytest

from dlsr.cache import FeatureCache
from dlsr.encoder import Encoder
from dlsr.readers import ImageItem, array_images


class CountingEncoder:
    """Wraps an Encoder and counts the images it encodes."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.calls = 0
        self.images = 0

    def identity(self) -> dict:
        return self.inner.identity()

    def encode(self, images, *, batch_size=64, progress=False):
        self.calls += 1
        self.images += len(images)
        return self.inner.encode(images, batch_size=batch_size)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.create("test_efficientnet", weights="random", input_size=32)


def test_cache_hit_avoids_reencoding(tmp_path, encoder):
    arr = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    enc = CountingEncoder(encoder)
    cache = FeatureCache(tmp_path, shard_size=4)
    first = cache.extract(enc, array_images(arr[:6]), batch_size=3, progress=False)
    assert enc.images == 6 and first.n_encoded == 6 and first.features.shape == (6, encoder.dim)
    again = cache.extract(enc, array_images(arr[:6]), progress=False)
    assert enc.images == 6 and again.n_encoded == 0
    np.testing.assert_array_equal(first.features, again.features)
    # A later request with 4 new images encodes exactly those 4; rows follow the input order.
    order = [9, 0, 7, 3, 8, 6]
    mixed = cache.extract(enc, array_images(arr[order], names=[str(i) for i in order]), progress=False)
    assert enc.images == 10 and mixed.names == [str(i) for i in order]
    np.testing.assert_allclose(mixed.features[1], first.features[0], atol=1e-6)
    np.testing.assert_allclose(mixed.features[3], first.features[3], atol=1e-6)
    np.testing.assert_allclose(mixed.features, encoder.encode([_pil(a) for a in arr[order]]), atol=1e-4)
    # A fresh cache object on the same folder reads the shards written before.
    assert FeatureCache(tmp_path).extract(enc, array_images(arr), progress=False).n_encoded == 0


def test_corrupt_items_skipped_and_named(tmp_path, encoder):
    good = list(
        array_images(
            np.zeros((2, 32, 32, 3), dtype=np.uint8) + np.arange(2)[:, None, None, None].astype(np.uint8)
        )
    )
    items = [good[0], ImageItem("bad.jpg", b"\xff\xd8 broken"), good[1], ImageItem("empty.png", b"")]
    res = FeatureCache(tmp_path).extract(encoder, items, progress=False)
    assert res.names == [good[0].name, good[1].name] and res.features.shape == (2, encoder.dim)
    assert {(f.name, f.reason) for f in res.failures} == {("bad.jpg", "not_an_image"), ("empty.png", "empty")}
    assert FeatureCache(tmp_path).features(encoder, items, progress=False).shape == (2, encoder.dim)


def test_identity_separates_configurations(tmp_path, encoder):
    other = Encoder.create("test_efficientnet", weights="random", input_size=48)
    cache = FeatureCache(tmp_path)
    assert cache.directory(encoder) != cache.directory(other)


def _pil(a):
    from PIL import Image

    return Image.fromarray(a)
