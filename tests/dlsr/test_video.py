"""The synthetic video generator: clip lengths, smooth motion, noise, the shift at its frame, determinism."""

import numpy as np
import pytest

from dlsr.video import VideoConfig, clip_lengths, make_video, render_clip


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth stills (a gradient plus a blob), so motion changes pixels a little, not completely.
    y, x = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for _ in range(n):
        c = rng.uniform(40, 200, size=3)
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)[..., None]
        out.append(c * (0.5 + 0.5 * x[..., None]) + 50 * blob)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def test_clip_lengths_cover_the_configured_range() -> None:
    n = clip_lengths(5000, np.random.default_rng(0))
    assert n.min() == 30 and n.max() == 300
    assert 150 < n.mean() < 180  # uniform on [30, 300]


def test_a_clip_changes_a_little_per_frame_and_stays_near_its_still() -> None:
    im = _images(1)[0]
    frames = render_clip(im, 120, np.random.default_rng(1))
    assert frames.shape == (120, 32, 32, 3) and frames.dtype == np.uint8
    step = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    to_still = np.abs(frames.astype(np.int16) - im).mean(axis=(1, 2, 3))
    other = np.abs(frames.astype(np.int16) - _images(2, seed=5)[1]).mean(axis=(1, 2, 3))
    assert step.max() < 6  # noise and a sliver of motion per frame
    assert step.min() > 0.5  # fresh sensor noise every frame: no two frames are equal
    assert to_still.max() < 15 < other.min()


def test_without_motion_or_noise_a_clip_is_its_still() -> None:
    im = _images(1)[0]
    still = VideoConfig(shift_px=0, zoom=0, brightness=0, noise=0)
    frames = render_clip(im, 5, np.random.default_rng(0), still)
    np.testing.assert_allclose(frames.astype(int), np.broadcast_to(im, frames.shape), atol=1)


def test_make_video_switches_to_the_shift_set_at_the_shift_frame() -> None:
    ids, ood = _images(8), 255 - _images(4, seed=3)
    v = make_video(ids, 2000, seed=3, shift_images=ood, shift_frame=1234)
    assert v.frames.shape == (2000, 32, 32, 3) and v.shift_frame == 1234
    assert not v.shifted[:1234].any() and v.shifted[1234:].all()
    assert v.clip[1233] != v.clip[1234]  # the clip in progress is cut at the shift
    lengths = np.bincount(v.clip)
    assert lengths.max() <= 300 and (lengths[1:-1] >= 30).sum() >= len(lengths) - 4  # cut clips may be short
    # Before the shift frames are near an ID still, after it near a shift still.
    near_id = [np.abs(v.frames[t].astype(int) - ids[v.image[t]]).mean() for t in (0, 1233)]
    near_ood = [np.abs(v.frames[t].astype(int) - ood[v.image[t]]).mean() for t in (1234, 1999)]
    assert max(near_id + near_ood) < 15


def test_make_video_is_deterministic_given_its_seed() -> None:
    ids = _images(6)
    a, b = make_video(ids, 400, seed=7), make_video(ids, 400, seed=7)
    c = make_video(ids, 400, seed=8)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert a.shift_frame == 400 and not a.shifted.any()


def test_bad_arguments_are_refused() -> None:
    ids = _images(2)
    with pytest.raises(ValueError, match="together"):
        make_video(ids, 10, shift_frame=5)
    with pytest.raises(ValueError, match="shift_frame"):
        make_video(ids, 10, shift_images=ids, shift_frame=11)
    with pytest.raises(ValueError, match="min_frames"):
        VideoConfig(min_frames=10, max_frames=5)
    with pytest.raises(ValueError, match="uint8"):
        render_clip(ids[0].astype(np.float32), 3, np.random.default_rng(0))
