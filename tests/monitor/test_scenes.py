"""Evidence units: near-identical consecutive frames of a source count once; new scenes, old scenes and other
sources count again; memory is bounded."""

import numpy as np
import pytest

from dlsr_monitor.monitor.scenes import SceneTracker


def _scene(rng: np.random.Generator, base: np.ndarray, n: int, jitter: float = 0.01) -> np.ndarray:
    return base + jitter * rng.normal(size=(n, base.size))


def test_a_scene_counts_once_and_a_cut_opens_a_new_unit() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=64), rng.normal(size=64)
    z = np.concatenate([_scene(rng, a, 30), _scene(rng, b, 20), _scene(rng, a, 10)])
    units = SceneTracker(distance=0.1, max_s=100).new_units(["cam"] * 60, np.arange(60) / 30, z)
    assert np.flatnonzero(units).tolist() == [0, 30, 50]


def test_a_still_scene_counts_again_after_max_s() -> None:
    z = np.ones((100, 8))
    units = SceneTracker(distance=0.1, max_s=1.0).new_units(["cam"] * 100, np.arange(100) / 30, z)
    assert np.flatnonzero(units).tolist() == [0, 30, 60, 90]  # a unit per second of event time


def test_sources_are_tracked_apart_and_across_batches() -> None:
    tracker = SceneTracker(distance=0.1, max_s=100)
    x, y = np.eye(4)[0], np.eye(4)[1]
    first = tracker.new_units(["a", "b", "a", "b"], [0, 0, 1, 1], np.stack([x, x, x, y]))
    assert first.tolist() == [True, True, False, True]  # b changed scene, a did not
    again = tracker.new_units(["a", "b"], [2, 2], np.stack([x, y]))
    assert again.tolist() == [False, False]  # the previous frame survives between batches


def test_slow_change_is_followed_frame_to_frame() -> None:
    # A slow pan: each frame is near its predecessor, so it stays one scene until max_s cuts it.
    angles = np.linspace(0, np.pi / 2, 90)
    z = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    units = SceneTracker(distance=0.01, max_s=2.0).new_units(["cam"] * 90, np.arange(90) / 30, z)
    assert np.flatnonzero(units).tolist() == [0, 60]


def test_memory_is_bounded_and_a_forgotten_source_opens_a_unit() -> None:
    tracker = SceneTracker(distance=0.1, max_s=100, max_sources=2)
    z = np.ones((1, 4))
    for s in ("a", "b", "c"):
        tracker.new_units([s], [0.0], z)
    assert len(tracker) == 2
    assert tracker.new_units(["a"], [1.0], z).tolist() == [True]  # "a" was the least recent: forgotten
    assert tracker.new_units(["c"], [1.0], z).tolist() == [False]
    tracker.reset_state()
    assert len(tracker) == 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="cosine"):
        SceneTracker(distance=3)
    with pytest.raises(ValueError, match="max_s"):
        SceneTracker(max_s=0)
    with pytest.raises(ValueError, match="features"):
        SceneTracker().new_units(["a", "b"], [0, 1], np.ones((3, 4)))
