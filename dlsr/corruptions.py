"""Image corruptions made by code (data-quality faults), severities 1..5, deterministic given a seed.

Severity constants follow the spirit of CIFAR-10-C (Hendrycks and Dietterich, 2019) for 32x32 images; they are
re-implemented here with numpy and Pillow only. Every function maps an (H, W, 3) uint8 array to a new one.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

SEVERITIES = (1, 2, 3, 4, 5)

_NOISE_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)  # fraction of the 0..255 range (CIFAR-10-C)
_BLUR_RADIUS = (0.4, 0.6, 0.7, 0.8, 1.0)  # Gaussian sigma in pixels (CIFAR-10-C)
_JPEG_QUALITY = (80, 65, 58, 50, 40)  # (CIFAR-10-C)
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to every channel, fraction of 255
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # deviations from the mean are scaled by this (CIFAR-10-C)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # down-scale factor before scaling back up (CIFAR-10-C)
_OCCLUSION = (0.1, 0.2, 0.3, 0.4, 0.5)  # side of a grey square, fraction of the shorter image side


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gaussian_noise(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise."""
    sigma = _NOISE_SIGMA[severity - 1] * 255.0
    return _clip(img.astype(np.float64) + rng.normal(0.0, sigma, size=img.shape))


def gaussian_blur(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (an out-of-focus camera)."""
    radius = _BLUR_RADIUS[severity - 1]
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)


def jpeg(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG re-compression at lower quality."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=_JPEG_QUALITY[severity - 1])
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


def brightness(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Over-exposure: a constant added to every pixel."""
    return _clip(img.astype(np.float64) + _BRIGHTNESS[severity - 1] * 255.0)


def contrast(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Washed-out image: deviations from the image mean shrink."""
    x = img.astype(np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _clip((x - mean) * _CONTRAST[severity - 1] + mean)


def pixelate(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Down-sample with a box filter and scale back up (a low-resolution source)."""
    h, w = img.shape[:2]
    c = _PIXELATE[severity - 1]
    small = Image.fromarray(img).resize((max(1, int(w * c)), max(1, int(h * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX), dtype=np.uint8)


def occlusion(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A mid-grey square at a random position (a sticker, a finger on the lens)."""
    h, w = img.shape[:2]
    side = max(1, round(_OCCLUSION[severity - 1] * min(h, w)))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    out = img.copy()
    out[top : top + side, left : left + side] = 128
    return out


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "jpeg": jpeg,
    "brightness": brightness,
    "contrast": contrast,
    "pixelate": pixelate,
    "occlusion": occlusion,
}


def corrupt(img: np.ndarray, name: str, severity: int, *, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to one (H, W, 3) uint8 image."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}; got {severity}")
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"corrupt needs an (H, W, 3) uint8 image; got {a.dtype} {a.shape}")
    return CORRUPTIONS[name](a, severity, rng)


def corrupt_batch(images: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """Corrupt (N, H, W, 3) uint8 images; image i uses its own generator seeded by (seed, i).

    Per-image generators make the result independent of batching: the i-th image gets the same corruption
    whether it is corrupted alone or among others.
    """
    a = np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"corrupt_batch needs (N, H, W, 3) uint8 images; got shape {a.shape}")
    out = np.empty_like(a)
    for i in range(len(a)):
        rng = np.random.default_rng([seed, severity, i])
        out[i] = corrupt(a[i], name, severity, rng=rng)
    return out
