"""Fixtures shared by the dlsr tests."""

from __future__ import annotations

import pytest

import dlsr.base as base
from tests.dlsr._synthetic import ToyDetector


@pytest.fixture
def registered_toy(monkeypatch: pytest.MonkeyPatch) -> type[ToyDetector]:
    """ToyDetector filed under kind "toy" in a copy of the registry table; the test's end restores the table."""
    monkeypatch.setattr(base, "_DETECTORS", dict(base._DETECTORS))
    return base.register_detector(ToyDetector)
