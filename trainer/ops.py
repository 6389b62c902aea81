"""The real method behind a job: dlsr Encoder + FeatureCache + a detector (see job.ModelOps).

The detector is DLSR by default; `ModelSettings.detector` can choose a baseline on the same features
(Mahalanobis, kNN), which the monitor serves like any artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlsr_monitor.config.settings import ModelSettings

import numpy as np

log = logging.getLogger(__name__)

# Hyperparameters that fix the LFDN's shape or the score: a warm start needs them unchanged.
_SHAPE_KEYS = ("n_blocks", "width", "hidden", "temb_dim", "T", "schedule", "score", "t", "ddim_steps")


class DlsrOps:
    """Features through the cache, fit (cold or warm-started from the live LFDN), load with verification.

    Args:
        model: `config.ModelSettings` (encoder, weights, stages, input size, device, batch size, score).
        detector_kwargs: extra detector arguments (TrainerSettings.detector), e.g. n_blocks, epochs for DLSR,
            k for kNN, shrinkage for Mahalanobis. They win over the DLSR_MODEL__* knobs and their `auto`.
        refit_epochs: epochs of a warm-started refit (None: a fifth of the full epochs, at least 1).
        announce: receives the one-line fit-time estimate before a DLSR fit starts (it is logged either way).
    """

    def __init__(
        self,
        model: ModelSettings,
        detector_kwargs: dict | None = None,
        refit_epochs: int | None = None,
        announce: Callable[[str], None] | None = None,
    ) -> None:
        from dlsr.cache import FeatureCache
        from dlsr.devices import resolve_device

        self.model = model
        self.device = resolve_device(model.device)
        # input_size auto: the encoder waits for the first images, whose size picks it (dlsr.encoder).
        self._encoder = None if model.input_size == "auto" else self._make_encoder(model.input_size)
        self.cache = FeatureCache(model.feature_cache)
        self.kind = getattr(model, "detector", "dlsr")
        self.extra = dict(detector_kwargs or {})
        self.refit_epochs = refit_epochs
        self.announce = announce
        self.last_encoded = 0
        self.last_estimate: Any = None  # dlsr.detector.FitEstimate of the last DLSR fit

    def _make_encoder(self, input_size: int | None) -> Any:
        from dlsr.encoder import Encoder

        model = self.model
        if getattr(model, "precision", "auto") == "int8":
            # Quantizing needs the fit images before the encoder exists; the trainer does not do that (yet).
            raise ValueError(
                "DLSR_MODEL__PRECISION=int8: the trainer does not fit int8 models; fit in fp32 or bf16 "
                "(int8 encoders are made with the library: Encoder.create(precision='int8', calibration=...))"
            )
        return Encoder.create(
            name=model.encoder,
            weights=model.encoder_weights,
            stages=tuple(model.stages),
            input_size=input_size,
            device=self.device,
            precision=getattr(model, "precision", "auto"),
            runtime=getattr(model, "runtime", "torch"),
            threads=getattr(model, "runtime_threads", None),
            streams=getattr(model, "runtime_streams", 1),
            export_dir=getattr(model, "export_cache", None),
        )

    def _sized_for(self, images: Any) -> None:
        """With input_size auto, build the encoder for the images' size (once: the first images decide)."""
        if self._encoder is not None:
            return
        from dlsr.encoder import auto_input_size, native_input_size
        from dlsr.readers import source_side

        side = source_side(images)
        size = auto_input_size(side, native_input_size(self.model.encoder))
        log.info("input_size auto: %s px for sources of %s px (shorter side, median)", size, side)
        self._encoder = self._make_encoder(size)

    @property
    def encoder(self) -> Any:
        """The encoder (with input_size auto and no images seen yet: at the backbone's own size)."""
        if self._encoder is None:
            self._encoder = self._make_encoder(None)
        return self._encoder

    @property
    def kwargs(self) -> dict:
        """The detector's arguments: DLSR_MODEL__* knobs (`auto` sized for the device), then trainer.detector."""
        if self.kind == "dlsr":
            sized = self.model.detector_kwargs(device=str(self.device), dim=self.encoder.dim)
            base = {k: v for k, v in sized.items() if v is not None}  # unset knobs: the detector's defaults
        else:  # the DLSR_MODEL__* LFDN knobs mean nothing to a baseline
            base = {"encode_batch_size": self.model.batch_size}
        return {**base, **self.extra}

    def identity(self) -> dict:
        return self.encoder.identity()

    def features(self, images: Any, *, progress: bool = True) -> np.ndarray:
        self._sized_for(images)
        res = self.cache.extract(self.encoder, images, batch_size=self.model.batch_size, progress=progress)
        self.last_encoded = res.n_encoded
        if res.failures and len(res.names) != len(images):
            names = ", ".join(f.name for f in res.failures[:5])
            raise RuntimeError(f"{len(res.failures)} vetted images could not be encoded (e.g. {names})")
        return res.features

    def new_detector(self) -> Any:
        from dlsr.base import detector_class

        return detector_class(self.kind)(self.encoder, device=self.device, **self.kwargs)

    def can_warm_start(self, old: Any) -> bool:
        # Only an LFDN continues training; a baseline refits from scratch in seconds.
        if self.kind != "dlsr" or getattr(old, "kind", None) != "dlsr":
            return False
        mine = {k: v for k, v in self.encoder.identity().items() if k != "device"}
        theirs = {k: v for k, v in (old.encoder_identity or {}).items() if k != "device"}
        if mine != theirs:
            log.info("encoder changed since the live model: fitting cold")
            return False
        fresh = self.new_detector().hyperparameters()
        live = old.hyperparameters()
        changed = [k for k in _SHAPE_KEYS if k in fresh and fresh.get(k) != live.get(k)]
        if changed:
            log.info("detector settings %s changed since the live model: fitting cold", changed)
            return False
        return True

    def fit(self, features: np.ndarray, *, warm_from: Any | None, progress: bool = True) -> Any:
        if warm_from is None:
            det = self.new_detector()
            self._estimate(det, features)
            return det.fit(features, progress=progress)
        epochs = self.refit_epochs or max(1, int(getattr(warm_from, "epochs", 5)) // 5)
        # Training settings (lr, batch, EMA) come from the current configuration, the weights from the live model.
        training = ("batch_size", "lr", "weight_decay", "ema_decay", "warmup_steps", "epochs")
        warm_from.config = replace(warm_from.config, **{k: self.kwargs[k] for k in training if k in self.kwargs})
        warm_from.progress = progress
        self._estimate(warm_from, features, epochs=epochs)
        # A loaded detector warm-starts too: fit(warm_start=True) trains a copy of its frozen scoring weights.
        return warm_from.fit(features, progress=progress, warm_start=True, epochs=epochs)

    def _estimate(self, det: Any, features: np.ndarray, epochs: int | None = None) -> None:
        """Time a few training steps here and say how long the (DLSR) fit will take, before it starts."""
        if not hasattr(det, "estimate_fit"):
            return
        self.last_estimate = det.estimate_fit(len(features), features.shape[1], epochs=epochs)
        line = self.last_estimate.line(det.config, str(self.device))
        log.info("%s", line)
        if self.announce is not None:
            self.announce(line)

    def load(self, path: Path) -> Any:
        from dlsr.artifacts import load_detector

        # Before any images (auto input size): the artifact's own encoder, at the size it was fitted with.
        return load_detector(path, device=self.device, encoder=self._encoder)
