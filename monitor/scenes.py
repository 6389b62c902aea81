"""Drift evidence that survives correlated frames: a frame counts only when it shows a new scene. Pure code.

The binomial drift test (`monitor.drift`) treats every image as independent evidence. A camera sends the same
scene for seconds, and the frames of one scene share their OOD flag, so a window of n frames holds far fewer
independent draws than n and the test raises falsely. Here each source's frames are cut into *evidence units*: a
frame opens a new unit when its encoder features are farther than `distance` (cosine) from the source's previous
frame, or when the open unit is older than `max_s` seconds (event time), so a frozen scene still speaks once in a
while and slow drift cannot hide in one endless unit. The unit carries its first frame's OOD flag; the drift test counts units, the windows
keep counting images too.

Why this mechanism (`dlsr bench drift`, docs/DESIGN.md section 6): per scene, 0 false raises per 100,000 frames of
synthetic video where per-frame counting gave 2.3, and the i.i.d. stream unchanged. Evidence counted per time block
drops most frames of an i.i.d. stream (slower raises) and still correlates whenever a scene outlasts a block; a
block-bootstrap calibrated CUSUM needs a stretch of clean stream per deployment to calibrate on. De-duplication needs
no calibration and the cut is wide: consecutive frames of one scene sit far below `distance`, different images far
above it (Lite0 at 64 px: at most 0.09 against at least 0.29). Its cost: look-alike new images (MNIST digits) merge
into few units, so such a shift raises later.

State: the previous frame's unit-norm feature vector and the open unit's start per source, least recently seen
sources dropped beyond `max_sources`. It lives in the replica that owns the source's partition; after a restart or
a rebalance the first frame of a source opens a unit (one extra unit, harmless).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class _Last:
    vector: np.ndarray  # (D,) float32, unit norm: the source's previous frame
    opened: float  # event time the open unit started


class SceneTracker:
    """Which frames open a new evidence unit, per source.

    Args:
        distance: a frame farther than this cosine distance from the source's previous frame is a new scene.
        max_s: a unit older than this (seconds of event time) is closed; the next frame opens a new one.
        max_sources: sources remembered at most (least recently seen forgotten first).
    """

    def __init__(self, distance: float = 0.15, max_s: float = 10.0, max_sources: int = 10_000) -> None:
        if not 0.0 <= distance <= 2.0:
            raise ValueError(f"distance is a cosine distance in [0, 2], got {distance}")
        if max_s <= 0:
            raise ValueError(f"max_s must be > 0, got {max_s}")
        if max_sources < 1:
            raise ValueError(f"max_sources must be >= 1, got {max_sources}")
        self.distance = float(distance)
        self.max_s = float(max_s)
        self.max_sources = int(max_sources)
        self._last: OrderedDict[str, _Last] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def new_units(self, sources: Sequence[str], ts: Sequence[float], features: np.ndarray) -> np.ndarray:
        """Frames in stream order -> (N,) bool, True where a frame opens a new evidence unit.

        Args:
            sources: (N,) source of each frame.
            ts: (N,) event time of each frame, seconds.
            features: (N, D) encoder features of the frames.
        """
        z = np.asarray(features, dtype=np.float32)
        if z.ndim != 2 or len(z) != len(sources) or len(ts) != len(sources):
            raise ValueError(f"need (N, D) features for N sources and times; got {z.shape}, {len(sources)}, {len(ts)}")
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        z = z / np.maximum(norms, 1e-12)
        out = np.ones(len(z), dtype=bool)
        for i, (source, t) in enumerate(zip(sources, ts, strict=True)):
            last = self._last.get(source)
            t = float(t)
            if last is not None:
                self._last.move_to_end(source)
                near = 1.0 - float(last.vector @ z[i]) <= self.distance
                if near and t - last.opened < self.max_s:
                    out[i] = False
                    last.vector = z[i]
                    continue
            self._last[source] = _Last(z[i].copy(), t)
            self._last.move_to_end(source)
            if len(self._last) > self.max_sources:
                self._last.popitem(last=False)
        return out

    def reset_state(self) -> None:
        """Forget every source (the next frame of each opens a unit)."""
        self._last.clear()
