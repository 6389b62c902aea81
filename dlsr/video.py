"""Synthetic "video": clips of correlated frames made from still images, with a shift switched on at a known frame.

A camera sends the same scene for seconds: consecutive frames differ by a little motion, zoom, exposure and sensor
noise, not by content. This module makes such streams from still images (numpy + Pillow only, deterministic given a
seed) so drift tests can be measured on correlated frames: each clip shows one image for 30 to 300 frames (length
drawn at random) under smooth random translation, zoom and brightness drift plus fresh Gaussian noise per frame.
`make_video` cuts an in-distribution clip sequence at `shift_frame` and continues with clips of other images (an
OOD set, or corrupted copies made with `dlsr.corruptions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class VideoConfig:
    """How clips move and look. Amplitudes are the largest excursion from the still image over a clip.

    Args:
        min_frames, max_frames: clip length range (inclusive), drawn uniformly.
        shift_px: translation amplitude, pixels of the source image.
        zoom: zoom amplitude, relative (0.05: between 1x and 1.05x).
        brightness: brightness drift amplitude, relative (0.05: factors 0.95..1.05).
        noise: sensor noise standard deviation, 0..255 units, fresh each frame.
        cycles: how many slow oscillations a parameter makes over one clip, at most (smoothness).
    """

    min_frames: int = 30
    max_frames: int = 300
    shift_px: float = 1.0
    zoom: float = 0.05
    brightness: float = 0.05
    noise: float = 2.0
    cycles: float = 1.5

    def __post_init__(self) -> None:
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        for name in ("shift_px", "zoom", "brightness", "noise", "cycles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 1 or self.brightness >= 1:
            raise ValueError("zoom and brightness are relative amplitudes below 1")


def clip_lengths(n: int, rng: np.random.Generator, config: VideoConfig = VideoConfig()) -> np.ndarray:
    """(n,) int64 clip lengths, uniform on [min_frames, max_frames]."""
    return rng.integers(config.min_frames, config.max_frames + 1, size=n)


def _smooth(n: int, rng: np.random.Generator, cycles: float) -> np.ndarray:
    """(n,) a smooth random curve in [-1, 1]: two slow sinusoids of random frequency and phase."""
    t = np.arange(n) / max(n, 1)
    out = np.zeros(n)
    for _ in range(2):
        f = rng.uniform(0.25, max(cycles, 0.25))
        out += np.sin(2 * np.pi * (f * t + rng.uniform()))
    return out / 2


def render_clip(
    image: np.ndarray, n_frames: int, rng: np.random.Generator, config: VideoConfig = VideoConfig()
) -> np.ndarray:
    """One still (H, W, 3) uint8 image -> (n_frames, H, W, 3) uint8 frames of a clip of it.

    Every frame is a zoom in by 1 + zoom x (1 + c_z(t)) / 2 about the centre shifted by shift_px x (c_x, c_y),
    times brightness 1 + brightness x c_b, plus N(0, noise^2), with c_* smooth curves in [-1, 1]. Borders come
    from a reflected margin, so no black edges move in.
    """
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"render_clip needs an (H, W, 3) uint8 image; got {a.dtype} {a.shape}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    h, w = a.shape[:2]
    pad = int(np.ceil(config.shift_px)) + 2
    padded = Image.fromarray(np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"))
    cx, cy = pad + w / 2.0, pad + h / 2.0
    dx = config.shift_px * _smooth(n_frames, rng, config.cycles)
    dy = config.shift_px * _smooth(n_frames, rng, config.cycles)
    scale = 1.0 + config.zoom * (1.0 + _smooth(n_frames, rng, config.cycles)) / 2.0
    gain = 1.0 + config.brightness * _smooth(n_frames, rng, config.cycles)
    out = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    for i in range(n_frames):
        # Output pixel (x, y) of the crop samples the padded image at centre + ((x, y) - half) / scale - shift.
        inv = 1.0 / scale[i]
        x0 = cx - (w / 2.0) * inv - dx[i]
        y0 = cy - (h / 2.0) * inv - dy[i]
        frame = padded.transform((w, h), Image.Transform.AFFINE, (inv, 0.0, x0, 0.0, inv, y0),
                                 resample=Image.Resampling.BILINEAR)
        x = np.asarray(frame, dtype=np.float32) * gain[i]
        if config.noise > 0:
            x = x + rng.normal(0.0, config.noise, size=x.shape)
        out[i] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Video:
    """A frame stream: frames (T, H, W, 3) uint8; clip (T,) clip number; image (T,) index of the still in its
    set; shifted (T,) True from `shift_frame` on (T when there is no shift)."""

    frames: np.ndarray
    clip: np.ndarray
    image: np.ndarray
    shifted: np.ndarray
    shift_frame: int


def make_video(
    images: np.ndarray,
    n_frames: int,
    *,
    seed: int = 0,
    shift_images: np.ndarray | None = None,
    shift_frame: int | None = None,
    config: VideoConfig = VideoConfig(),
) -> Video:
    """A stream of `n_frames` frames: clips of random `images` (N, H, W, 3) uint8, and from `shift_frame` on
    (the clip in progress is cut there) clips of random `shift_images` instead. Deterministic given `seed`."""
    imgs = np.asarray(images)
    if imgs.ndim != 4 or len(imgs) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, 3) array; got shape {imgs.shape}")
    if (shift_images is None) != (shift_frame is None):
        raise ValueError("pass shift_images and shift_frame together")
    shift_at = n_frames if shift_frame is None else int(shift_frame)
    if not 0 <= shift_at <= n_frames:
        raise ValueError(f"shift_frame must be in [0, {n_frames}], got {shift_frame}")
    if shift_images is not None and np.asarray(shift_images).shape[1:] != imgs.shape[1:]:
        raise ValueError(f"shift_images must be shaped like images {imgs.shape[1:]}")
    rng = np.random.default_rng(seed)
    frames = np.empty((n_frames, *imgs.shape[1:]), dtype=np.uint8)
    clip = np.empty(n_frames, dtype=np.int64)
    index = np.empty(n_frames, dtype=np.int64)
    t, k = 0, 0
    while t < n_frames:
        pool = imgs if t < shift_at else np.asarray(shift_images)
        end = shift_at if t < shift_at else n_frames  # a clip never straddles the shift
        n = min(int(clip_lengths(1, rng, config)[0]), end - t)
        j = int(rng.integers(len(pool)))
        frames[t : t + n] = render_clip(pool[j], n, rng, config)
        clip[t : t + n], index[t : t + n] = k, j
        t, k = t + n, k + 1
    shifted = np.arange(n_frames) >= shift_at
    return Video(frames, clip, index, shifted, shift_at)
