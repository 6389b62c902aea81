"""DLSR: diffusion-based layer-wise semantic reconstruction for unsupervised OOD detection (pure core).

Public API: encoder and readers (images -> features), detectors (DLSR with its DLSRConfig, the kNN / Mahalanobis
baselines, the kind registry), conformal calibration, metrics, artifacts and the named errors.
"""

from dlsr.artifacts import artifact_digest, load_detector, save_detector
from dlsr.base import BaseDetector, Prediction, detector_class, detector_kinds, register_detector
from dlsr.baselines import KNNDetector, MahalanobisDetector
from dlsr.cache import FeatureCache
from dlsr.calibration import conformal_threshold, false_alarm_bound, min_calibration_size, p_values
from dlsr.detector import DLSRConfig, DLSRDetector
from dlsr.diffusion import SCHEDULES, GaussianDiffusion
from dlsr.encoder import Encoder
from dlsr.exceptions import (
    ArtifactError,
    CalibrationWarning,
    DLSRError,
    FeatureWidthError,
    NotCalibratedError,
    NotFittedError,
)
from dlsr.images import ImageDecodeError, decode_image
from dlsr.lfdn import LFDN
from dlsr.metrics import aupr_in, aupr_out, auroc, fpr_at_tpr, ood_metrics
from dlsr.readers import ImageItem, array_images, open_images
from dlsr.scores import SCORES

__all__ = [
    "LFDN",
    "SCHEDULES",
    "SCORES",
    "ArtifactError",
    "BaseDetector",
    "CalibrationWarning",
    "DLSRConfig",
    "DLSRDetector",
    "DLSRError",
    "Encoder",
    "FeatureCache",
    "FeatureWidthError",
    "GaussianDiffusion",
    "ImageDecodeError",
    "ImageItem",
    "KNNDetector",
    "MahalanobisDetector",
    "NotCalibratedError",
    "NotFittedError",
    "Prediction",
    "array_images",
    "artifact_digest",
    "aupr_in",
    "aupr_out",
    "auroc",
    "conformal_threshold",
    "decode_image",
    "detector_class",
    "detector_kinds",
    "false_alarm_bound",
    "fpr_at_tpr",
    "load_detector",
    "min_calibration_size",
    "ood_metrics",
    "open_images",
    "p_values",
    "register_detector",
    "save_detector",
]
