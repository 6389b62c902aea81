"""Named errors of the dlsr package; each message says what to do about it."""

from __future__ import annotations


class DLSRError(Exception):
    """Base class of every error raised on purpose by dlsr."""


class NotFittedError(DLSRError, RuntimeError):
    """The detector has no trained model yet: call fit() first (or load a saved one)."""


class NotCalibratedError(DLSRError, RuntimeError):
    """The detector has no threshold yet: call calibrate() first."""


class FeatureWidthError(DLSRError, ValueError):
    """The features do not have the width (or layer layout) the detector was built for."""


class ArtifactError(DLSRError):
    """A saved detector directory is missing a file, fails its checksum or has an unknown format."""


class CalibrationWarning(UserWarning):
    """The calibration set is too small for the requested alpha (the threshold is +inf)."""
