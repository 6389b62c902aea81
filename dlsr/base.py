"""The detector interface shared by DLSR and the baselines: build -> fit -> score -> calibrate -> predict -> save.

Shaped like alibi-detect's detectors. `BaseDetector` holds everything that does not depend on the model (inputs,
encoder, batching, conformal calibration, predictions); subclasses implement the model. The registry maps each
detector kind (the name in manifests and settings) to its class, like timm's `register_model`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict, TypeVar

import numpy as np
import torch
from torch import Tensor

from dlsr.calibration import (
    DEFAULT_DELTA,
    check_alpha,
    check_delta,
    check_method,
    conformal_threshold,
    p_values,
)
from dlsr.devices import resolve_device
from dlsr.evidence import stage_p_values as _stage_p_values
from dlsr.exceptions import (
    CalibrationWarning,
    DLSRError,
    FeatureWidthError,
    NotCalibratedError,
    NotFittedError,
)

if TYPE_CHECKING:  # the encoder is only ever passed in; importing it here would load timm for baseline users
    from dlsr.encoder import Encoder


def check_boundaries(boundaries: Sequence[int] | None, dim: int | None = None) -> tuple[int, ...] | None:
    """Validate cumulative layer boundaries (0, b1, ..., D): start at 0, strictly increasing, end at dim."""
    if boundaries is None:
        return None
    b = tuple(int(x) for x in boundaries)
    if len(b) < 2 or b[0] != 0 or any(y <= x for x, y in zip(b[:-1], b[1:], strict=True)):
        raise ValueError(
            f"boundaries must be cumulative offsets (0, b1, ..., D), strictly increasing; got {b}"
        )
    if dim is not None and b[-1] != dim:
        raise FeatureWidthError(f"boundaries {b} end at {b[-1]} but the features have D={dim} dims")
    return b


def segments(boundaries: Sequence[int]) -> list[tuple[int, int]]:
    """Cumulative boundaries (0, b1, ..., D) -> the (start, stop) column range of each stage."""
    return [(int(a), int(b)) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]


#: Calibration rows kept (with their main scores) as the reference sample the model checks re-score.
REFERENCE_ROWS = 64


def pad_rows(x: Tensor, min_rows: int) -> Tensor:
    """Zero-pad a batch to at least `min_rows` rows.

    BLAS switches to other kernels (gemv, small-M paths) for a handful of rows, whose float32 rounding differs
    from the blocked kernel's; padding tiny batches keeps every row's arithmetic, hence its score, identical
    whatever the batch size. Slice the result back to the original rows.
    """
    n = x.shape[0]
    if n >= min_rows:
        return x
    return torch.cat([x, x.new_zeros((min_rows - n, *x.shape[1:]))])


@dataclass
class Prediction:
    """What `predict` returns: one entry per input, plus the threshold in force."""

    score: np.ndarray  # (N,) float64, higher = more OOD
    threshold: float
    p_value: np.ndarray  # (N,) conformal p-values
    is_ood: np.ndarray  # (N,) bool, score > threshold


def _is_pil(obj: Any) -> bool:
    return hasattr(obj, "getbands") and hasattr(obj, "size")


class BaseOptions(TypedDict, total=False):
    """The keyword options every detector takes besides its own hyperparameters (see `BaseDetector`).

    Subclasses take them as `**base: Unpack[BaseOptions]` and pass them on, so they are spelled out once.
    """

    device: str | torch.device
    boundaries: Sequence[int] | None
    score_batch_size: int | None
    encode_batch_size: int
    progress: bool


class BaseDetector:
    """Shared fit / score / calibrate / predict / save logic; subclasses implement the model.

    Subclasses set `kind` and implement `_fit_tensor`, `_score_tensor`, `hyperparameters`, `state_tensors` and
    `_load_state`; those with per-stage scores also `_score_tensor_stages` and `has_stage_scores`. State: `dim`,
    `boundaries`, `encoder_identity`, `n_train`, `alpha`, `calibration_method`, `delta`, `threshold`,
    `calibration_scores` and, from a
    calibration on features or images, `stage_calibration_scores` (n, S) and the reference sample
    (`reference_features`, `reference_scores`: the first `REFERENCE_ROWS` calibration rows and their scores):
    everything needed to save and restore the detector exactly. An artifact saved before the per-stage
    calibration existed loads with those three None.

    Args:
        encoder: frozen feature encoder (optional: features-only use).
        device: "cpu", "cuda", "cuda:1" or "auto" (see `dlsr.devices.resolve_device`).
        boundaries: cumulative layer offsets (0, ..., D) when fitting on features without an encoder.
        score_batch_size: scoring batch (default: the class's `default_score_batch_size`).
        encode_batch_size, progress: encoder batch and progress bars.
    """

    kind: ClassVar[str] = "base"
    default_score_batch_size: ClassVar[int] = 1024

    def __init__(
        self,
        encoder: Encoder | None = None,
        *,
        device: str | torch.device = "cpu",
        boundaries: Sequence[int] | None = None,
        score_batch_size: int | None = None,
        encode_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        if score_batch_size is None:
            score_batch_size = self.default_score_batch_size
        if score_batch_size < 1 or encode_batch_size < 1:
            raise ValueError(
                f"batch sizes must be >= 1; got score_batch_size={score_batch_size}, "
                f"encode_batch_size={encode_batch_size}"
            )
        self.device = resolve_device(device)
        self.encoder = encoder
        self.score_batch_size = int(score_batch_size)
        self.encode_batch_size = int(encode_batch_size)
        self.progress = bool(progress)
        self.dim: int | None = None
        self.boundaries: tuple[int, ...] | None = check_boundaries(boundaries)
        self._auto_boundaries = False  # True when fit() chose (0, D) because no layout was given
        self.failures: list[tuple[str, str]] = []  # (name, reason) of images the last call could not decode
        self.encoder_identity: dict | None = None
        self.encoder_name: str | None = None
        self.n_train: int = 0
        self.alpha: float | None = None
        self.calibration_method: str | None = None  # "marginal" | "pac": which guarantee the threshold gives
        self.delta: float | None = None  # pac: chance that this calibration set's false-alarm rate exceeds alpha
        self.threshold: float | None = None
        self.calibration_scores: np.ndarray | None = None
        self.stage_calibration_scores: np.ndarray | None = None  # (n, S), same calibration split
        self.reference_features: np.ndarray | None = None  # (m, D) float32, the first calibration rows
        self.reference_scores: np.ndarray | None = None  # (m,) float64, their scores at calibration time
        if encoder is not None:
            self._adopt_encoder(encoder)

    # -- state -------------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        raise NotImplementedError

    @property
    def is_calibrated(self) -> bool:
        return self.threshold is not None and self.calibration_scores is not None

    @property
    def has_stage_scores(self) -> bool:
        """Whether this model gives per-stage scores (`score_stages`); False for a kind without them."""
        return False

    @property
    def n_stages(self) -> int | None:
        """S, the number of encoder stages in the feature layout (None before the layout is known)."""
        return None if self.boundaries is None else len(self.boundaries) - 1

    def _drop_calibration(self) -> None:
        self.alpha = self.threshold = self.calibration_scores = None
        self.calibration_method = self.delta = None
        self.stage_calibration_scores = self.reference_features = self.reference_scores = None

    def _adopt_encoder(self, encoder: Encoder) -> None:
        """Take the feature layout from the encoder; it must agree with what the detector already knows."""
        enc_b = tuple(int(b) for b in encoder.boundaries)
        if self.boundaries is not None and self.boundaries != enc_b:
            raise FeatureWidthError(
                f"boundaries {self.boundaries} do not match encoder {encoder.name}'s {enc_b}; omit boundaries"
            )
        if self.dim is not None and self.dim != int(encoder.dim):
            raise FeatureWidthError(
                f"encoder {encoder.name} gives D={encoder.dim} features but the detector was fitted on "
                f"D={self.dim} features from {self._source()}; use that encoder or refit"
            )
        self.boundaries = enc_b
        self.encoder = encoder
        self.encoder_name = str(encoder.name)
        identity = getattr(encoder, "identity", None)
        self.encoder_identity = identity() if callable(identity) else None

    def _source(self) -> str:
        return f"encoder {self.encoder_name}" if self.encoder_name else "an unnamed feature source"

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call fit() first (or load_detector())"
            )

    # -- inputs ------------------------------------------------------------------------------------------

    def _check_features(self, x: np.ndarray | Tensor, *, fitting: bool) -> Tensor:
        """(N, D) array -> float32 tensor on the device, with the width checked up front."""
        t = (
            x
            if isinstance(x, Tensor)
            else torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32)))
        )
        if t.ndim != 2:
            raise FeatureWidthError(f"features must be a 2-D (N, D) array; got shape {tuple(t.shape)}")
        d = int(t.shape[1])
        expected = (
            self.dim
            if self.dim is not None
            else (int(self.encoder.dim) if self.encoder is not None else None)
        )
        if expected is not None and d != expected and not (fitting and self.encoder is None):
            raise FeatureWidthError(
                f"got D'={d} features, but the detector was fitted on D={expected} features from "
                f"{self._source()}; pass features from that encoder (or refit)"
            )
        if self.boundaries is not None and self.boundaries[-1] != d:
            raise FeatureWidthError(
                f"got D'={d} features, but the layer boundaries {self.boundaries} describe D={self.boundaries[-1]}"
                f" features from {self._source()}; pass matching boundaries or features"
            )
        return t.to(device=self.device, dtype=torch.float32)

    def _encode_images(self, images: Iterable[Any], progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images (PIL images, or items with `.data` bytes such as an ImageSet) -> (N, D) features.

        Returns:
            (features, failed): an undecodable item is not fatal: its row is NaN, `failed` marks it and
            `self.failures` lists (name, reason) for each one.
        """
        if self.encoder is None:
            raise ValueError(
                f"{type(self).__name__} has no encoder: pass encoder= when building it, or features"
            )
        from dlsr.images import ImageDecodeError, decode_image

        dim = int(self.encoder.dim)
        chunks: list[np.ndarray] = []
        batch: list[Any] = []
        failed: list[bool] = []
        self.failures = []

        def flush() -> None:
            if batch:
                chunks.append(self.encoder.encode(batch, batch_size=self.encode_batch_size, progress=False))
                batch.clear()

        it: Iterable[Any] = images
        if progress:
            from tqdm.auto import tqdm

            total = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
            it = tqdm(images, total=total, desc=f"encode {self.encoder.name}", unit="img")
        for i, item in enumerate(it):
            if _is_pil(item):
                batch.append(item)
            elif hasattr(item, "data"):
                try:
                    batch.append(decode_image(item.data))
                except ImageDecodeError as exc:
                    self.failures.append((str(getattr(item, "name", i)), exc.reason))
                    failed.append(True)
                    continue
            else:
                raise TypeError(
                    f"images must be PIL images or items with .data bytes; got {type(item).__name__}"
                )
            failed.append(False)
            if len(batch) >= self.encode_batch_size * 4:
                flush()
        flush()
        mask = np.asarray(failed, dtype=bool)
        out = np.full((mask.size, dim), np.nan, dtype=np.float32)
        if chunks:
            out[~mask] = np.concatenate(chunks, axis=0)
        return out, mask

    def _inputs(self, features: Any, images: Any, progress: bool, *, fitting: bool) -> Tensor:
        if (features is None) == (images is None):
            raise ValueError("pass exactly one of features (an (N, D) array) or images=")
        if images is not None:
            features, failed = self._encode_images(images, progress)
            if fitting:  # train on what decoded; `self.failures` names the rest
                features = features[~failed]
        return self._check_features(features, fitting=fitting)

    # -- the public API ----------------------------------------------------------------------------------

    def fit(
        self,
        features: np.ndarray | None = None,
        *,
        images: Any = None,
        progress: bool | None = None,
        **kwargs: Any,
    ) -> BaseDetector:
        """Fit on in-distribution data: (N, D) features, or images through the encoder.

        Returns:
            self, fitted (any previous calibration is dropped: it belonged to the old model).
        """
        progress = self.progress if progress is None else progress
        if self._auto_boundaries and not kwargs.get("warm_start"):
            self.boundaries = None  # a fresh fit on features without a layout may change the width
        x = self._inputs(features, images, progress, fitting=True)
        if x.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 samples; got {x.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("fit features contain NaN or infinite values; check the encoder and the images")
        self._fit_tensor(x, progress=progress, **kwargs)
        self.dim = int(x.shape[1])
        if self.boundaries is None:
            self.boundaries, self._auto_boundaries = (0, self.dim), True
        self.n_train = int(x.shape[0]) + (self.n_train if kwargs.get("warm_start") else 0)
        self._drop_calibration()
        return self

    def score(
        self,
        features: np.ndarray | None = None,
        *,
        images: Any = None,
        batch_size: int | None = None,
        progress: bool = False,
        **options: Any,
    ) -> np.ndarray:
        """OOD scores, higher = more OOD; every input is scored (no batch is dropped).

        Args:
            features: (N, D) features (or pass images= to go through the encoder).
            batch_size: scoring batch (default `score_batch_size`); the result does not depend on it.
            options: scorer-specific overrides (e.g. score=, t=, ddim_steps= for DLSR).

        Returns:
            (N,) float64 scores.
        """
        self._require_fitted()
        x = self._inputs(features, images, progress, fitting=False)
        return self._score_batches(x, batch_size, progress, stages=False, **options)[0]

    def score_stages(
        self,
        features: np.ndarray | None = None,
        *,
        images: Any = None,
        batch_size: int | None = None,
        progress: bool = False,
        **options: Any,
    ) -> np.ndarray:
        """Per-stage scores, higher = more unusual in that stage (docs/METHOD.md sections 3 and 6).

        DLSR: the reconstruction error within each layer (1 - cosine for the MFsim scores, the mean squared
        error for MSE) from the same reconstruction as the main score; Mahalanobis: the squared distance to a
        Gaussian fitted per stage; kNN: the cosine distance to the k-th neighbour within the stage's dims.
        As batch-size independent and deterministic as `score`.

        Returns:
            (N, S) float64, stage 1 (the earliest, low-level) first.
        """
        self._require_fitted()
        self._require_stages()
        x = self._inputs(features, images, progress, fitting=False)
        stages = self._score_batches(x, batch_size, progress, stages=True, **options)[1]
        assert stages is not None
        return stages

    def _require_stages(self) -> None:
        if not self.has_stage_scores:
            raise DLSRError(
                f"{type(self).__name__} gives no per-stage scores (a kind without them, or an artifact saved "
                "before they existed: refit it)"
            )

    def _score_batches(
        self, x: Tensor, batch_size: int | None, progress: bool, *, stages: bool, **options: Any
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Main (N,) and, when `stages`, per-stage (N, S) scores of features on the device, batch by batch."""
        bs = int(batch_size or self.score_batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1; got {bs}")
        out = np.empty(x.shape[0], dtype=np.float64)
        out_stages = np.empty((x.shape[0], self.n_stages or 1), dtype=np.float64) if stages else None
        starts: Iterable[int] = range(0, x.shape[0], bs)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"score {self.kind}", unit="batch")
        for i in starts:
            if out_stages is None:
                out[i : i + bs] = self._score_tensor(x[i : i + bs], **options).double().cpu().numpy()
            else:
                main, per_stage = self._score_tensor_stages(x[i : i + bs], **options)
                out[i : i + bs] = main.double().cpu().numpy()
                out_stages[i : i + bs] = per_stage.double().cpu().numpy()
        return out, out_stages

    def score_pixels(
        self, x: Tensor, *, stages: bool = False, features: bool = False, **options: Any
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray | None] | tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Preprocessed pixels (N, 3, S, S) from `encoder.preprocess` -> (N,) float64 scores (one batch).

        With `stages=True`: (scores, stage_scores) from one encoder pass (and, for DLSR, one reconstruction):
        stage_scores is (N, S) float64 as `score_stages` gives, or None when the model has no per-stage scores.
        With `features=True`: (scores, stage_scores or None, features) where features is the (N, D) float32
        encoder output the scores came from (the same pass; stage_scores is None unless `stages=True`).
        """
        self._require_fitted()
        if self.encoder is None:
            raise ValueError(
                f"{type(self).__name__} has no encoder: pass encoder= (or load_detector(encoder=))"
            )
        z = self._check_features(self.encoder.encode_pixels(x), fitting=False)
        per_stage_np: np.ndarray | None = None
        if stages and self.has_stage_scores:
            main, per_stage = self._score_tensor_stages(z, **options)
            per_stage_np = per_stage.double().cpu().numpy()
        else:
            main = self._score_tensor(z, **options)
        scores = main.double().cpu().numpy()
        if features:
            return scores, per_stage_np, z.float().cpu().numpy()
        return (scores, per_stage_np) if stages else scores

    def stage_p_values(self, stage_scores: np.ndarray) -> np.ndarray | None:
        """(N, S) conformal p-values of per-stage scores against `stage_calibration_scores`, column by column;
        None when the detector has no per-stage calibration (e.g. an older artifact)."""
        if self.stage_calibration_scores is None:
            return None
        return _stage_p_values(self.stage_calibration_scores, stage_scores)

    def calibrate(
        self,
        features: np.ndarray | None = None,
        *,
        images: Any = None,
        scores: np.ndarray | None = None,
        alpha: float = 0.01,
        method: str = "marginal",
        delta: float = DEFAULT_DELTA,
    ) -> BaseDetector:
        """Set the conformal threshold from held-out in-distribution data (never the training data).

        From features or images (not from `scores=`) it also keeps, from the same calibration rows, the
        per-stage scores (`stage_calibration_scores`, when the model has them) for `stage_p_values`, and the
        reference sample for the model checks: the first `REFERENCE_ROWS` rows and their scores.

        Args:
            features / images / scores: the held-out ID set, or its precomputed scores.
            alpha: target false-alarm rate in (0, 1).
            method: "marginal" (false alarms <= alpha on average over calibration sets) or "pac" (<= alpha for
                this calibration set with probability >= 1 - delta); see `dlsr.calibration`.
            delta: the pac method's allowed chance of a calibration set that misses alpha.
        """
        alpha, method, delta = check_alpha(alpha), check_method(method), check_delta(delta)
        stage_cal = x_cal = None
        if scores is None:
            self._require_fitted()
            x = self._inputs(features, images, False, fitting=False)
            scores, stage_cal = self._score_batches(x, None, False, stages=self.has_stage_scores)
            x_cal = x
        elif features is not None or images is not None:
            raise ValueError("pass scores= or features/images to calibrate, not both")
        cal = np.asarray(scores, dtype=np.float64).reshape(-1)
        rows = np.arange(cal.size)
        if images is not None and self.failures and int(np.isnan(cal).sum()) == len(self.failures):
            rows = np.flatnonzero(~np.isnan(cal))  # the undecodable images (named in self.failures)
            cal = cal[rows]
        threshold = conformal_threshold(cal, alpha, method=method, delta=delta)  # validates: non-empty, finite
        self._drop_calibration()
        self.calibration_scores, self.alpha, self.threshold = cal, alpha, threshold
        self.calibration_method, self.delta = method, delta
        if stage_cal is not None:
            stage_cal = stage_cal[rows]
            if np.isfinite(stage_cal).all():
                self.stage_calibration_scores = stage_cal
            else:
                warnings.warn(
                    f"{int((~np.isfinite(stage_cal)).any(axis=1).sum())} calibration rows have non-finite "
                    "per-stage scores: the detector keeps no per-stage calibration (no stage p-values)",
                    CalibrationWarning,
                    stacklevel=2,
                )
        if x_cal is not None:
            ref = rows[:REFERENCE_ROWS]
            ref_x = x_cal[torch.from_numpy(ref).to(x_cal.device)].cpu().numpy().astype(np.float32)
            if np.isfinite(ref_x).all():
                self.reference_features, self.reference_scores = ref_x, cal[: ref.size].copy()
        return self

    def predict(
        self, features: np.ndarray | None = None, *, images: Any = None, scores: np.ndarray | None = None
    ) -> Prediction:
        """Scores, threshold, p-values and OOD flags (score > threshold) together."""
        if not self.is_calibrated:
            raise NotCalibratedError(f"{type(self).__name__} has no threshold: call calibrate() first")
        s = self.score(features, images=images) if scores is None else np.asarray(scores, dtype=np.float64)
        assert self.threshold is not None and self.calibration_scores is not None
        return Prediction(
            score=s,
            threshold=float(self.threshold),
            p_value=p_values(self.calibration_scores, s),
            is_ood=(s > self.threshold) | np.isnan(s),
        )

    def save(self, path: str | Path, *, metrics: dict | None = None) -> Path:
        """Write the detector atomically to directory `path` (`dlsr.artifacts.save_detector`); returns the path."""
        if _saver is None:  # unreachable after `import dlsr`, whose __init__ imports dlsr.artifacts
            raise RuntimeError("no artifact writer is registered: import dlsr.artifacts first")
        return _saver(self, path, metrics=metrics)

    # -- subclass hooks ----------------------------------------------------------------------------------

    def _fit_tensor(self, x: Tensor, *, progress: bool, **kwargs: Any) -> None:
        raise NotImplementedError

    def _score_tensor(self, x: Tensor, **options: Any) -> Tensor:
        raise NotImplementedError

    def _score_tensor_stages(self, x: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        """(N,) main scores and (N, S) per-stage scores of one batch, from one pass (kinds with stage scores)."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """JSON-able constructor arguments (without encoder, device, boundaries, progress) that rebuild this detector.

        Here the saved base options; subclasses put their own hyperparameters in front of these.
        """
        return {"score_batch_size": self.score_batch_size, "encode_batch_size": self.encode_batch_size}

    def state_tensors(self) -> dict[str, Tensor]:
        """The fitted model as a flat dict of CPU tensors (saved with safetensors)."""
        raise NotImplementedError

    def _load_state(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------
# registry
#
# The only mutable module state of dlsr: filled while the package is imported, read afterwards. Each detector
# module files its classes with @register_detector; dlsr.artifacts registers the writer behind
# `BaseDetector.save`, so that persistence depends on the detectors and never the reverse. Importing any dlsr
# module runs dlsr/__init__, which imports dlsr.artifacts and with it every built-in detector.

_D = TypeVar("_D", bound=BaseDetector)


class Saver(Protocol):
    """What writes a detector to a directory: `dlsr.artifacts.save_detector`."""

    def __call__(self, detector: BaseDetector, path: str | Path, *, metrics: dict | None = None) -> Path: ...


_DETECTORS: dict[str, type[BaseDetector]] = {}  # kind -> class
_saver: Saver | None = None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_detector(cls: type[_D]) -> type[_D]:
    """Class decorator: file a detector class under its own `kind`; returns the class unchanged."""
    kind = cls.__dict__.get("kind") if isinstance(cls, type) else None
    if not isinstance(kind, str) or not issubclass(cls, BaseDetector):
        raise TypeError(f"{cls!r}: register a BaseDetector subclass that sets its own `kind`")
    known = _DETECTORS.get(kind)
    # The same class again (its module reloaded) replaces itself; another class may not take the kind.
    if known is not None and _qualname(known) != _qualname(cls):
        raise ValueError(f"detector kind {kind!r} is already taken by {_qualname(known)}")
    _DETECTORS[kind] = cls
    return cls


def detector_kinds() -> tuple[str, ...]:
    """The registered detector kinds, sorted."""
    return tuple(sorted(_DETECTORS))


def detector_class(kind: str) -> type[BaseDetector]:
    """The class registered under `kind`; an unknown kind is a ValueError listing the known ones."""
    try:
        return _DETECTORS[kind]
    except KeyError:
        raise ValueError(f"unknown detector kind {kind!r}; choose one of {list(detector_kinds())}") from None


def register_saver(saver: Saver) -> Saver:
    """Decorator: make `saver` the writer behind `BaseDetector.save` (dlsr.artifacts.save_detector)."""
    global _saver
    _saver = saver
    return saver
